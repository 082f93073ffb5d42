"""Worker for tests/test_transport.py: runs under horovodrun, writes one JSON file per rank.

Cases:
  exchange   hvd_gradq.DistributedOptimizer on an MLP whose layers get 0, 2, 4 and 8 bits (and a
             float32 layer), for each transport forced and for auto, with the uniform, qsgd and
             jointsq codecs. Per layer and step it records: conservation of error feedback (sum of
             what entered = decoded sum + what the residuals kept), the codec error against an
             L-inf bound, measured vs predicted payload bytes, and a digest of the aggregate
             (every rank must hold the same bits). With np=4 it also runs two process sets.
  optim      Horovod-style optimizer checks with compression, for the stock optimizer with
             UniformCompressor and for the drop-in: every torch.optim optimizer, backward passes
             per step = 2, groups, a layer unused on one rank, dynamic requires_grad, and the
             clear errors for Adasum; sparse gradients with and without sparse_as_dense.
  version_mismatch / bits_mismatch / rotation_mismatch / lowrank_seed_mismatch   one rank's codebook
             differs (its version, a layer's bits, the rotation block of gathered rotated codes, the
             first Q of low-rank factors): every rank must raise.
  levels_mismatch   after the first step's per-type ALQ fit, rank 1 holds other levels for the
             weights' type: every rank must raise at the second step.
  bits_mismatch_lanes / bits_mismatch_two_phase   the bits differ on the rotated lanes / the
             two-phase transport; transport_mismatch / transport_mismatch_lanes   rank 0 gathers where
             the others reduce in two phases / sums lanes where the others gather: every rank must raise.
  step_mismatch   with an allocator, rank 1's step count runs one ahead after the first step: the
             trigger verdict's step cross-check stops every rank at the same step.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from owed import owed  # tests/workers/owed.py, next to this script

import hvd_gradq
from hvd_gradq.bits.rotation import rotate, step_key
from hvd_gradq.codecs.rotated import GAUSSIAN_NMSE, clip_scales
from workloads.datasets import fashion_mnist

ap = argparse.ArgumentParser()
ap.add_argument("--case", required=True)
ap.add_argument("--out", required=True)
args = ap.parse_args()

torch.set_num_threads(1)
x_all, y_all = fashion_mnist("test")
BITS = {"fc1.weight": 8, "fc2.weight": 0, "fc3.weight": 2, "fc4.weight": 4}


class MLP(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(784, 32)  # 25088: 8 bits
        self.fc2 = torch.nn.Linear(32, 64)  # 2048: 0 bits
        self.fc3 = torch.nn.Linear(64, 64)  # 4096: 2 bits
        self.fc4 = torch.nn.Linear(64, 48)  # 3072: 4 bits
        self.fc5 = torch.nn.Linear(48, 10)  # 480: float32

    def forward(self, x, skip=()):
        h = x.view(x.shape[0], -1)
        for name in ("fc1", "fc2", "fc3", "fc4"):
            if name not in skip:
                h = torch.relu(getattr(self, name)(h))
            elif name == "fc2":
                h = torch.zeros(h.shape[0], 64)
        return self.fc5(h)


def batch(step, rank, size, n=32):
    i = ((step * size + rank) * n) % (len(x_all) - n)
    return x_all[i:i + n], y_all[i:i + n]


def digest(tensors):
    t = torch.cat([x.detach().reshape(-1).double() for x in tensors])
    return float((t * torch.arange(1, t.numel() + 1, dtype=torch.float64).sin()).sum())


def server_residual(ex, name, sf):
    """This rank's two-phase (server) residual of layer ``name`` placed in a layer-sized vector."""
    full = torch.zeros(ex.plans[name].numel)
    coder = ex.coders.get(name)
    if coder is not None and name in sf:
        full[coder.bounds[coder.rank]:coder.bounds[coder.rank + 1]] = sf[name]
    return full


def exchange_case(out, ps, tag):
    size = ps.size()
    configs = [
        ("shared_scale", "allreduce"), ("shared_scale", "allgather"), ("shared_scale", "two_phase"),
        ("shared_scale", "auto"), ("rotated", "allreduce"), ("rotated", "auto"),
        ("rotated", "allgather"), ("rotated", "two_phase"),
        ("qsgd", "allgather"), ("qsgd", "two_phase"), ("jointsq", "allgather"), ("jointsq", "two_phase"),
    ]
    if ps != hvd.global_process_set:  # process sets: one config per transport
        configs = [("shared_scale", "allreduce"), ("rotated", "allreduce"), ("qsgd", "allgather"),
                   ("qsgd", "two_phase")]
    results = []
    for codec, transport in configs:
        model = MLP()
        ref = copy.deepcopy(model)  # same weights, no hooks: gives this rank's local gradients
        opt = hvd_gradq.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05), named_parameters=model.named_parameters(),
            op=hvd.Sum, process_set=ps, codec=codec, bits=BITS if codec != "jointsq" else {"fc2.weight": 0},
            ratio=20 if codec == "jointsq" else None, transport=transport, bucket_size=512, error_feedback=True,
        )
        ex = opt.gradient_exchange
        layers = {}
        for step in range(3):
            xb, yb = batch(step, hvd.rank(), hvd.size())
            ref.load_state_dict(model.state_dict())
            ref.zero_grad()
            F.cross_entropy(ref(xb), yb).backward()
            # what enters the exchange: gradient + this rank's residual (worker), server residual
            wf, sf, lf = ex.residuals.worker.residuals, ex.residuals.server.residuals, ex.residuals.lanes.residuals
            entered = {}
            for n, p in ref.named_parameters():
                g = p.grad.reshape(-1).clone()
                r = lf.get(n) if ex.plans[n].transport == "allreduce" else wf.get(n)
                entered[n] = (g + r if r is not None else g, server_residual(ex, n, sf))
            scales = {n: ex.codebook[n].scale for n in entered}
            codes = {n: copy.deepcopy(ex.codebook[n]) for n in entered}  # before decode moves the scales
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.synchronize()
            # one allgather per step: per layer [entered x, server residual in, kept, server kept, aggregate]
            local, spans = [], {}
            offset = 0
            for n, p in model.named_parameters():
                agg = p.grad.reshape(-1).clone()
                transport_ = ex.plans[n].transport
                kept = (wf if transport_ in ("allgather", "two_phase") else lf).get(n, torch.zeros_like(agg))
                if transport_ not in ("allgather", "two_phase", "allreduce"):
                    kept = torch.zeros_like(agg)
                parts = [entered[n][0], entered[n][1], kept, server_residual(ex, n, sf), agg]
                local += [t.reshape(-1).float() for t in parts]
                spans[n] = (offset, agg.numel())
                offset += 5 * agg.numel()
            table = hvd.allgather(torch.cat(local).view(1, -1), name=f"{tag}.check", process_set=ps)  # (N, L)
            for n in spans:
                plan = ex.plans[n]
                o, k = spans[n]
                x_all_ranks, s_in, kept_all, s_out, aggs = (table[:, o + i * k:o + (i + 1) * k] for i in range(5))
                s_in, kept_all, s_out, agg = s_in.sum(0), kept_all.sum(0), s_out.sum(0), aggs[0]
                total_in = x_all_ranks.sum(0) + s_in
                total_out = agg + kept_all + s_out
                scale_ref = x_all_ranks.abs().sum(0).max().item() + 1e-12
                info = {"transport": plan.transport, "bits": plan.bits, "codec": plan.codec,
                        "payload": plan.payload_bytes, "predicted": plan.predicted.payload_bytes,
                        "identical": bool((aggs == agg).all())}
                if plan.transport == "none":
                    info["nonzero"] = int((agg != 0).sum())
                else:
                    info["conservation"] = (total_out - total_in).abs().max().item() / scale_ref
                err = (agg - x_all_ranks.sum(0) - s_in).abs()
                code = codes[n]
                if plan.transport == "allreduce" and scales[n] is not None and step > 0 and code.rotation:
                    # rotated lanes: a norm bound (per rank, step/2 + what the clip cut, in the rotated
                    # domain, where norms are kept; the triangle inequality over ranks)
                    # this step's scales (the drop-in's default) are set while coding; else last step's
                    rms = ex.codebook[n].block_rms if code.codec_key == "scales=this_step" else code.block_rms
                    clip = clip_scales(rms, plan.bits).repeat_interleave(code.rotation)
                    bound = 0.0
                    for x in x_all_ranks:
                        y = rotate(x, step_key(code.rotation_key, code.version), code.rotation)
                        bound += float((clip / ((1 << plan.bits) - 1) + (y.abs() - clip).clamp(min=0)).norm())
                    info["bound_violation"] = float(err.norm()) - bound - 1e-5 * err.numel() ** 0.5
                    info["rotated"] = True
                elif plan.transport == "allreduce" and scales[n] is not None and step > 0:
                    s = scales[n]
                    delta = 2 * s / ((1 << plan.bits) - 1)
                    bound = (delta + (x_all_ranks.abs() - s).clamp(min=0)).sum(0)
                    info["bound_violation"] = (err - bound - 1e-5).max().item()
                elif codec == "rotated" and plan.transport in ("allgather", "two_phase"):
                    # each rank's own rotated code: a norm bound of twice the code's RMS error on
                    # Gaussian data per rank (rotation makes every input near-Gaussian), plus the
                    # requantized chunk sums in the two-phase exchange
                    rel = 2 * GAUSSIAN_NMSE[plan.bits] ** 0.5
                    bound = rel * float(x_all_ranks.norm(dim=1).sum())
                    if plan.transport == "two_phase":
                        bound += rel * float((x_all_ranks.sum(0) + s_in).norm())
                    info["bound_violation"] = float(err.norm()) - bound - 1e-5
                    info["rotated_gather"] = True
                elif codec == "shared_scale" and plan.transport in ("allgather", "two_phase"):
                    m = (1 << (plan.bits - 1)) - 1  # qsgdinf: gaps of 1/m of the bucket maximum
                    pad = (-agg.numel()) % 512
                    xb_ = F.pad(x_all_ranks.abs(), (0, pad)).view(size, -1, 512).amax(2)  # (N, buckets)
                    per = xb_.sum(0).repeat_interleave(512)[:agg.numel()] / m
                    bound = per * (2 if plan.transport == "two_phase" else 1)
                    if plan.transport == "two_phase":
                        sp = F.pad(s_in.abs(), (0, pad)).view(-1, 512).amax(1).repeat_interleave(512)[:agg.numel()]
                        bound = bound + sp / m
                    info["bound_violation"] = (err - bound - 1e-5).max().item()
                info["err_max"] = err.max().item()
                layers.setdefault(n, []).append(info)
            with opt.skip_synchronize():
                opt.step()
        results.append({"codec": codec, "transport": transport, "layers": layers,
                        "summary": opt.transport_summary(),
                        "params": hvd.allgather(torch.tensor([digest(model.parameters())], dtype=torch.float64),
                                                name=f"{tag}.pd", process_set=ps).tolist()})
    out.write_text(json.dumps({"rank": hvd.rank(), "size": size, "results": results}))


def stock_process_set_case(out, ps):
    """The stock optimizer with UniformCompressor(process_set=ps): packed lanes sized for the set."""
    model = MLP()
    comp = hvd_gradq.UniformCompressor(bits=2, named_parameters=model.named_parameters(), op=hvd.Sum,
                                       process_set=ps)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), compression=comp, op=hvd.Sum,
                                   process_set=ps)
    for step in range(3):
        xb, yb = batch(step, hvd.rank(), hvd.size())
        opt.zero_grad()
        (F.cross_entropy(model(xb), yb) / ps.size()).backward()
        opt.step()
    packed = {n: info.packed for n, info in comp.payloads.items()}
    lanes = {n: code.layout.lane_bits for n, code in comp.codebook.layers.items() if code.layout is not None}
    out.write_text(json.dumps({
        "packed": packed, "lane_bits": lanes,
        "digest": hvd.allgather(torch.tensor([digest(model.parameters())], dtype=torch.float64),
                                name="stock_ps.digest", process_set=ps).tolist()}))


def reference_check(kind, opt, comp, before, model, plain, ref):
    """One step's aggregate against uncompressed Horovod at the same weights and data.

    ``plain`` (no hooks) holds this rank's local gradient (summed over the step's passes), ``ref``
    the uncompressed average of hvd.DistributedOptimizer, ``model`` its own after ``opt.synchronize()``;
    ``before``: the stock compressor's residuals and scales the step started from. Returns per layer the largest
    excess of the error over the codec's bound (<= 0 passes). The drop-in (QSGDinf, 4 bits, no error
    feedback) codes each rank's gradient with gaps of at most max|g_r| / 7, and a two-phase chunk sum
    again with gaps of its own max / 7; the stock lanes (one scale s per layer, stochastic rounding,
    error feedback) code x_r = g_r + e_r with gaps 2s / 15 and clip at s, so what they average is
    compared with the reference plus the mean residual; small layers and the calibration step go as
    float32 (exact up to rounding)."""
    size = hvd.size()
    params, local, agg = (dict(m.named_parameters()) for m in (model, plain, ref))
    names = [n for n, p in params.items() if p.requires_grad and p.grad is not None]
    xs_local, es_local = [], []
    for n in names:
        g = local[n].grad
        e = before.get(n, torch.zeros(params[n].numel())).reshape(-1)  # zeros on the drop-in: no error feedback
        xs_local.append((torch.zeros(params[n].numel()) if g is None else g.reshape(-1)) + e)
        es_local.append(e)
    table = hvd.allgather(torch.cat(xs_local + es_local).view(1, -1), name=f"optim.refcheck.{kind}")
    total = table.shape[1] // 2
    excess, offset = {}, 0
    for n in names:
        k = params[n].numel()
        xs, es = table[:, offset:offset + k], table[:, total + offset:total + offset + k]  # (N, k) each
        offset += k
        err = (params[n].grad.reshape(-1) - agg[n].grad.reshape(-1) - es.mean(0)).abs()
        tol = 1e-6 * float(xs.abs().max()) + 1e-9
        if kind == "dropin":
            peaks = xs.abs().amax(1)  # max |g_r|
            transport = opt.gradient_exchange.plans[n].transport
            bound = 0.0 if transport == "float32" else float(peaks.sum()) / 7 / size
            if transport == "two_phase":
                bound += float(peaks.sum()) * (8 / 7) / 7 / size
        else:
            s = before.get(("scale", n))  # None: the layer went as float32 (small, or calibrating)
            bound = 0.0 if s is None else (2 * s / 15 + (xs.abs() - s).clamp(min=0)).mean(0)
        excess[n] = float((err - bound - tol).max())
    return excess


def optim_case(out):
    rank, size = hvd.rank(), hvd.size()
    report = {"rank": rank}

    def make(kind, model, opt, codec_kw=None, **kw):
        if kind == "stock":
            comp = hvd_gradq.UniformCompressor(bits=4, named_parameters=model.named_parameters(), op=hvd.Average,
                                               rotation=0)
            return hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp,
                                            **kw), comp
        coding = {"codec": "qsgdinf", "bits": 4, **(codec_kw or {})}
        return hvd_gradq.DistributedOptimizer(opt, named_parameters=model.named_parameters(), bucket_size=512,
                                              **coding, **kw), None

    def train(kind, opt_fn, steps=3, skip_on=None, bpps=1, freeze_at=None, groups_fn=None, codec_kw=None,
              check=True, conserve=False, **kw):
        model = MLP()
        if groups_fn is not None:
            kw["groups"] = groups_fn(model)
        opt, comp = make(kind, model, opt_fn(model.parameters()), codec_kw=codec_kw, backward_passes_per_step=bpps,
                         **kw)
        tag = f"{kind}{len(report)}"
        plain, ref = MLP(), MLP()  # this rank's local gradients; the uncompressed Horovod aggregate
        ref_opt = hvd.DistributedOptimizer(torch.optim.SGD(ref.parameters(), lr=0.0),
                                           named_parameters=[(f"ref.{tag}.{n}", p) for n, p in ref.named_parameters()],
                                           backward_passes_per_step=bpps)
        start = [p.detach().clone() for p in model.parameters()]
        frozen_before = None
        worst: dict[str, float] = {}
        for step in range(steps):
            if freeze_at is not None and step == freeze_at:
                for m in (model, plain, ref):
                    m.fc3.weight.requires_grad_(False)
                frozen_before = model.fc3.weight.detach().clone()
            skip = ("fc2",) if skip_on is not None and rank == skip_on else ()
            batches = [batch(step * bpps + k, rank, size) for k in range(bpps)]
            if check or conserve:  # at these weights: this rank's own gradient, the uncompressed aggregate
                if conserve:  # every codec, error feedback on: what the ranks' residuals owe before the step
                    held = [(n, p) for n, p in model.named_parameters() if n not in opt.gradient_exchange.lowrank]
                    before = owed(opt.gradient_exchange, held)
                else:  # the stock lanes' residuals and scales the step starts from
                    before = {} if comp is None else {
                        **{n: r.clone() for n, r in comp.error_feedback.residuals.items()},
                        **{("scale", c.name): c.scale for c in comp.codebook if c.packed}}
                plain.load_state_dict(model.state_dict())
                ref.load_state_dict(model.state_dict())
                plain.zero_grad()
                ref_opt.zero_grad()
                for xb, yb in batches:
                    F.cross_entropy(plain(xb, skip=skip), yb).backward()
                    F.cross_entropy(ref(xb, skip=skip), yb).backward()
                ref_opt.synchronize()
            opt.zero_grad()
            for xb, yb in batches:
                F.cross_entropy(model(xb, skip=skip), yb).backward()
            if not (check or conserve):
                opt.step()
                continue
            opt.synchronize()
            if conserve:  # the aggregate = the uncompressed one + the mean of what the residuals paid
                paid = hvd.allreduce(before - owed(opt.gradient_exchange, held), op=hvd.Average,
                                     name=f"optim.paid.{tag}.{step}")
                agg = dict(ref.named_parameters())
                applied = torch.cat([p.grad.reshape(-1) for _, p in held])
                expected = torch.cat([agg[n].grad.reshape(-1) for n, _ in held]) + paid
                worst["conservation"] = max(worst.get("conservation", 0.0), float(
                    (applied - expected).abs().max() / expected.abs().max()))
            else:
                for n, e in reference_check(kind, opt, comp, before, model, plain, ref).items():
                    worst[n] = max(worst.get(n, -float("inf")), e)
            with opt.skip_synchronize():
                opt.step()
        moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(model.parameters(), start))
        res = {"moved": moved, "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
               "digest": hvd.allgather(torch.tensor([digest(model.parameters())], dtype=torch.float64),
                                       name=f"optim.{kind}.{len(report)}").tolist()}
        if check:
            res["bound_excess"] = worst
        if conserve:
            res["conservation"] = worst["conservation"]
        if frozen_before is not None:
            res["frozen_unchanged"] = bool(torch.equal(frozen_before, model.fc3.weight.detach()))
        return res

    optimizers = {
        "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
        "Adadelta": lambda ps: torch.optim.Adadelta(ps),
        "Adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-3),
        "ASGD": lambda ps: torch.optim.ASGD(ps, lr=1e-2),
        "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-3),
        "RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-3),
        "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
        "Rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-3),
    }
    sgd = optimizers["SGD"]
    for kind in ("stock", "dropin"):
        for name, fn in optimizers.items():
            report[f"{kind}.{name}"] = train(kind, fn)
        report[f"{kind}.bpps2"] = train(kind, sgd, bpps=2)
        report[f"{kind}.groups2"] = train(kind, sgd, groups=2)
        report[f"{kind}.unused_on_rank1"] = train(kind, sgd, skip_on=1)
        report[f"{kind}.freeze"] = train(kind, lambda ps: torch.optim.SGD(ps, lr=0.05), steps=4, freeze_at=2)
        report[f"{kind}.groups_list"] = train(
            kind, sgd, groups_fn=lambda m: [[m.fc1.weight, m.fc1.bias], [m.fc3.weight]])
    # the drop-in sums decoded float32: gradient_predivide_factor changes nothing (the stock path's in compat_check)
    report["dropin.predivide3"] = train("dropin", sgd, check=False, gradient_predivide_factor=3.0)
    # every codec through the drop-in (auto transport), two steps
    from hvd_gradq.plan.planner import CODECS, RATIO_CODECS

    for codec in CODECS:
        report[f"dropin.codec.{codec}"] = train(  # error feedback on: conservation against plain Horovod
            "dropin", sgd, steps=2, check=False, conserve=True,
            codec_kw={"codec": codec, "bits": 2 if codec == "terngrad" else 3, "error_feedback": True,
                      "ratio": 50 if codec in RATIO_CODECS else None})
    link = hvd_gradq.measure_link()
    report["link"] = hvd.allgather(torch.tensor([[link.latency_s, link.bandwidth]], dtype=torch.float64),
                                   name="optim.link").tolist()
    report["dropin.measured_link"] = train("dropin", sgd, steps=2, check=False, codec_kw={"link": "measure"})
    m = MLP()
    errors = {}
    for label, fn in {
        "adasum": lambda: hvd_gradq.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                                         named_parameters=m.named_parameters(), op=hvd.Adasum),
        "stock_adasum": lambda: hvd_gradq.UniformCompressor(bits=2, named_parameters=m.named_parameters(),
                                                            op=hvd.Adasum),
        "compression_arg": lambda: hvd_gradq.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
            compression=hvd.Compression.fp16),
        "allreduce_for_qsgd": lambda: hvd_gradq.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(), codec="qsgd",
            transport="allreduce"),
        "predivide_with_sum": lambda: hvd_gradq.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(), op=hvd.Sum,
            gradient_predivide_factor=2.0),
        "unknown_layer": lambda: hvd_gradq.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(), bits={"conv.*": 2}),
    }.items():
        try:
            fn()
            errors[label] = None
        except ValueError as e:
            errors[label] = str(e)
    # sparse gradients: coded like any layer, with or without sparse_as_dense
    for sad in (False, True):
        emb = torch.nn.Embedding(2000, 16, sparse=True)
        opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1),
                                             named_parameters=emb.named_parameters(), sparse_as_dense=sad)
        try:
            emb(torch.tensor([1, 2, 3 + rank])).sum().backward()
            opt.step()
            errors[f"sparse_as_dense={sad}"] = None
            errors["sparse_digest"] = hvd.allgather(torch.tensor([digest(emb.parameters())], dtype=torch.float64),
                                                    name="optim.sparse").tolist()
        except ValueError as e:
            errors[f"sparse_as_dense={sad}"] = str(e)
            opt._handles.clear()  # Horovod's pending handles: the next optimizer starts clean
    report["errors"] = errors
    out.write_text(json.dumps(report))


def mismatch_case(out, case):
    rank = hvd.rank()
    model = MLP()
    bits = 2 if (case.startswith("bits_mismatch") and rank == 0) else 4
    # rotation_mismatch: rank 0 gathers rotated codes with rotation blocks of up to 4096, the others 1024
    coding = {"codec": "rotated", "rotation": 4096 if rank == 0 else 1024} if case == "rotation_mismatch" else \
        {"codec": "qsgd"}
    coding["transport"] = "allgather"
    if case == "bits_mismatch_lanes":  # the summed lanes of the rotated code
        coding = {"codec": "rotated", "transport": "allreduce"}
    if case == "bits_mismatch_two_phase":
        coding = {"codec": "qsgd", "transport": "two_phase"}
    if case == "transport_mismatch":  # rank 0 gathers, the others reduce in two phases
        coding = {"codec": "qsgd", "transport": "allgather" if rank == 0 else "two_phase"}
    if case == "transport_mismatch_lanes":  # rank 0 sums lanes, the others gather
        coding = {"codec": "shared_scale", "transport": "allreduce" if rank == 0 else "allgather"}
    if case == "lowrank_seed_mismatch":  # low-rank factors whose warm start differs: rank 0's seed is another
        coding = {"codec": "lowrank", "rank": 2, "seed": 1 if rank == 0 else 0}
    if case == "lowrank_rank_mismatch":  # rank 2 factors on rank 0, rank 3 on the others: P's shapes differ
        coding = {"codec": "lowrank", "rank": 2 if rank == 0 else 3}
    if case == "lowrank_factors_mismatch":  # float16 Q on rank 0 only: the codebook digest (and the tall fc2's
        # orientation) differ
        coding = {"codec": "lowrank", "rank": 2, "factors": "float16" if rank == 0 else "float32"}
    if case == "step_mismatch":  # an allocator: rank 0's trigger verdict goes out every step, with the step
        coding = {"codec": "qsgd", "allocator": hvd_gradq.Allocator(
            3.0, metric="mse", options=(2, 4), probe=hvd_gradq.LossProbe(model, F.cross_entropy, [batch(99, 0, 1)]))}
    if case == "levels_mismatch":  # ALQ levels fitted per layer type after every step; rank 1 then holds
        # another level set for the weights' type than the one rank 0 fitted and shared
        coding = {"codec": "alq", "level_groups": hvd_gradq.layer_types(model), "refit_levels": 1}
    opt = hvd_gradq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                         named_parameters=model.named_parameters(), bits=bits, **coding)
    if case == "version_mismatch" and rank == 1:
        opt.codebook.version += 1
    step = 0
    try:
        for step in range(3):
            xb, yb = batch(step, rank, hvd.size())
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            if case == "step_mismatch" and rank == 1 and step == 0:  # as if rank 1 had stepped once more
                opt.compressor._step += 1
            if case == "levels_mismatch" and rank == 1:
                exchange, types = opt.gradient_exchange, hvd_gradq.layer_types(model)
                held = {name: {"levels": torch.cat([coder.codec.levels[:-1] * 0.97, coder.codec.levels[-1:]])}
                        for name, coder in exchange.coders.items()
                        if types[name] == "linear" and hasattr(coder.codec, "levels")}
                assert held, "no ALQ-coded linear layer to alter"
                exchange.set_levels({"levels": held, "groups": exchange.level_fit})
    except Exception as e:  # record what this rank saw, then let it end the job
        out.write_text(json.dumps({"rank": rank, "error": type(e).__name__, "message": str(e), "step": step}))
        raise
    out.write_text(json.dumps({"rank": rank, "error": None}))


hvd.init(process_sets="dynamic")
out_file = Path(args.out) / f"rank{hvd.rank()}.json"
if args.case == "exchange":
    exchange_case(out_file, hvd.global_process_set, "g")
    if hvd.size() == 4:  # two process sets of 2: N is the set's size, not hvd.size()
        sets = [hvd.add_process_set([0, 1]), hvd.add_process_set([2, 3])]
        mine = sets[hvd.rank() // 2]
        exchange_case(Path(args.out) / f"set_rank{hvd.rank()}.json", mine, f"ps{hvd.rank() // 2}")
        stock_process_set_case(Path(args.out) / f"stock_set_rank{hvd.rank()}.json", mine)
        hvd.barrier()  # a rank that exits shuts Horovod down for all: wait for the other set
elif args.case == "optim":
    optim_case(out_file)
else:
    mismatch_case(out_file, args.case)
sys.exit(0)
