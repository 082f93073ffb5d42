"""The ranks' agreement on the codebook, checked before a new engine's first collectives.

Every payload carries a digest of its layer's codebook entry, which catches ranks that code a
layer differently once their bytes meet. Ranks whose codebooks differ in *how* a layer travels
(allgather on one rank, two-phase on another; a layer sent on one and not on another; low-rank
factors of another rank) never meet: each waits in a collective the other does not run. So a
fresh engine's first step starts with one small allgather of every rank's codebook description
(each layer's size, bits, transport, codec and its parameters, rank, rotation; the codebook
version, N and the op), and the step's first ``finish`` compares them before it reads any
layer's result: a disagreement raises ``CodebookMismatchError`` on every rank, naming the layers,
what differs and the ranks. Later changes (reallocations, resizes, checkpoints) reach every rank
from the root, so the one check per engine suffices; the per-payload digests still cover scales,
levels and versions at every step.
"""
from __future__ import annotations

import json

import torch

from hvd_gradq.exchange.collectives import Collectives
from hvd_gradq.wire.header import CodebookMismatchError

FIELDS = ("numel", "bits", "transport", "codec", "codec_key", "rank", "rotation", "rounding")
SHOWN = 4  # differences named in the message


def describe(engine) -> dict:
    """What every rank must hold the same of an engine (``exchange.engine.GradientExchange``): its
    codebook, N, the op and the coding's settings that change which collectives run."""
    layers = {c.name: [getattr(c, f) for f in FIELDS] for c in engine.codebook}
    return {"version": engine.codebook.version, "size": engine.size, "op": engine.op,
            "block_scales": engine.coding.block_scales, "factors": engine.coding.factors, "layers": layers}


class Agreement:
    """Submits this rank's description (an allgather named ``hvd_gradq.agreement``); ``check``
    waits for every rank's and raises where they differ (idempotent)."""

    def __init__(self, coll: Collectives, description: dict, label: str) -> None:
        self.mine = description
        self.label = label
        self.checked = False
        blob = json.dumps(description, sort_keys=True).encode()
        head = torch.tensor([len(blob)], dtype=torch.int64).view(torch.uint8)
        data = torch.cat([head, torch.frombuffer(bytearray(blob), dtype=torch.uint8)])
        self._coll = coll
        self._handle = coll.allgather_async(data, "hvd_gradq.agreement")

    def check(self) -> None:
        if self.checked:
            return
        self.checked = True
        gathered = self._coll.synchronize(self._handle)
        blobs, at = [], 0
        while at < gathered.numel():
            n = int(gathered[at:at + 8].clone().view(torch.int64))
            blobs.append(json.loads(bytes(gathered[at + 8:at + 8 + n].tolist()).decode()))
            at += 8 + n
        differences = [d for r, theirs in enumerate(blobs) for d in _differences(blobs[0], theirs, r)]
        if differences:
            shown = "; ".join(differences[:SHOWN]) + (f"; and {len(differences) - SHOWN} more"
                                                      if len(differences) > SHOWN else "")
            raise CodebookMismatchError(
                f"{self.label}: the ranks hold different codebooks at their first step ({shown}). Construct it "
                "with the same arguments on every rank (codec=, bits=, ratio=, rank=, factors=, transport=, "
                "rotation=, ...), and load the same checkpoint on every rank")


def _differences(root: dict, theirs: dict, r: int) -> list[str]:
    out = [f"{key} {root.get(key)!r} on rank 0, {theirs.get(key)!r} on rank {r}"
           for key in sorted(set(root) | set(theirs)) if key != "layers" and root.get(key) != theirs.get(key)]
    mine, other = root["layers"], theirs["layers"]
    for name in sorted(set(mine) | set(other)):
        if name not in mine or name not in other:
            out.append(f"layer {name!r} only on rank {0 if name in mine else r}")
            continue
        for field, a, b in zip(FIELDS, mine[name], other[name]):
            if a != b:
                out.append(f"layer {name!r}: {field} {a!r} on rank 0, {b!r} on rank {r}")
    return out
