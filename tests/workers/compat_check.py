"""Worker for tests/test_horovod_compat.py: Horovod's own recipes with hvd_gradq swapped in, under
horovodrun. Writes one JSON file per rank (``<case>-rank<r>.json``) in --out.

Cases:
  resume       the resume recipe: rank 0 loads a checkpoint (model + optimizer state), then
               hvd.broadcast_parameters and hvd.broadcast_optimizer_state, then training; with the
               drop-in for SGD (momentum, weight decay), Adam, AdamW, RMSprop and Adagrad, and with
               the stock optimizer + UniformCompressor, with the stock optimizer + a Compressor of
               low-rank, gathered and lane layers ("mixed"), and with the drop-in built through a
               function that replaced hvd.DistributedOptimizer ("wrapped", as harnesses do: it hung
               when the drop-in copied that attribute's module). Records digests of the optimizer state after
               the broadcast and of the parameters after training.
  size_one     a process set of one rank per rank (hvd.add_process_set([r])) with op=hvd.Average:
               the stock path and the drop-in; at N = 1 the aggregate is the rank's own gradient.
  sparse       nn.Embedding(sparse=True) on the stock path with sparse_as_dense False and True (two
               embeddings of one shape, to tell them apart by parameter), on the drop-in (SGD and
               SparseAdam), and with groups= on the stock path (refused with the fix named).
  join         ranks run out of data one after another and call hvd.join(); the others go on (Horovod
               adds zeros for the joined ranks and still divides by N), rank 0 alone at the end; then
               sync_codebook(root_rank=<join's result>) and all train on. The stock path and the
               drop-in's lanes, checked against plain Horovod allreduces of what each rank coded.
  audit        smaller cases: gradient_predivide_factor on the stock path, model.parameters() for the
               compressor and no named_parameters for either optimizer, duplicate names, Adasum on the stock path, a
               parameter unfrozen after the drop-in was built, Horovod's warning text, and
               hvd.elastic.TorchState commit/restore with the drop-in.
"""
import argparse
import hashlib
import io
import json
import sys
import traceback
import warnings
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from workloads.datasets import austen_lm, fashion_mnist

ap = argparse.ArgumentParser()
ap.add_argument("--case", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

torch.set_num_threads(1)
hvd.init(process_sets="dynamic")
RANK, SIZE = hvd.rank(), hvd.size()
x_all, y_all = fashion_mnist("test")
report: dict = {"rank": RANK, "size": SIZE}


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(784, 32)
        self.fc2 = torch.nn.Linear(32, 64)
        self.fc3 = torch.nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.view(x.shape[0], -1)))
        return self.fc3(torch.relu(self.fc2(h)))


def batch(step, rank=None, size=None, n=32):
    rank = RANK if rank is None else rank
    size = SIZE if size is None else size
    i = ((step * size + rank) * n) % (len(x_all) - n)
    return x_all[i:i + n], y_all[i:i + n]


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def state_digest(opt) -> str:
    sd = opt.state_dict()
    ts = [v for pid in sorted(sd["state"]) for _, v in sorted(sd["state"][pid].items()) if torch.is_tensor(v)]
    return digest(ts)


def gathered(value: str, name: str, process_set=hvd.global_process_set) -> list:
    return hvd.allgather_object(value, name=name) if process_set is hvd.global_process_set else [value]


def loss_of(model, step, **kw):
    xb, yb = batch(step, **kw)
    return F.cross_entropy(model(xb), yb)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def record(key: str, fn):
    """Run one sub-case; keep its result or the error it raised (type and message)."""
    try:
        report[key] = fn()
    except Exception as e:  # recorded for the test to judge, the job goes on
        report[key] = {"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()[-1500:]}


def lane_residuals(opt_or_comp):
    """The error feedback of the summable lanes (the stock compressor's, or the drop-in's lanes)."""
    if isinstance(opt_or_comp, hvd_gradq.UniformCompressor):
        return opt_or_comp.error_feedback
    return opt_or_comp.gradient_exchange.residuals.lanes


def synchronize_checked(model, opt, store, tag, process_set=hvd.global_process_set) -> float:
    """``opt.synchronize()``, then the largest relative gap, over the layers, between the decoded
    aggregate and the mean over ranks (Horovod's Average: divided by N, also under hvd.join()) of
    what each rank coded, g + old residual - new residual, reduced by plain Horovod. Error feedback
    keeps what coding drops, so the gap is float rounding only (a wrong factor shows as >= 0.5)."""
    before = {}
    for n, p in model.named_parameters():
        r = store.residuals.get(n)
        before[n] = (p.grad.detach().to_dense().clone(), None if r is None else r.clone())
    opt.synchronize()
    worst = 0.0
    for n, p in model.named_parameters():
        g, r_old = before[n]
        x = g.reshape(-1) if r_old is None else g.reshape(-1) + r_old
        r_new = store.residuals.get(n)
        if r_new is not None:
            x = x - r_new
        ref = hvd.allreduce(x, op=hvd.Average, name=f"{tag}.{n}", process_set=process_set)
        worst = max(worst, rel_err(p.grad.detach().to_dense().reshape(-1), ref))
    return worst


# ---- resume ---------------------------------------------------------------------------------------
OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-2),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


def resume(kind: str, name: str) -> dict:
    make = OPTIMIZERS[name]
    ckpt = Path(args.out) / f"{kind}-{name}.pt"
    if RANK == 0:  # an earlier run's checkpoint: 3 local steps of the plain optimizer
        model = MLP()
        opt = make(model.parameters())
        for step in range(3):
            opt.zero_grad()
            loss_of(model, step, rank=0, size=1).backward()
            opt.step()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
        ckpt.write_bytes(buf.getvalue())
    model = MLP()  # every rank: a fresh model and optimizer, as a restarted job builds them
    original = hvd.DistributedOptimizer
    if kind == "wrapped":  # a harness replaced hvd.DistributedOptimizer by a function that builds the drop-in
        def wrapper(optimizer, **kw):
            return hvd_gradq.DistributedOptimizer(optimizer, **kw)

        hvd.DistributedOptimizer = wrapper
    if kind in ("dropin", "wrapped"):
        opt = hvd.DistributedOptimizer(make(model.parameters()), named_parameters=model.named_parameters(),
                                       codec="qsgd", bits=4, bucket_size=256) if kind == "wrapped" else \
            hvd_gradq.DistributedOptimizer(make(model.parameters()), named_parameters=model.named_parameters(),
                                           codec="qsgd", bits=4, bucket_size=256)
    elif kind == "mixed":  # the stock path with low-rank, gathered and lane layers
        comp = hvd_gradq.Compressor(model.named_parameters(), codec="lowrank", min_elements=256,
                                    rank={"fc1.weight": 2, "fc2.weight": 30, "fc3.weight": 9},
                                    transport={"fc2.weight": "allgather", "fc3.weight": "allreduce"})
        opt = hvd.DistributedOptimizer(make(model.parameters()), named_parameters=model.named_parameters(),
                                       compression=comp)
        report.setdefault("mixed.transports", {p.name: p.transport for p in comp.layer_plans()})
    else:
        comp = hvd_gradq.UniformCompressor(bits=4, named_parameters=model.named_parameters())
        opt = hvd.DistributedOptimizer(make(model.parameters()), named_parameters=model.named_parameters(),
                                       compression=comp)
    if RANK == 0:
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        expected = state_digest(opt)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    try:
        hvd.broadcast_optimizer_state(opt, root_rank=0)
    finally:
        hvd.DistributedOptimizer = original
    if kind in ("stock", "mixed"):  # Horovod's own materialising step moves parameters (weight decay): re-send
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    after_broadcast = state_digest(opt)
    params_after_broadcast = digest(model.parameters())
    for step in range(3):
        opt.zero_grad()
        loss_of(model, 10 + step).backward()
        opt.step()
    return {"state": gathered(after_broadcast, f"{kind}.{name}.s"),
            "expected_state": hvd.broadcast_object(expected if RANK == 0 else None, root_rank=0,
                                                   name=f"{kind}.{name}.e"),
            "params_after_broadcast": gathered(params_after_broadcast, f"{kind}.{name}.pb"),
            "params": gathered(digest(model.parameters()), f"{kind}.{name}.p"),
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}


def resume_case():
    for kind in ("dropin", "stock", "mixed", "wrapped"):
        for name in OPTIMIZERS:
            record(f"{kind}.{name}", lambda kind=kind, name=name: resume(kind, name))
    record("dropin.elastic_sync_handler", lambda: type(hvd.elastic.TorchState(
        model=MLP(), optimizer=hvd_gradq.DistributedOptimizer(torch.optim.SGD(MLP().parameters(), lr=0.1))
    )._handlers["optimizer"]).__name__)


# ---- a process set of size 1 -------------------------------------------------------------------------
def size_one_case():
    sets = [hvd.add_process_set([r]) for r in range(SIZE)]
    mine = sets[RANK]

    def run(kind: str) -> dict:
        model = MLP()
        if kind == "stock":
            opt = comp = hvd_gradq.UniformCompressor(bits=4, named_parameters=model.named_parameters(),
                                                     process_set=mine)
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                           named_parameters=model.named_parameters(), compression=comp,
                                           op=hvd.Average, process_set=mine)
        else:
            comp = opt = hvd_gradq.DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.05), named_parameters=model.named_parameters(),
                codec="shared_scale", bits=4, transport="allreduce", op=hvd.Average, process_set=mine,
                allocator=hvd_gradq.Allocator(3.0, options=(2, 4), metric="mse", solver="greedy",
                                              probe=hvd_gradq.LossProbe(model, F.cross_entropy, lambda: [batch(0)])),
                trigger=hvd_gradq.Trigger("interval", interval=2))
        gaps = []
        for step in range(5):
            opt.zero_grad()
            loss_of(model, step).backward()
            gaps.append(synchronize_checked(model, opt, lane_residuals(comp), f"one.{kind}.{step}", mine))
            with opt.skip_synchronize():
                opt.step()
        out = {"gap": gaps, "process_set_size": mine.size()}
        if kind == "dropin":
            out["allocations"] = len(opt.allocation_events)
        return out

    record("stock", lambda: run("stock"))
    record("dropin", lambda: run("dropin"))
    hvd.barrier()


# ---- sparse gradients ----------------------------------------------------------------------------------
class BagModel(torch.nn.Module):
    """Two sparse embeddings of one shape (words and their successors) and a dense decoder."""

    def __init__(self, vocab=2000, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.words = torch.nn.Embedding(vocab, dim, sparse=True)
        self.context = torch.nn.Embedding(vocab, dim, sparse=True)
        self.decoder = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.decoder(self.words(tokens[:, 0]) + 0.5 * self.context(tokens[:, 1]))


def sparse_case():
    ids = austen_lm(vocab_size=2000)["train"]

    def tokens(step, rank=RANK):
        i = ((step * SIZE + rank) * 64) % (len(ids) - 200)
        window = ids[i:i + 66]
        return torch.stack([window[:-2], window[1:-1]], 1), window[2:]

    def run(kind: str, sparse_as_dense: bool, make_opt=None) -> dict:
        model = BagModel()
        make_opt = make_opt or (lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
        if kind == "stock":
            comp = hvd_gradq.UniformCompressor(bits=8, named_parameters=model.named_parameters())
            opt = hvd.DistributedOptimizer(make_opt(model), named_parameters=model.named_parameters(),
                                           compression=comp, sparse_as_dense=sparse_as_dense)
        else:
            opt = hvd_gradq.DistributedOptimizer(make_opt(model),
                                                 named_parameters=model.named_parameters(), codec="qsgd", bits=8,
                                                 bucket_size=256, sparse_as_dense=sparse_as_dense)
        gaps = []  # stock: the conservation gap of every layer; drop-in (QSGD, unbiased): its error
        for step in range(4):
            tok, target = tokens(step)
            opt.zero_grad()
            F.cross_entropy(model(tok), target).backward()
            tag = f"sparse.{kind}.{sparse_as_dense}.{len(report)}.{step}"
            if kind == "stock":
                gaps.append(synchronize_checked(model, opt, comp.error_feedback, tag))
            else:
                mean = {n: hvd.allreduce(p.grad.to_dense(), name=f"{tag}.{n}", op=hvd.Average)
                        for n, p in model.named_parameters() if p.grad is not None}
                opt.synchronize()
                gaps.append(max(rel_err(p.grad.to_dense(), mean[n]) for n, p in model.named_parameters()
                                if n in mean and n in dict(opt.gradient_exchange.plans)))
            sparse_after = [model.words.weight.grad.is_sparse, model.context.weight.grad.is_sparse]
            with opt.skip_synchronize():
                opt.step()
        res = {"gap": gaps, "grad_sparse": sparse_after,
               "params": gathered(digest(model.parameters()), f"sparse.{kind}.{sparse_as_dense}.{len(report)}")}
        if kind == "stock":
            res["packed"] = {n: info.packed for n, info in comp.payloads.items()}
        return res

    record("stock.sparse_as_dense=False", lambda: run("stock", False))
    record("stock.sparse_as_dense=True", lambda: run("stock", True))
    record("dropin.sparse_as_dense=False", lambda: run("dropin", False))
    record("dropin.sparse_as_dense=True", lambda: run("dropin", True))
    record("dropin.SparseAdam", lambda: run(
        "dropin", False, lambda m: torch.optim.SparseAdam([m.words.weight, m.context.weight])))

    def grouped():
        model = BagModel()
        comp = hvd_gradq.UniformCompressor(bits=8, named_parameters=model.named_parameters())
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                       named_parameters=model.named_parameters(), compression=comp, groups=1)
        tok, target = tokens(0)
        F.cross_entropy(model(tok), target).backward()
        opt.step()
        return {"error": None}

    record("stock.groups", grouped)


# ---- hvd.join() --------------------------------------------------------------------------------------
def join_case():
    alone = 3  # steps rank 0 takes after the others joined

    def run(kind: str) -> dict:
        model = MLP()
        if kind == "stock":
            comp = hvd_gradq.UniformCompressor(bits=4, named_parameters=model.named_parameters())
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                           named_parameters=model.named_parameters(), compression=comp)
            sync = comp.sync_codebook
        elif kind == "mixed":  # the stock path with low-rank factors and the rotated lanes (this step's scales)
            comp = hvd_gradq.Compressor(model.named_parameters(), codec="lowrank", rank={"fc1.weight": 2,
                                        "fc2.weight": 2, "fc3.weight": 9}, transport={"fc3.weight": "allreduce"},
                                        min_elements=256)
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                           named_parameters=model.named_parameters(), compression=comp)
            sync = comp.sync_codebook
        else:
            comp = opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                                        named_parameters=model.named_parameters(), codec="shared_scale",
                                                        bits=4, transport="allreduce")
            sync = opt.sync_codebook
        gaps = []

        def step(i):
            opt.zero_grad()
            loss_of(model, i).backward()
            if kind == "mixed":  # low-rank residuals live in the factored layout: no lane conservation check
                opt.synchronize()
                gaps.append(0.0 if all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()) else 1.0)
            else:
                gaps.append(synchronize_checked(model, opt, lane_residuals(comp), f"join.{kind}.{i}"))
            with opt.skip_synchronize():
                opt.step()

        # ranks run out of data one after another (np = 4: 4, 4, 3, 2, 1 ranks left), rank 0 last
        for i in range(2 + (alone if RANK == 0 else RANK - 1)):
            step(i)
        last = hvd.join()
        sync(root_rank=last)
        hvd.broadcast_parameters(model.state_dict(), root_rank=last)
        for i in range(10, 13):  # everyone again, from one codebook
            step(i)
        return {"gap": gaps, "last": last, "params": gathered(digest(model.parameters()), f"join.{kind}")}

    record("stock", lambda: run("stock"))
    record("dropin", lambda: run("dropin"))
    record("mixed", lambda: run("mixed"))


# ---- audit --------------------------------------------------------------------------------------------
def audit_case():
    def predivide():
        model = MLP()
        comp = hvd_gradq.UniformCompressor(bits=4, named_parameters=model.named_parameters())
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                       named_parameters=model.named_parameters(), compression=comp,
                                       gradient_predivide_factor=3.0)
        gaps = []
        for step in range(4):
            opt.zero_grad()
            loss_of(model, step).backward()
            gaps.append(synchronize_checked(model, opt, comp.error_feedback, f"predivide.{step}"))
            with opt.skip_synchronize():
                opt.step()
        return {"gap": gaps, "packed": sum(info.packed for info in comp.payloads.values())}

    def unnamed(kind: str):
        model = MLP()
        if kind == "stock":
            comp = hvd_gradq.UniformCompressor(bits=4, named_parameters=model.parameters())
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compression=comp)
        else:
            opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), codec="qsgd", bits=4)
        for step in range(3):
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.step()
        return {"params": gathered(digest(model.parameters()), f"unnamed.{kind}")}

    def adasum():
        model = MLP()
        comp = hvd_gradq.UniformCompressor(bits=4, named_parameters=model.named_parameters())
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), compression=comp, op=hvd.Adasum)
        loss_of(model, 0).backward()
        opt.step()
        return {"error": None}

    def unfrozen_later():
        model = MLP()
        model.fc1.weight.requires_grad_(False)
        opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             named_parameters=model.named_parameters())
        for step in range(2):
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.step()
        model.fc1.weight.requires_grad_(True)
        opt.zero_grad()
        loss_of(model, 2).backward()
        opt.step()
        return {"error": None}

    def warning_text():
        model = MLP()
        opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             named_parameters=model.named_parameters())
        loss_of(model, 0).backward()
        opt.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt.step()
        opt.zero_grad()
        loss_of(model, 1).backward()
        try:
            opt.zero_grad()
            zero_grad = None
        except AssertionError as e:
            zero_grad = str(e)
        opt.step()
        return {"warnings": [str(w.message) for w in seen], "zero_grad": zero_grad}

    def torch_state():
        model = MLP()
        opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                             named_parameters=model.named_parameters(), codec="shared_scale", bits=4,
                                             transport="allreduce")
        state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0)
        for step in range(2):
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.step()
        state.commit()
        kept = (digest(model.parameters()), state_digest(opt), {c.name: (c.scale, c.version) for c in opt.codebook})
        for step in range(2, 4):  # steps that a failure would undo
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.step()
        moved = {c.name: (c.scale, c.version) for c in opt.codebook} != kept[2]
        state.restore()
        back = (digest(model.parameters()), state_digest(opt), {c.name: (c.scale, c.version) for c in opt.codebook})
        opt.zero_grad()
        loss_of(model, 2).backward()
        opt.step()  # training goes on from the committed state, on every rank alike
        return {"moved": moved, "restored": back == kept, "params": gathered(digest(model.parameters()), "ts")}

    def duplicate_names():
        model = MLP()
        named = [("w", p) for p in model.parameters()]
        out = {}
        for kind, make in (("horovod", lambda: hvd.DistributedOptimizer(
                               torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named)),
                           ("compressor", lambda: hvd_gradq.UniformCompressor(bits=4, named_parameters=named)),
                           ("dropin", lambda: hvd_gradq.DistributedOptimizer(
                               torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named))):
            try:
                make()
                out[kind] = None
            except ValueError as e:
                out[kind] = str(e)
        return out

    record("predivide", predivide)
    record("duplicate_names", duplicate_names)
    record("unnamed.stock", lambda: unnamed("stock"))
    record("unnamed.dropin", lambda: unnamed("dropin"))
    record("warning_text", warning_text)
    record("torch_state", torch_state)
    record("unfrozen_later", unfrozen_later)
    record("adasum", adasum)  # last: Horovod's Adasum optimizer leaves handles behind when it fails


{"resume": resume_case, "size_one": size_one_case, "sparse": sparse_case, "join": join_case,
 "audit": audit_case}[args.case]()
Path(args.out, f"{args.case}-rank{RANK}.json").write_text(json.dumps(report))
hvd.barrier()
sys.exit(0)
