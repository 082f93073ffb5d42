"""Horovod elastic: hvd_gradq's compression state inside ``hvd.elastic.TorchState``.

    state = hvd.elastic.TorchState(model=model, optimizer=opt, compressor=comp)  # the stock path
    state = hvd.elastic.TorchState(model=model, optimizer=opt)                   # the drop-in

Importing ``hvd_gradq.horovod`` (which ``hvd_gradq.Compressor`` and ``hvd_gradq.DistributedOptimizer``
do) registers the handlers below with Horovod. ``state.commit()`` then also keeps this rank's
compression state (residuals, codebook, dither streams, coder state, trigger and allocator state)
and ``restore()`` (after a failed step) puts it back, as it does for the optimizer's own state. On
``sync()`` after the set of workers changed, the compressor rebuilds what depends on N and the rank
(lane widths, chunk bounds, transports), carries each rank's residuals into its next step and takes
rank 0's codebook, so every rank starts the next compressed step from the same one; with an
allocator, the bits are re-decided for the new N at that step. When Horovod skips ``sync()``
(workers only removed), the compressor notices the new world size at the next step and does the
same there.
"""
from __future__ import annotations

import copy

from horovod.torch.elastic import state as _state
from horovod.torch.functions import broadcast_optimizer_state

from hvd_gradq.horovod.compressor import Compressor
from hvd_gradq.horovod.optimizer import GradqOptimizer


class _CompressionState:
    """Commit/restore of one object's ``local_compression_state()``."""

    def _keep(self) -> None:
        self._saved_compression = copy.deepcopy(self.value.local_compression_state())

    def _put_back(self) -> None:
        self.value.load_local_compression_state(copy.deepcopy(self._saved_compression))


class GradqOptimizerStateHandler(_CompressionState, _state.OptimizerStateHandler):
    """Horovod's optimizer handler plus the drop-in's compression state (this rank's)."""

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self._keep()

    def save(self) -> None:
        super().save()
        self._keep()

    def restore(self) -> None:
        super().restore()
        self._put_back()

    def sync(self) -> None:
        # a new worker's empty optimizer state is materialised locally (the drop-in's
        # _materialising_step), then rank 0's is broadcast, as for Horovod's optimizer
        broadcast_optimizer_state(self.value, root_rank=0)
        self.value.elastic_resync()


class CompressorStateHandler(_CompressionState, _state.StateHandler):
    """The stock path's compressor in a ``TorchState`` (``TorchState(..., compressor=comp)``)."""

    def __init__(self, compressor) -> None:
        super().__init__(compressor)
        self._keep()

    def save(self) -> None:
        self._keep()

    def restore(self) -> None:
        self._put_back()

    def sync(self) -> None:
        self.value.elastic_resync()


_HANDLERS = ((GradqOptimizer, GradqOptimizerStateHandler), (Compressor, CompressorStateHandler))


def register() -> None:
    """Put the handlers ahead of Horovod's own (idempotent)."""
    ours = {h for _, h in _HANDLERS}
    registry = [(t, h) for t, h in _state.get_handler_registry() if h not in ours]
    _state.set_handler_registry([*_HANDLERS, *registry])


register()
