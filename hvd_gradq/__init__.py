"""hvd_gradq: gradient compression for Horovod + PyTorch.

``hvd_gradq.Compressor`` plugs into Horovod's own ``hvd.DistributedOptimizer(compression=...)`` with
every feature: per-layer bit widths (0 = not sent), every codec and transport (summable lanes,
allgather, two-phase exchange, low-rank factors), chosen per layer with the cost model, and the
bits re-decided by an ``Allocator`` on rank 0 when a ``Trigger`` fires; ``UniformCompressor`` is
its preset of one width on the lanes; ``hvd_gradq.DistributedOptimizer`` is Horovod's optimizer
with that compressor plus a few fixes (docs/HOROVOD_COMPAT.md); ``hvd_gradq.SimulatedWorkers``
runs the same coding for N workers in one process (studies). ``Coding`` holds the coding
settings. The layers below (``bits``, ``codecs``, ``codebook``, ``wire``, ``plan``, ``alloc``,
``exchange``) import without Horovod; the names that need it (from ``hvd_gradq.horovod``) are
loaded on first use.
"""
from hvd_gradq.alloc import Allocator, AMPASchedule, LossProbe, Trigger
from hvd_gradq.alloc.layer_types import layer_types
from hvd_gradq.exchange.state import StateMismatchError
from hvd_gradq.optim import QODA
from hvd_gradq.plan.cost_model import LinkModel
from hvd_gradq.plan.planner import CODECS
from hvd_gradq.settings import Coding
from hvd_gradq.simulate import SimulatedWorkers
from hvd_gradq.wire.header import CodebookMismatchError, ReductionMismatchError

__version__ = "0.1.0"
__all__ = [
    "CODECS",
    "QODA",
    "AMPASchedule",
    "Allocator",
    "CodebookMismatchError",
    "Coding",
    "Compressor",
    "DistributedOptimizer",
    "LinkModel",
    "LossProbe",
    "ReductionMismatchError",
    "SimulatedWorkers",
    "StateMismatchError",
    "Trigger",
    "UniformCompressor",
    "layer_types",
    "measure_link",
]

_LAZY = {"Compressor": "hvd_gradq.horovod.compressor", "UniformCompressor": "hvd_gradq.horovod.uniform",
         "DistributedOptimizer": "hvd_gradq.horovod.optimizer",
         "measure_link": "hvd_gradq.horovod.collectives"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hvd_gradq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
