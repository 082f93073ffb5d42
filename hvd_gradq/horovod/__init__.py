"""The Horovod adapter, the only package that imports Horovod or mpi4py: Horovod's collectives for
the exchange engine (``collectives``), the object channel (``channel``), the user's door
``Compressor`` for ``hvd.DistributedOptimizer(compression=...)`` (``compressor``) and its preset
``UniformCompressor`` (``uniform``), how a layer is found from its bare gradient
(``gradient_names``), what it reports (``report``), the compression state across interruptions
(``resync``), the drop-in ``DistributedOptimizer``, Horovod's optimizer with that compressor
(``optimizer``), and the elastic state handlers (``elastic``, registered with Horovod on import)."""
from hvd_gradq.horovod import elastic  # noqa: F401 - registers the TorchState handlers with Horovod
from hvd_gradq.horovod.collectives import HorovodCollectives, measure_link
from hvd_gradq.horovod.compressor import Compressor
from hvd_gradq.horovod.optimizer import DistributedOptimizer, GradqOptimizer
from hvd_gradq.horovod.report import PayloadInfo, WireStats
from hvd_gradq.horovod.uniform import UniformCompressor

__all__ = ["Compressor", "DistributedOptimizer", "GradqOptimizer", "HorovodCollectives", "PayloadInfo",
           "UniformCompressor", "WireStats", "measure_link"]
