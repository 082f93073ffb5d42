"""Worker for tests/test_horovodrun.py: runs under horovodrun, writes one JSON file per rank.

Cases:
  equivalence   two steps of plain SGD (lr=1) with and without the compressor from the same
                weights and data; records, per layer, the decoded update against the true mean
                gradient and the quantization error bound, and what was handed to Horovod.
  op_mismatch   compressor built for op=Sum, optimizer left at its default op=Average.
  bits_mismatch rank 0 uses 2 bits, the others 4.
  seed_mismatch rank 0 rotates with seed 0, the others with seed 1 (another rotation).
  nonfinite     rank 1's loss is NaN at step 2 (after the float32 calibration step and one packed
                step): every rank must see NaN gradients, and the next finite step must go on
                normally from the residuals of the last finite step.
  nonfinite_dropin   the same through hvd_gradq.DistributedOptimizer (--codec on --transport) with
                an AMP GradScaler (CPU): every rank sees NaN after synchronize, the scaler skips the
                step on every rank and halves its scale, residuals and codebook (scales, block RMS,
                levels) stay as they were (the reduction counts advance by one, as at every step),
                and the next step trains on.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

import hvd_gradq
from hvd_gradq.bits.rotation import rotate, step_key
from hvd_gradq.codecs.rotated import clip_scales
from workloads.datasets import fashion_mnist
from workloads.models import FashionCNN

ap = argparse.ArgumentParser()
ap.add_argument("--case", required=True)
ap.add_argument("--bits", type=int, default=2)
ap.add_argument("--op", choices=["sum", "average"], default="sum")
ap.add_argument("--rotation", type=int, default=4096, help="the compressor's rotation (0: unrotated lanes)")
ap.add_argument("--codec", default="rotated")
ap.add_argument("--transport", default="allreduce")
ap.add_argument("--out", required=True)
args = ap.parse_args()

hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)
rank, size = hvd.rank(), hvd.size()
out = Path(args.out) / f"rank{rank}.json"
x_all, y_all = fashion_mnist("test")


def batch(step):
    i = (step * size + rank) * 32
    return x_all[i:i + 32], y_all[i:i + 32]


def backward(model, opt, step):
    xb, yb = batch(step)
    opt.zero_grad()
    F.cross_entropy(model(xb), yb).backward()


op = hvd.Sum if args.op == "sum" else hvd.Average
model_c = FashionCNN(width=8)
named_c = [("c." + n, p) for n, p in model_c.named_parameters()]

if args.case in ("op_mismatch", "bits_mismatch", "seed_mismatch"):
    if args.case == "op_mismatch":
        comp = hvd_gradq.UniformCompressor(bits=args.bits, named_parameters=named_c, op=hvd.Sum)
        opt_op = hvd.Average
    elif args.case == "bits_mismatch":
        comp = hvd_gradq.UniformCompressor(bits=2 if rank == 0 else 4, named_parameters=named_c, op=op)
        opt_op = op
    else:
        comp = hvd_gradq.UniformCompressor(bits=2, named_parameters=named_c, op=op, seed=0 if rank == 0 else 1)
        opt_op = op
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model_c.parameters(), lr=0.1),
                                   named_parameters=named_c, compression=comp, op=opt_op)
    try:
        for step in range(3):
            backward(model_c, opt, step)
            opt.step()
    except Exception as e:  # record what this rank saw, then let it end the job
        out.write_text(json.dumps({"rank": rank, "error": type(e).__name__, "message": str(e), "step": step}))
        raise
    out.write_text(json.dumps({"rank": rank, "error": None}))
    sys.exit(0)

if args.case == "nonfinite":
    comp = hvd_gradq.UniformCompressor(bits=args.bits, named_parameters=named_c, op=op)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model_c.parameters(), lr=0.1),
                                   named_parameters=named_c, compression=comp, op=op)
    for step in range(2):
        backward(model_c, opt, step)
        opt.step()
    residuals = {n: r.clone() for n, r in comp.error_feedback.residuals.items()}
    xb, yb = batch(2)
    opt.zero_grad()
    loss = F.cross_entropy(model_c(xb), yb)
    (loss * float("nan") if rank == 1 else loss).backward()
    opt.synchronize()  # the aggregated gradients, without applying them
    all_nan = all(bool(torch.isnan(p.grad).all()) for _, p in named_c)
    kept = all(torch.equal(residuals[n], comp.error_feedback.residuals[n]) for n in residuals)
    opt.zero_grad()
    backward(model_c, opt, 3)
    opt.step()
    finite = all(bool(torch.isfinite(p).all()) for p in model_c.parameters())
    digest = torch.tensor([sum(p.double().sum().item() for p in model_c.parameters())], dtype=torch.float64)
    out.write_text(json.dumps({"rank": rank, "all_nan": all_nan, "residuals_kept": kept, "n_residuals": len(residuals),
                               "finite_after": finite,
                               "digests": hvd.allgather(digest, name="check.digest").tolist()}))
    sys.exit(0)

if args.case == "nonfinite_dropin":
    opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model_c.parameters(), lr=0.1), named_parameters=named_c,
                                         op=op, codec=args.codec, bits=args.bits, transport=args.transport,
                                         min_elements=512)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def amp_step(step, poison=False):
        xb, yb = batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model_c(xb), yb)
        scaler.scale(loss * float("nan") if poison else loss).backward()
        opt.synchronize()
        nan = all(bool(torch.isnan(p.grad).all()) for _, p in named_c)
        scaler.unscale_(opt)
        with opt.skip_synchronize():
            scaler.step(opt)
        scaler.update()
        return nan

    def snapshot():
        ex = opt.gradient_exchange
        residuals = [t.clone() for kind in ("worker", "server", "zero_bit", "lanes")
                     for _, t in sorted(getattr(ex.residuals, kind).residuals.items())]
        codes = [(c.name, c.version, c.scale, None if c.block_rms is None else c.block_rms.clone(), c.codec_key)
                 for c in sorted(opt.codebook, key=lambda c: c.name)]
        return residuals, codes, [p.detach().clone() for _, p in named_c]

    for step in range(2):
        amp_step(step)
    residuals, codes, params = snapshot()
    scale = scaler.get_scale()
    all_nan = amp_step(2, poison=rank == 1)
    residuals2, codes2, params2 = snapshot()

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    def same_code(a, b):
        x, y = a[3], b[3]
        rms_same = (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        return (a[0], a[2], a[4]) == (b[0], b[2], b[4]) and rms_same  # name, scale, levels; RMS per block

    codes_same = len(codes) == len(codes2) and all(same_code(a, b) for a, b in zip(codes, codes2))
    halved = scaler.get_scale() == scale / 2
    transports = sorted({plan.transport for plan in opt.gradient_exchange.plans.values()})
    amp_step(3)
    finite = all(bool(torch.isfinite(p).all()) for p in model_c.parameters()) and scaler.get_scale() == scale / 2
    digest = torch.tensor([sum(p.double().sum().item() for p in model_c.parameters())], dtype=torch.float64)
    out.write_text(json.dumps({"rank": rank, "all_nan": all_nan, "residuals_kept": same(residuals, residuals2),
                               "n_residuals": len(residuals), "codebook_kept": codes_same,
                               "versions_advanced": sorted({b[1] - a[1] for a, b in zip(codes, codes2)}),
                               "skipped": same(params, params2), "scale_halved": halved, "finite_after": finite,
                               "transports": transports,
                               "digests": hvd.allgather(digest, name="check.digest").tolist()}))
    sys.exit(0)

assert args.case == "equivalence", args.case
model_u = copy.deepcopy(model_c)
named_u = [("u." + n, p) for n, p in model_u.named_parameters()]
opt_u = hvd.DistributedOptimizer(torch.optim.SGD(model_u.parameters(), lr=1.0), named_parameters=named_u, op=op)
comp = hvd_gradq.UniformCompressor(bits=args.bits, named_parameters=named_c, op=op, rotation=args.rotation)
opt_c = hvd.DistributedOptimizer(torch.optim.SGD(model_c.parameters(), lr=1.0),
                                 named_parameters=named_c, compression=comp, op=op)

# step 0: every layer's first step is sent as float32 (it calibrates the shared scale)
for model, opt in ((model_u, opt_u), (model_c, opt_c)):
    backward(model, opt, 0)
    opt.step()
step0_diff = max((pu - pc).abs().max().item() for pu, pc in zip(model_u.parameters(), model_c.parameters()))
step0_float = all(not info.packed for info in comp.payloads.values())

# step 1: packed codes for every layer with >= min_elements elements
backward(model_u, opt_u, 1)
opt_u.step()
backward(model_c, opt_c, 1)
local = {n: p.grad.detach().clone().view(-1) for n, p in named_c}
scales = {n: comp.codebook[n].scale for n, _ in named_c}
codes = {n: copy.deepcopy(comp.codebook[n]) for n, _ in named_c}  # before decode moves the scales
before = {n: p.detach().clone().view(-1) for n, p in named_c}
opt_c.step()

layers = {}
for (n, p), pu in zip(named_c, model_u.parameters()):
    info = comp.payloads[n]
    gathered = hvd.allgather(local[n].view(1, -1), name=f"check.{n}")  # (N, numel), uncompressed
    # Horovod's op: the compressed gradient is the sum over ranks for Sum, the mean for Average
    agg = (lambda t: t.sum(0)) if op == hvd.Sum else (lambda t: t.mean(0))
    target = agg(gathered)
    decoded = before[n] - p.detach().view(-1)
    tol = 1e-5 + 1e-6 * before[n].abs()
    code = codes[n]
    if info.packed and code.rotation:
        # rotated lanes: per rank, |y - level| <= step/2 + what the clip cut, elementwise in the
        # rotated domain; the rotation keeps norms, so the error norm of the aggregate is at most
        # the aggregate of the ranks' error norms (triangle inequality)
        clip = clip_scales(code.block_rms, args.bits).repeat_interleave(code.rotation)
        per_rank = []
        for g in gathered:
            y = rotate(g, step_key(code.rotation_key, code.version), code.rotation)
            per_rank.append(float((clip / ((1 << args.bits) - 1) + (y.abs() - clip).clamp(min=0)).norm()))
        bound_norm = sum(per_rank) / (1 if op == hvd.Sum else size)
        err_norm = float((decoded - target).norm())
        layers[n] = {
            "numel": p.numel(), "packed": True, "dtype": str(info.dtype), "nbytes": info.nbytes,
            "predicted": comp.payload_bytes(p.numel(), True), "rotated": True,
            "err": err_norm, "bound_max": bound_norm,
            "violation": err_norm - bound_norm - float(tol.norm()),
            "vs_uncompressed": float((p.detach().view(-1) - pu.detach().view(-1)).norm()) - bound_norm - 1e-4,
            "rel_err": err_norm / max(float(target.norm()), 1e-30),
        }
        continue
    if info.packed:
        s = scales[n]
        delta = 2 * s / ((1 << args.bits) - 1)
        bound = agg(delta + (gathered.abs() - s).clamp(min=0))
    else:
        bound = torch.zeros_like(target)
    err = (decoded - target).abs()
    layers[n] = {
        "numel": p.numel(), "packed": info.packed, "dtype": str(info.dtype), "nbytes": info.nbytes,
        "predicted": comp.payload_bytes(p.numel(), info.packed),
        "err": err.max().item(), "bound_max": bound.max().item(),
        "violation": (err - bound - tol).max().item(),
        # the compressed run against the uncompressed one, after both took step 1
        "vs_uncompressed": ((p.detach().view(-1) - pu.detach().view(-1)).abs() - bound - 1e-4).max().item(),
    }
digest = torch.tensor([sum(p.double().sum().item() for p in model_c.parameters())], dtype=torch.float64)
digests = hvd.allgather(digest, name="check.digest").tolist()
out.write_text(json.dumps({"rank": rank, "size": size, "step0_diff": step0_diff, "step0_float": step0_float,
                           "layers": layers, "digests": digests, "wire_ratio": comp.wire_stats().ratio}))
