"""Worker for tests/test_horovod_compat.py: Horovod elastic shrinks the job from 2 workers to 1 and
grows it back to 2, with op=hvd.Average, for the stock optimizer with UniformCompressor and for
the drop-in side by side (one TorchState holds both).

Every worker appends one JSON line per step to its own file in --out: step, world size, rank and,
per optimizer, the conservation gap (decoded aggregate against plain Horovod's mean over the ranks
of what each rank coded: gradient + old residual - new residual) or the error it raised.
"""
import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from workloads.datasets import fashion_mnist

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--hosts", required=True, help="the file the host discovery script prints")
ap.add_argument("--steps-per-phase", type=int, default=5)
args = ap.parse_args()

hvd.init()
torch.set_num_threads(1)
x_all, y_all = fashion_mnist("test")


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


stock_model, dropin_model = mlp(), mlp()
comp = hvd_gradq.UniformCompressor(bits=4, named_parameters=stock_model.named_parameters(), op=hvd.Average)
stock = hvd.DistributedOptimizer(torch.optim.SGD(stock_model.parameters(), lr=0.05),
                                 named_parameters=stock_model.named_parameters(), compression=comp, op=hvd.Average)
dropin = hvd_gradq.DistributedOptimizer(torch.optim.SGD(dropin_model.parameters(), lr=0.05),
                                        named_parameters=dropin_model.named_parameters(), codec="shared_scale", bits=4,
                                        transport="allreduce", op=hvd.Average)
log = Path(args.out, f"worker-{os.getpid()}.jsonl")
state = hvd.elastic.TorchState(model=stock_model, optimizer=stock, compressor=comp, dropin_model=dropin_model,
                               dropin=dropin, step=0, phase=0, phase_start=0)


def digest(model) -> str:
    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:16]


def owed_of(opt_or_comp) -> dict:
    """What each layer's coding owes from earlier steps: the lanes' residuals, and what the engine
    carries into the next step after rebuilding itself for a new world size (both ways in)."""
    ex = opt_or_comp.gradient_exchange
    owed = {n: r.clone() for n, r in ex.residuals.lanes.residuals.items()}
    for n, c in ex.residuals.carry.items():
        owed[n] = owed[n] + c if n in owed else c.clone()
    return owed


def train_step(model, opt, xb, yb, tag) -> float:
    """One step; returns the largest relative gap, over the layers, between the decoded aggregate
    and plain Horovod's mean over the ranks of what each rank coded (gradient + what was owed -
    the new residual). Owed is read before backward: the drop-in may rebuild its exchange (and
    carry the residuals) in the first gradient hook after the world size changed."""
    owed = owed_of(opt if opt is dropin else comp)
    opt.zero_grad()
    F.cross_entropy(model(xb), yb).backward()
    grads = {n: p.grad.detach().clone().reshape(-1) for n, p in model.named_parameters()}
    opt.synchronize()
    new = owed_of(opt if opt is dropin else comp)
    worst = 0.0
    for n, p in model.named_parameters():
        x = grads[n] + owed.get(n, 0.0) - new.get(n, 0.0)
        ref = hvd.allreduce(x, op=hvd.Average, name=f"{tag}.{n}")
        worst = max(worst, float((p.grad.reshape(-1) - ref).norm() / ref.norm().clamp_min(1e-12)))
    with opt.skip_synchronize():
        opt.step()
    return worst


# phase 0: 2 workers, rank 0 asks for 1. phase 1: wait for 1. phase 2: 1 worker, asks for 2.
# phase 3: wait for 2. phase 4: 2 workers again, then stop.
@hvd.elastic.run
def train(state):
    while state.phase < 5:
        rank, size = hvd.rank(), hvd.size()
        i = ((state.step * size + rank) * 32) % (len(x_all) - 32)
        rec = {"step": state.step, "size": size, "rank": rank, "phase": state.phase}
        for label, model, opt in (("stock", stock_model, stock), ("dropin", dropin_model, dropin)):
            try:
                rec[label] = train_step(model, opt, x_all[i:i + 32], y_all[i:i + 32], f"{label}.{state.step}")
            except Exception as e:  # recorded for the test; the job ends with it
                rec[label] = f"{type(e).__name__}: {e}"
                with log.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                raise
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        state.step += 1
        done = state.step - state.phase_start
        if state.phase in (0, 2) and done >= args.steps_per_phase:
            if rank == 0:
                Path(args.hosts).write_text("localhost:1\n" if state.phase == 0 else "localhost:2\n")
            state.phase, state.phase_start = state.phase + 1, state.step
        elif state.phase in (1, 3) and size == (1 if state.phase == 1 else 2):
            state.phase, state.phase_start = state.phase + 1, state.step
        elif state.phase == 4 and done >= args.steps_per_phase:
            state.phase = 5
        elif state.phase in (1, 3) and done > 300:
            raise SystemExit(f"the job never reached the new size (phase {state.phase})")
        if state.phase in (1, 3):
            time.sleep(0.1)  # let the discovery script's change reach the driver
        state.commit()


train(state)
digests = hvd.allgather_object([digest(stock_model), digest(dropin_model)])
if hvd.rank() == 0:
    Path(args.out, "final.json").write_text(json.dumps({"size": hvd.size(), "digests": digests, "step": state.step}))
