"""Bit allocation: distortion metrics (``distortion``), solvers (``solvers``) and the ``Allocator``
that joins them under a budget. Pure: no Horovod, no MPI (the optimizer runs it on rank 0)."""
from hvd_gradq.alloc.allocator import AllocationEvent, Allocator
from hvd_gradq.alloc.distortion import LossProbe
from hvd_gradq.alloc.solvers import Allocation, AMPASchedule, RDCurves, greedy, lagrangian, mckp_dp, uniform

__all__ = ["AMPASchedule", "Allocation", "AllocationEvent", "Allocator", "LossProbe", "RDCurves", "greedy",
           "lagrangian", "mckp_dp", "uniform"]
