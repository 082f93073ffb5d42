"""The one map of task names and compressor names, for ``examples/`` and ``benchmarks/``.

Tasks (``TASKS``): ``cnn`` (``FashionCNN`` on Fashion-MNIST), ``lstm`` (``LSTMLanguageModel`` on
Jane Austen's novels) and ``transformer`` (``TransformerLanguageModel`` on the same text); each
names its model, its data and its example script. ``bench_task`` builds the fixed-size version
the benchmarks time.

Compressors (``COMPRESSORS``; one name, one meaning). The examples' ``--compressor``
(``EXAMPLE_COMPRESSORS``):

* ``none``, ``fp16``: the stock ``hvd.DistributedOptimizer`` with Horovod's compression;
* ``stock``: the stock optimizer with ``hvd_gradq.UniformCompressor`` (b-bit rotated lanes);
* every codec of ``hvd_gradq.CODECS`` (``shared_scale``, ``qsgd``, ..., ``jointsq``, ``topk``):
  the drop-in ``hvd_gradq.DistributedOptimizer`` (``SimulatedWorkers`` when simulated).

The benchmarks' names fix the settings (``BENCH_COMPRESSORS``, built by ``make_optimizer``):
``none``, ``fp16``, ``stock2``/``stock4``/``stock8`` (the stock path at 2/4/8 bits),
``lad2``/``lad3`` (the drop-in, ``shared_scale`` at 4 bits, exact-LAD Lagrangian allocation at a
budget of 2/3 bits, similarity trigger), ``jointsq20``/``jointsq100`` (JointSQ at 20x/100x),
``qsgd4``, ``rotated2``/``rotated3`` (the drop-in's default rotated code at 2/3 bits),
``lad2r``/``lad3r`` (LAD as lad2/lad3 over the rotated code), ``lad2f``/``lad3f`` (the same with
the first-order LAD metric), ``topk20`` (top-k at 20x with error feedback), ``lowrank4`` (the drop-in's low-rank
factors at rank 4, the rotated code at 4 bits for the rest), ``lowrank4h`` (the same with Q in
float16), ``mixed07h`` (exact LAD choosing per layer between ranks 1-8 with Q in float16 and the
rotated code at 0-4 bits, 0.7 bits per element on the wire; ``mixed10h``: 1 bit per element),
``alq4t``/``alq4g`` (ALQ at 4 bits, one level set per layer type / one for all layers: the
layer-wise quantization paper's comparison); and the PyTorch DDP peers (no Horovod):
``powersgd``/``powersgd8`` (the PowerSGD hook at rank 4/8), ``ddp_fp16``/``ddp_bf16`` (the fp16/bf16
compression hooks), ``ddp_none`` (plain DDP). Older names are still accepted and mean what they
meant (``ALIASES``: old result logs use them); what is written now uses the new names.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import hvd_gradq
from workloads.datasets import austen_lm, fashion_mnist
from workloads.gan import LATENT, GANGame, to_gan_range
from workloads.models import FashionCNN, LSTMLanguageModel, TransformerLanguageModel


@dataclass(frozen=True)
class Workload:
    """A task: ``model(**sizes)`` builds its model, ``data(...)`` loads its data (``fashion_mnist``:
    a split; ``austen_lm``: a vocabulary size); ``title`` is the name its logs carry."""

    name: str
    title: str
    example: str
    model: Callable[..., nn.Module]
    data: Callable


TASKS = {
    "cnn": Workload("cnn", "FashionCNN", "examples/fashion_mnist_cnn.py", FashionCNN, fashion_mnist),
    "lstm": Workload("lstm", "AustenLSTM", "examples/austen_lstm_lm.py", LSTMLanguageModel, austen_lm),
    "transformer": Workload("transformer", "AustenTransformer", "examples/transformer_lm.py",
                            TransformerLanguageModel, austen_lm),
    "wgan": Workload("wgan", "WGAN", "examples/wgan_fashion_mnist.py", GANGame, fashion_mnist),
}


def lm_loss(logits, target):
    """Token cross-entropy of (batch, seq, vocab) logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def bench_task(name: str, rank: int, size: int):
    """(model, batch(step) -> (inputs, targets), loss_fn) at the benchmarks' fixed sizes: the CNN
    with 64 images per rank and step, the language models with 20 sequences of 35 tokens, the WGAN
    with 64 images and latent codes (its model returns the game's loss; ``loss_fn`` passes it on)."""
    if name == "wgan":
        x = to_gan_range(TASKS["wgan"].data("train")[0])
        game = GANGame()

        def gan_batch(step: int):
            lo = ((step * size + rank) * 64) % (len(x) - 64)
            g = torch.Generator().manual_seed(step * 4096 + rank)
            return (x[lo:lo + 64], torch.randn(64, LATENT, generator=g), g), None

        return game, gan_batch, lambda loss, _: loss
    if name == "cnn":
        x, y = TASKS["cnn"].data("train")
        model = TASKS["cnn"].model()

        def batch(step: int):
            lo = ((step * size + rank) * 64) % (len(x) - 64)
            return x[lo:lo + 64], y[lo:lo + 64]

        return model, batch, F.cross_entropy
    data = TASKS[name].data()["train"]
    model = TASKS[name].model(vocab=10_000)

    def lm_batch(step: int):  # 20 sequences of 35 tokens per rank
        lo = ((step * size + rank) * 20 * 36) % (len(data) - 20 * 36)
        seq = data[lo:lo + 20 * 36].view(20, 36)
        return seq[:, :-1], seq[:, 1:]

    return model, lm_batch, lm_loss


# ---- compressors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compressor:
    """What a compressor name builds. ``path``: "horovod" (the stock optimizer with Horovod's
    ``codec`` "none" or "fp16"), "stock" (the stock optimizer with ``UniformCompressor``),
    "dropin" (``hvd_gradq.DistributedOptimizer`` with ``codec``), "compressor" (the stock optimizer
    with ``hvd_gradq.Compressor`` of the same settings: the ``-stock`` rows) or "ddp" (PyTorch DDP + PowerSGD).
    ``bits``/``ratio``/``budget``: fixed settings (None: the command line's)."""

    name: str
    path: str
    codec: str | None = None
    bits: int | None = None
    ratio: float | None = None
    budget: float | None = None
    rank: int | None = None
    factors: str | None = None  # of the low-rank factors: "float16" for Q in float16
    ranks: tuple[int, ...] = ()  # the allocator's low-rank options (with budget: ranks+bits, priced on the wire)
    level_groups: str | None = None  # alq/amq: "type" (one level set per layer type) or "global"
    metric: str = "lad"  # the allocator's distortion metric (with budget)
    hook: str | None = None  # ddp: the communication hook ("powersgd", "fp16", "bf16"; None: plain allreduce)

    @property
    def stock(self) -> bool:
        """Horovod's own optimizer (``hvd.DistributedOptimizer``) in a job."""
        return self.path in ("horovod", "stock", "compressor")


_SHARED_SCALE = "shared_scale"
_EXAMPLES = [Compressor("none", "horovod", "none"), Compressor("fp16", "horovod", "fp16"), Compressor("stock", "stock"),
             *[Compressor(c, "dropin", c) for c in hvd_gradq.CODECS]]
_BENCH = [*[Compressor(f"stock{b}", "stock", bits=b) for b in (2, 4, 8)],
          *[Compressor(f"lad{b}", "dropin", _SHARED_SCALE, bits=4, budget=float(b)) for b in (2, 3)],
          *[Compressor(f"jointsq{r}", "dropin", "jointsq", ratio=float(r)) for r in (20, 100)],
          Compressor("qsgd4", "dropin", "qsgd", bits=4),
          *[Compressor(f"rotated{b}", "dropin", "rotated", bits=b) for b in (2, 3)],
          *[Compressor(f"lad{b}r", "dropin", "rotated", bits=4, budget=float(b)) for b in (2, 3)],
          *[Compressor(f"lad{b}f", "dropin", "rotated", bits=4, budget=float(b), metric="lad_first_order")
            for b in (2, 3)],
          Compressor("topk20", "dropin", "topk", ratio=20.0),
          Compressor("lowrank4", "dropin", "lowrank", bits=4, rank=4),
          Compressor("lowrank4h", "dropin", "lowrank", bits=4, rank=4, factors="float16"),
          *[Compressor(f"mixed{b:02d}h", "dropin", "rotated", bits=1, budget=b / 10, factors="float16",
                       ranks=(1, 2, 4, 8)) for b in (7, 10)],
          *[Compressor(f"alq4{g[0]}", "dropin", "alq", bits=4, level_groups=g) for g in ("type", "global")],
          Compressor("powersgd", "ddp", rank=4, hook="powersgd"),
          Compressor("powersgd8", "ddp", rank=8, hook="powersgd"),
          Compressor("ddp_fp16", "ddp", hook="fp16"), Compressor("ddp_bf16", "ddp", hook="bf16"),
          Compressor("ddp_none", "ddp")]
#: every drop-in row again through Horovod's own optimizer with hvd_gradq.Compressor ("<row>-stock")
_BENCH += [replace(c, name=f"{c.name}-stock", path="compressor") for c in _BENCH if c.path == "dropin"]
COMPRESSORS = {c.name: c for c in [*_EXAMPLES, *_BENCH]}
#: the examples' --compressor
EXAMPLE_COMPRESSORS = tuple(c.name for c in _EXAMPLES)
#: the codecs of the drop-in optimizer and the simulation
DROPIN = tuple(hvd_gradq.CODECS)
#: what benchmarks.step_worker and benchmarks.tta_worker run under Horovod (powersgd: under DDP)
_DROPIN_ROWS = ("lad2", "lad3", "jointsq20", "jointsq100", "qsgd4", "rotated2", "rotated3", "lad2r", "lad3r", "lad2f",
                "lad3f", "topk20", "lowrank4", "lowrank4h", "mixed07h", "mixed10h", "alq4t", "alq4g")
BENCH_COMPRESSORS = ("none", "fp16", "stock2", "stock4", "stock8", *_DROPIN_ROWS, *(f"{r}-stock" for r in _DROPIN_ROWS))
#: the PyTorch DDP peers (``benchmarks.tq_worker``; ``powersgd`` also in ``benchmarks.ddp_worker``)
DDP_COMPRESSORS = tuple(c.name for c in _BENCH if c.path == "ddp")
#: old name -> new name
ALIASES = {"uniform": "stock", "gradq-uniform": _SHARED_SCALE, "uniform2": "stock2", "uniform4": "stock4",
           "uniform8": "stock8"}
#: the allocator's solvers on the command line; "uniform" is the old name of "same_bits"
SOLVERS = ("lagrangian", "greedy", "same_bits", "mckp_dp", "ampa")
SOLVER_ALIASES = {"uniform": "same_bits"}


def compressor_name(name: str) -> str:
    """The current name of a compressor (an old name mapped to its new one); as an argparse
    ``type=`` it lets ``choices=`` take the old names too."""
    return ALIASES.get(name, name)


def solver_name(name: str) -> str:
    return SOLVER_ALIASES.get(name, name)


def make_optimizer(name: str, model: nn.Module, opt, batch, loss_fn, *, spread: bool = True,
                   max_grad_norm: float | None = None):
    """Wrap ``opt`` for benchmark compressor ``name`` (op=Sum: callers divide the loss by the
    number of workers). Returns (distributed optimizer, the hvd_gradq compressor or None): the
    ``UniformCompressor`` of the stock rows, the ``Compressor`` of the ``-stock`` rows, the drop-in's.
    ``spread``: the LAD rows' ``Allocator(spread=)`` (the table split over the ranks or not);
    ``max_grad_norm``: the clipping training applies after the exchange (the LAD metrics' step)."""
    name = compressor_name(name)
    if name not in BENCH_COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(BENCH_COMPRESSORS)}")
    import horovod.torch as hvd

    c = COMPRESSORS[name]
    named = list(model.named_parameters())
    if c.path in ("horovod", "stock"):
        comp = hvd_gradq.UniformCompressor(bits=c.bits, named_parameters=named, op=hvd.Sum) if c.path == "stock" \
            else None
        compression = comp or (hvd.Compression.fp16 if c.codec == "fp16" else hvd.Compression.none)
        return hvd.DistributedOptimizer(opt, named_parameters=named, compression=compression, op=hvd.Sum), comp
    kw: dict = {"codec": c.codec}
    if c.bits is not None:
        kw["bits"] = c.bits
    if c.ratio is not None:
        kw["ratio"] = c.ratio
    if c.rank is not None:
        kw["rank"] = c.rank
    if c.factors is not None:
        kw["factors"] = c.factors
    if c.level_groups is not None:
        kw["level_groups"] = hvd_gradq.layer_types(model) if c.level_groups == "type" else c.level_groups
    if c.budget is not None:
        probe = hvd_gradq.LossProbe(model, loss_fn, lambda: [batch(10_000)])
        mix = {"options": (0, 1, 2, 3, 4), "ranks": c.ranks, "rate": "wire"} if c.ranks else \
            {"options": (0, 2, 3, 4, 6, 8)}
        kw["allocator"] = hvd_gradq.Allocator(c.budget, metric=c.metric, probe=probe, spread=spread,
                                              max_grad_norm=max_grad_norm, **mix)
        kw["trigger"] = hvd_gradq.Trigger(tau=0.95, k_min=20)
    if c.path == "compressor":
        comp = hvd_gradq.Compressor(named, op=hvd.Sum, lr=opt, **kw)
        return hvd.DistributedOptimizer(opt, named_parameters=named, compression=comp, op=hvd.Sum), comp
    dropin = hvd_gradq.DistributedOptimizer(opt, named_parameters=named, op=hvd.Sum, **kw)
    return dropin, dropin.compressor
