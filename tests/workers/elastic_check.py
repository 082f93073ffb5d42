"""Worker for tests/test_elastic.py: hvd_gradq.DistributedOptimizer under Horovod elastic.

Rank 0 grows the job from 2 to 3 workers (rewriting the host file the discovery script reads),
and, after some steps with 3, shrinks it back to 2. Every worker appends one JSON line per step to
its own file in --out: step, world size, rank, codebook version and digest (bits, transport and
lane width per layer), loss. The surviving workers finish with a digest of their parameters.

With the lanes config, each step is also checked against plain Horovod: the aggregate must be the
sum over the ranks of gradient + what the rank owed before the step - what it owes after (every
residual kind, and what a resize carried), recorded as the relative gap; the owed vectors' digests
are recorded so that the test can follow one worker's residuals across a resize and a restore; and
once, with 2 workers again, every worker fails a step after coding it (HorovodInternalError), so
that ``restore()`` puts the committed state back before the step is redone.
"""
import argparse
import hashlib
import json
import os
import time
import zlib
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from owed import owed as owed_vector  # tests/workers/owed.py, next to this script

import hvd_gradq
from workloads.datasets import fashion_mnist
from workloads.models import FashionCNN

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--hosts", required=True, help="the file the host discovery script prints")
ap.add_argument("--steps-per-phase", type=int, default=6)
ap.add_argument("--config", default="lanes", choices=["lanes", "lowrank"])
args = ap.parse_args()

hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)
x_all, y_all = fashion_mnist("test")
model = FashionCNN(width=8)
probe = hvd_gradq.LossProbe(model, F.cross_entropy, lambda: [(x_all[:64], y_all[:64])])
if args.config == "lanes":
    kw = dict(codec="shared_scale", bits=4, error_feedback=True,  # the gathered layers (qsgdinf) keep residuals too
              transport={"features.[34].*": "two_phase", "features.1.*": "allgather", "features.2.*": "allreduce"},
              allocator=hvd_gradq.Allocator(3.0, metric="mse", solver="greedy", options=(2, 3, 4, 8), probe=probe),
              trigger=hvd_gradq.Trigger("interval", interval=1000))  # reallocations: resizes and restores
else:  # low-rank factors (rank 2) on the matrices, float16 Q: warm starts and residuals across the resizes
    kw = dict(codec="lowrank", rank=2, factors="float16", bits=4)
opt = hvd_gradq.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), named_parameters=model.named_parameters(),
    min_elements=512, op=hvd.Sum, **kw)
log = Path(args.out, f"worker-{os.getpid()}.jsonl")


def factors_digest():
    low = opt.gradient_exchange.lowrank if opt.gradient_exchange is not None else {}
    return zlib.crc32(b"".join(c.q.numpy().tobytes() for _, c in sorted(low.items())))


def owed():
    """What this rank owes per layer (every residual kind, server chunks in place, carried), one vector."""
    return owed_vector(opt.gradient_exchange, model.named_parameters())


def vector_digest(v):
    return float((v.double() * torch.arange(1, v.numel() + 1, dtype=torch.float64).sin()).sum())


plain = FashionCNN(width=8)  # this rank's local gradient at the same weights
injected = []


def codebook_digest():
    rows = sorted((c.name, c.bits, c.transport, None if c.layout is None else c.layout.lane_bits) for c in opt.codebook)
    return zlib.crc32(json.dumps([opt.codebook.version, rows]).encode()), rows


# phase 0: 2 workers; rank 0 asks for 3. phase 1: wait for 3. phase 2: 3 workers; rank 0 asks for 2.
# phase 3: wait for 2. phase 4: 2 workers again, then stop.
state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0, phase=0, phase_start=0)


@hvd.elastic.run
def train(state):
    while state.phase < 5:
        rank, size = hvd.rank(), hvd.size()
        i = ((state.step * size + rank) * 32) % (len(x_all) - 32)
        q_before = factors_digest()  # after a resize: rank 0's warm start, on every worker
        xb, yb = x_all[i:i + 32], y_all[i:i + 32]
        extra = {}
        events = len(opt.allocation_events)
        if args.config == "lanes":
            plain.load_state_dict(model.state_dict())
            plain.zero_grad()
            (F.cross_entropy(plain(xb), yb) / size).backward()
            before = owed()
            local = torch.cat([p.grad.reshape(-1) for p in plain.parameters()]) + before
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        (loss / size).backward()
        opt.synchronize()
        if args.config == "lanes":  # what crossed: the sum of what entered minus what the ranks still owe
            after = owed()
            expected = hvd.allreduce(local - after, op=hvd.Sum, name=f"check.{state.step}.{len(injected)}")
            agg = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            extra = {"gap": float((agg - expected).abs().max() / expected.abs().max()),
                     "owed_before": vector_digest(before), "owed_after": vector_digest(after),
                     "owed_norm": float(after.norm()), "allocated": len(opt.allocation_events) > events}
        with opt.skip_synchronize():
            opt.step()
        fail = args.config == "lanes" and state.phase == 4 and state.step - state.phase_start == 2 and not injected
        digest, rows = codebook_digest()
        with log.open("a") as f:
            f.write(json.dumps({"step": state.step, "size": size, "rank": rank, "version": opt.codebook.version,
                                "digest": digest, "rows": rows, "loss": loss.item(), "phase": state.phase,
                                "q_before": q_before, "q_after": factors_digest(), "failed": fail,
                                "low": sorted(opt.gradient_exchange.lowrank), "pid": os.getpid(), **extra}) + "\n")
        if fail:  # every worker at the same step: restore() undoes what this step changed, then it is redone
            injected.append(state.step)
            raise hvd.HorovodInternalError("injected failure after a coded step")
        state.step += 1
        done = state.step - state.phase_start
        if state.phase in (0, 2) and done >= args.steps_per_phase:
            if rank == 0:
                Path(args.hosts).write_text("localhost:3\n" if state.phase == 0 else "localhost:2\n")
            state.phase, state.phase_start = state.phase + 1, state.step
        elif state.phase in (1, 3) and size == (3 if state.phase == 1 else 2):
            state.phase, state.phase_start = state.phase + 1, state.step
        elif state.phase == 4 and done >= args.steps_per_phase:
            state.phase = 5
        elif state.phase in (1, 3) and done > 300:
            raise SystemExit(f"the job never reached the new size (phase {state.phase})")
        if state.phase in (1, 3):
            time.sleep(0.1)  # let the discovery script's change reach the driver
        state.commit()


train(state)
h = hashlib.sha256()
for _, p in sorted(model.named_parameters()):
    h.update(p.detach().numpy().tobytes())
digests = hvd.allgather_object(h.hexdigest())
if hvd.rank() == 0:
    Path(args.out, "final.json").write_text(json.dumps({"size": hvd.size(), "param_digests": digests,
                                                         "step": state.step}))
