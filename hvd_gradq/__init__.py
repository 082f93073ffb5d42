"""hvd_gradq: gradient compression for Horovod + PyTorch.

``hvd_gradq.UniformCompressor`` plugs into ``hvd.DistributedOptimizer(compression=...)``;
``hvd_gradq.DistributedOptimizer`` is a drop-in for ``hvd.DistributedOptimizer`` that also moves
non-summable codecs (allgather, two-phase exchange), choosing per layer with the cost model;
``hvd_gradq.SimulatedWorkers`` runs the same coding for N workers in one process (studies).
The pure layers (``codecs``, ``packing``, ``wire``, ``codebook``) import without Horovod; the
Horovod glue is loaded on first use of a name that needs it.
"""
from hvd_gradq.alloc import Allocator, AMPASchedule, LossProbe
from hvd_gradq.checkpoint import StateMismatchError
from hvd_gradq.cost_model import LinkModel, TransportCost
from hvd_gradq.trigger import Trigger
from hvd_gradq.wire import CodebookMismatchError, ReductionMismatchError

__version__ = "0.1.0"
__all__ = [
    "AMPASchedule",
    "Allocator",
    "CodebookMismatchError",
    "DistributedOptimizer",
    "LinkModel",
    "LossProbe",
    "PayloadInfo",
    "ReductionMismatchError",
    "SimulatedWorkers",
    "StateMismatchError",
    "TransportCost",
    "Trigger",
    "UniformCompressor",
    "WireStats",
    "measure_link",
]

_GLUE = {"UniformCompressor": "compressor", "PayloadInfo": "compressor", "WireStats": "compressor",
         "DistributedOptimizer": "optimizer", "measure_link": "transport",
         "SimulatedWorkers": "simulate"}


def __getattr__(name: str):
    if name in _GLUE:
        import importlib

        return getattr(importlib.import_module(f"hvd_gradq.{_GLUE[name]}"), name)
    raise AttributeError(f"module 'hvd_gradq' has no attribute {name!r}")
