"""Optimizers for use under ``hvd_gradq.DistributedOptimizer`` (pure torch, no Horovod)."""
from hvd_gradq.optim.qoda import QODA

__all__ = ["QODA"]
