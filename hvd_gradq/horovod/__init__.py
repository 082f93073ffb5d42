"""The Horovod adapter, the only package that imports Horovod or mpi4py: Horovod's collectives for
the exchange engine (``collectives``), the object channel (``channel``), the stock path's
``UniformCompressor`` (``compressor``), the drop-in ``DistributedOptimizer`` (``optimizer``) and
the elastic state handlers (``elastic``)."""
from hvd_gradq.horovod.collectives import HorovodCollectives, measure_link
from hvd_gradq.horovod.compressor import PayloadInfo, UniformCompressor, WireStats
from hvd_gradq.horovod.optimizer import DistributedOptimizer, GradqOptimizer

__all__ = ["DistributedOptimizer", "GradqOptimizer", "HorovodCollectives", "PayloadInfo", "UniformCompressor",
           "WireStats", "measure_link"]
