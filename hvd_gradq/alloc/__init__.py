"""Bit allocation: distortion metrics (``distortion``), solvers (``solvers``), the ``Allocator``
that joins them under a budget, layer types (``layer_types``) and the ``Trigger`` that says when
to re-decide. Pure: no Horovod, no MPI (a job runs the allocator on rank 0)."""
from hvd_gradq.alloc.allocator import AllocationEvent, Allocator
from hvd_gradq.alloc.distortion import LossProbe
from hvd_gradq.alloc.solvers import Allocation, AMPASchedule, RDCurves, greedy, lagrangian, mckp_dp, same_bits
from hvd_gradq.alloc.trigger import Trigger

__all__ = ["AMPASchedule", "Allocation", "AllocationEvent", "Allocator", "LossProbe", "RDCurves", "Trigger",
           "greedy", "lagrangian", "mckp_dp", "same_bits"]
