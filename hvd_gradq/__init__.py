"""hvd_gradq: gradient compression for Horovod + PyTorch.

``hvd_gradq.UniformCompressor`` plugs into ``hvd.DistributedOptimizer(compression=...)``.
"""
__version__ = "0.1.0"

from hvd_gradq.compressor import PayloadInfo, UniformCompressor, WireStats  # noqa: E402
from hvd_gradq.wire import CodebookMismatchError, ReductionMismatchError  # noqa: E402

__all__ = ["UniformCompressor", "PayloadInfo", "WireStats", "ReductionMismatchError", "CodebookMismatchError"]
