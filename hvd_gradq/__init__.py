"""hvd_gradq: gradient compression for Horovod + PyTorch.

``hvd_gradq.UniformCompressor`` plugs into ``hvd.DistributedOptimizer(compression=...)``.
The pure layers (``codecs``, ``packing``, ``wire``, ``codebook``) import without Horovod; the
Horovod glue is loaded on first use of a name that needs it.
"""
from hvd_gradq.wire import CodebookMismatchError, ReductionMismatchError

__version__ = "0.1.0"
__all__ = ["CodebookMismatchError", "PayloadInfo", "ReductionMismatchError", "UniformCompressor", "WireStats"]

_GLUE = {"UniformCompressor", "PayloadInfo", "WireStats"}


def __getattr__(name: str):
    if name in _GLUE:
        from hvd_gradq import compressor

        return getattr(compressor, name)
    raise AttributeError(f"module 'hvd_gradq' has no attribute {name!r}")
