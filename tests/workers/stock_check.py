"""Worker for tests/test_stock_path.py: hvd_gradq.Compressor on Horovod's own
hvd.DistributedOptimizer, under horovodrun. Writes ``<case>-rank<r>.json`` in --out.

Cases:
  matrix     every codec and every transport it can take (forced, and auto), op Sum and Average, error
             feedback on: the stock path (hvd.DistributedOptimizer + Compressor) and the drop-in from
             the same weights and data, 3 steps. Per configuration: the parameters' digest after
             every step on both ways in, each layer's bytes, and the stock aggregate's conservation
             against uncompressed hvd.DistributedOptimizer (aggregate = plain Horovod's + what the
             ranks' residuals paid); the 0-bit layer's bytes (its placeholder only).
  allocator  the stock path with the rank-0 allocator (first-order LAD, bit widths 0..8 and ranks 1, 2,
             an interval trigger): per step the codebook version, a digest of the codebook state
             and the bits; then rank 0 replays the same steps in SimulatedWorkers (the same engine
             in one process) and records its bits and parameter digests.
  mismatch_op / mismatch_op_sum / mismatch_bits / mismatch_process_set   settings that differ from the optimizer's or
             between ranks: every rank records the error of its first step.
  late_statistics   rotated lanes with this step's scales, op Average (every layer by our collectives and a
             placeholder): rank 1 starts each step 0.3 s after rank 0 and, before each of its
             first-round polls, waits 50 ms, so on rank 1 (only) a layer's statistics complete
             while compress() is still running. Both ranks record the parameters' digest per step.
  errors     construction errors, which must name the fix.
"""
import argparse
import copy
import hashlib
import json
import time
import traceback
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from owed import owed  # tests/workers/owed.py, next to this script

import hvd_gradq
from hvd_gradq.plan.planner import CODECS, RATIO_CODECS
from workloads.datasets import fashion_mnist

ap = argparse.ArgumentParser()
ap.add_argument("--case", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

torch.set_num_threads(1)
FIRST = hvd.ProcessSet([0])  # a process set of rank 0 alone (mismatch_process_set)
hvd.init(process_sets=[FIRST])
RANK, SIZE = hvd.rank(), hvd.size()
x_all, y_all = fashion_mnist("test")
BITS = {"fc1.weight": 3, "fc2.weight": 0, "fc3.weight": 2, "fc4.weight": 5}


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(784, 32)  # 25088 elements: 3 bits
        self.fc2 = torch.nn.Linear(32, 64)  # 2048: 0 bits (not sent)
        self.fc3 = torch.nn.Linear(64, 64)  # 4096: 2 bits
        self.fc4 = torch.nn.Linear(64, 48)  # 3072: 5 bits
        self.fc5 = torch.nn.Linear(48, 10)  # 480: float32

    def forward(self, x):
        h = x.view(x.shape[0], -1)
        for layer in (self.fc1, self.fc2, self.fc3, self.fc4):
            h = torch.relu(layer(h))
        return self.fc5(h)


def batch(step, rank=RANK, size=SIZE, n=32):
    i = ((step * size + rank) * n) % (len(x_all) - n)
    return x_all[i:i + n], y_all[i:i + n]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write(case, result):
    Path(args.out, f"{case}-rank{RANK}.json").write_text(json.dumps(result))


def settings(codec):
    kw = {"codec": codec, "bits": dict(BITS), "bucket_size": 512, "error_feedback": True, "rank": 2}
    if codec == "terngrad":
        kw["bits"] = {n: min(b, 2) for n, b in BITS.items()}
    if codec in RATIO_CODECS:
        kw.update(ratio=20, bits={"fc2.weight": 0})
    return kw


def transports(codec):
    if codec == "lowrank":
        return ["auto"]
    return ["auto", "allgather", "two_phase"] + (["allreduce"] if codec in ("rotated", "shared_scale") else [])


def matrix_case():
    results = {}
    for codec in CODECS:
        for transport in transports(codec):
            for opn in ("sum", "average"):
                key = f"{codec}/{transport}/{opn}"
                op = hvd.Sum if opn == "sum" else hvd.Average
                kw = {**settings(codec), "transport": transport}
                runs, finals = {}, {}
                for way in ("stock", "dropin"):
                    model = MLP()
                    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                    named = list(model.named_parameters())
                    if way == "stock":
                        comp = hvd_gradq.Compressor(named, op=op, **kw)
                        opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=comp, op=op)
                    else:
                        opt = hvd_gradq.DistributedOptimizer(base, named_parameters=named, op=op, **kw)
                        comp = opt.compressor
                    ex = comp.gradient_exchange
                    ref = copy.deepcopy(model)
                    ref_opt = hvd.DistributedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.0), op=op,
                                                       named_parameters=[(f"ref.{key}.{way}.{n}", p)
                                                                         for n, p in ref.named_parameters()])
                    held = [(n, p) for n, p in model.named_parameters() if n not in ex.lowrank]
                    digests, worst = [], 0.0
                    for step in range(3):
                        xb, yb = batch(step)
                        before = owed(ex, held)
                        ref.load_state_dict(model.state_dict())
                        ref_opt.zero_grad()
                        F.cross_entropy(ref(xb), yb).backward()
                        ref_opt.synchronize()
                        opt.zero_grad()
                        F.cross_entropy(model(xb), yb).backward()
                        opt.synchronize()
                        paid = hvd.allreduce(before - owed(ex, held), op=op, name=f"paid.{key}.{way}.{step}")
                        agg = dict(ref.named_parameters())
                        applied = torch.cat([p.grad.reshape(-1) for _, p in held])
                        expected = torch.cat([agg[n].grad.reshape(-1) for n, _ in held]) + paid
                        worst = max(worst, float((applied - expected).abs().max() / expected.abs().max()))
                        with opt.skip_synchronize():
                            opt.step()
                        digests.append(digest(model.parameters()))
                    finals[way] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                    runs[way] = {
                        "digests": digests, "conservation": worst,
                        "plans": {p.name: [p.transport, p.bits, p.payload_bytes, p.predicted.payload_bytes]
                                  for p in comp.layer_plans()},
                        "sent": {n: [info.nbytes, str(info.dtype)] for n, info in comp.payloads.items()},
                        "summary": comp.transport_summary()}
                # N > 2: float sums in another order where Horovod fuses differently; the gap stays at rounding
                runs["max_difference"] = float((finals["stock"] - finals["dropin"]).abs().max()
                                               / finals["dropin"].abs().max())
                results[key] = runs
    write("matrix", {"rank": RANK, "size": SIZE, "results": results})


def allocator_setup(model, base):
    probe = hvd_gradq.LossProbe(model, F.cross_entropy, [batch(500, 0, 1, 64)])
    allocator = hvd_gradq.Allocator(2.5, metric="lad_first_order", options=(0, 2, 3, 4, 8), ranks=(1, 2),
                                    probe=probe)
    return dict(codec="rotated", bits=4, allocator=allocator, trigger=hvd_gradq.Trigger("interval", interval=3),
                lr=base, transport={"fc4.weight": "allgather"})


def allocator_case(steps=7):
    model = MLP()
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    comp = hvd_gradq.Compressor(model.named_parameters(), **allocator_setup(model, base))
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), compression=comp)
    per_step = []
    for step in range(steps):
        xb, yb = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        state = json.dumps({n: {k: v for k, v in c.items() if k != "block_rms"}
                            for n, c in comp.codebook.state_dict()["layers"].items()}, sort_keys=True)
        per_step.append({"version": comp.codebook.version, "codebook": hashlib.sha256(state.encode()).hexdigest(),
                         "bits": {p.name: [p.bits, p.rank, p.transport] for p in comp.layer_plans()},
                         "params": digest(model.parameters())})
    result = {"rank": RANK, "size": SIZE, "steps": per_step, "events": [e.step for e in comp.allocation_events],
              "summary": comp.transport_summary(), "timings": comp.step_timings(last=2),
              "overhead": comp.allocation_overhead()}
    if RANK == 0:  # the same steps in one process: N simulated workers on the same engine
        sim_model = MLP()
        sim_base = torch.optim.SGD(sim_model.parameters(), lr=0.05, momentum=0.9)
        sim = hvd_gradq.SimulatedWorkers(sim_base, sim_model.named_parameters(), workers=SIZE,
                                         **{k: v for k, v in allocator_setup(sim_model, sim_base).items() if k != "lr"})
        sim_steps = []
        for step in range(steps):
            sim.zero_grad()
            for r in range(SIZE):
                xb, yb = batch(step, r)
                sim.backward(F.cross_entropy(sim_model(xb), yb))
            sim.step()
            sim_steps.append({"bits": {p.name: [p.bits, p.rank, p.transport] for p in sim.layer_plans()},
                              "params": digest(sim_model.parameters())})
        result["sim"] = sim_steps
    write("allocator", result)


def mismatch_case(case):
    model = MLP()
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    named = list(model.named_parameters())
    kw, opt_kw = {"codec": "rotated", "bits": dict(BITS)}, {}
    if case == "mismatch_op":  # the compressor sums, the optimizer averages
        kw["op"] = hvd.Sum
    if case == "mismatch_op_sum":  # the compressor averages (every layer by its own collectives and a
        # placeholder: only the placeholder can tell), the optimizer sums
        opt_kw["op"] = hvd.Sum
    if case == "mismatch_bits":  # rank 1 codes fc3 at 4 bits
        kw["bits"]["fc3.weight"] = 4 if RANK == 1 else 2
    if case == "mismatch_process_set":  # the compressor on a set of one rank, the optimizer on all
        kw["process_set"] = FIRST
    step, result = 0, {"rank": RANK, "error": None}
    try:
        comp = hvd_gradq.Compressor(named, **kw)
        opt = hvd.DistributedOptimizer(base, named_parameters=named, compression=comp, **opt_kw)
        for step in range(3):
            xb, yb = batch(step)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    except Exception as e:  # recorded, then the job ends with it
        result.update(error=type(e).__name__, message=str(e), step=step)
        write(case, result)
        raise
    write(case, result)


def late_statistics_case():
    if RANK == 1:  # a slow rank's compress(): each poll of a first round comes 50 ms late
        from hvd_gradq.exchange.exchanges import TwoAllreduces

        poll = TwoAllreduces.advance_if_ready

        def late_poll(self):
            time.sleep(0.05)
            return poll(self)

        TwoAllreduces.advance_if_ready = late_poll
    model = MLP()
    named = list(model.named_parameters())
    comp = hvd_gradq.Compressor(named, codec="rotated", transport="allreduce", bits=dict(BITS), op=hvd.Average)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), named_parameters=named,
                                   compression=comp, op=hvd.Average)
    kinds: list[str] = []
    steps, step, result = [], 0, {"rank": RANK, "error": None}
    try:
        for step in range(4):
            if RANK == 1:
                time.sleep(0.3)  # rank 0 has handed every layer over by now
            xb, yb = batch(step)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            kinds = sorted(set(kinds) | {type(ex).__name__ for ex in comp._launched.values()})
            opt.step()
            steps.append(digest(model.parameters()))
    except Exception as e:  # recorded, then the job ends with it
        result.update(error=type(e).__name__, message=str(e), step=step)
    write("late_statistics", {**result, "steps": steps, "exchanges": kinds})
    if result["error"]:
        raise SystemExit(1)


def errors_case():
    model = MLP()
    named = list(model.named_parameters())
    probe = hvd_gradq.LossProbe(model, F.cross_entropy, [batch(0)])
    found = {}
    for label, fn in {
        "lad_without_lr": lambda: hvd_gradq.Compressor(named, allocator=hvd_gradq.Allocator(2.0, probe=probe)),
        "allreduce_for_qsgd": lambda: hvd_gradq.Compressor(named, codec="qsgd", transport="allreduce"),
        "adasum": lambda: hvd_gradq.Compressor(named, op=hvd.Adasum),
        "to_the_dropin": lambda: hvd_gradq.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named,
            compression=hvd_gradq.Compressor(named)),
        "allocator_with_lowrank": lambda: hvd_gradq.Compressor(named, codec="lowrank", allocator=hvd_gradq.Allocator(
            2.0, probe=probe), lr=0.1),
        "unknown_layer": lambda: hvd_gradq.Compressor(named, bits={"conv.*": 2}),
        "optimizer_for_params": lambda: hvd_gradq.Compressor(torch.optim.SGD(model.parameters(), lr=0.1)),
    }.items():
        try:
            fn()
            found[label] = None
        except (ValueError, TypeError) as e:
            found[label] = f"{type(e).__name__}: {e}"
        except Exception:
            found[label] = traceback.format_exc()[-800:]
    write("errors", {"rank": RANK, "errors": found})


if args.case == "matrix":
    matrix_case()
elif args.case == "allocator":
    allocator_case()
elif args.case == "errors":
    errors_case()
elif args.case == "late_statistics":
    late_statistics_case()
else:
    mismatch_case(args.case)
