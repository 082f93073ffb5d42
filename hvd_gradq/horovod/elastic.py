"""Horovod elastic: hvd_gradq's compression state inside ``hvd.elastic.TorchState``.

    state = hvd.elastic.TorchState(model=model, optimizer=opt, batch=0)  # opt: hvd_gradq.DistributedOptimizer

``hvd_gradq.DistributedOptimizer`` and ``hvd_gradq.UniformCompressor`` register the handlers below
with Horovod (importing this module does too); for the stock path pass the compressor as well,
``TorchState(model=model, optimizer=opt, compressor=comp)``. ``state.commit()`` then also keeps
this rank's compression state (residuals, codebook, dither streams, trigger and allocator state)
and ``restore()`` (after a failed step) puts it back, as it does for the optimizer's own state.
On ``sync()`` after the set of workers changed, the optimizer rebuilds what depends on N and the
rank (lane widths, chunk bounds, transports), carries each rank's residuals into its next step
and takes rank 0's codebook, so every rank starts the next compressed step from the same one;
with an allocator, the bits are re-decided for the new N at that step. When Horovod skips
``sync()`` (workers only removed), the optimizer notices the new world size at the next step and
does the same there. The stock compressor starts a fresh codebook (one float32 step) at the first
step after the world size changed, and takes rank 0's on sync.
"""
from __future__ import annotations

import copy

from horovod.torch.elastic import state as _state
from horovod.torch.functions import broadcast_optimizer_state

from hvd_gradq.horovod.compressor import UniformCompressor
from hvd_gradq.horovod.optimizer import GradqOptimizer


class GradqOptimizerStateHandler(_state.OptimizerStateHandler):
    """Horovod's optimizer handler plus the optimizer's compression state (this rank's)."""

    def __init__(self, optimizer) -> None:
        super().__init__(optimizer)
        self._saved_compression = copy.deepcopy(optimizer.local_compression_state())

    def save(self) -> None:
        super().save()
        self._saved_compression = copy.deepcopy(self.value.local_compression_state())

    def restore(self) -> None:
        super().restore()
        self.value.load_local_compression_state(copy.deepcopy(self._saved_compression))

    def sync(self) -> None:
        # a new worker's empty optimizer state is materialised locally (the optimizer's
        # _materialising_step), then rank 0's is broadcast, as for Horovod's optimizer
        broadcast_optimizer_state(self.value, root_rank=0)
        self.value.elastic_resync()


class UniformCompressorStateHandler(_state.StateHandler):
    """The stock path's compressor in a ``TorchState`` (``TorchState(model=..., optimizer=...,
    compressor=comp)``): commit/restore keep this rank's residuals, codebook and dither stream;
    sync starts a fresh codebook if the world size changed and takes rank 0's otherwise (a
    replaced worker starts with an empty one)."""

    def __init__(self, compressor) -> None:
        super().__init__(compressor)
        self._saved = copy.deepcopy(compressor.state_dict())

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self) -> None:
        self.value.sync_codebook(root_rank=0)


_HANDLERS = ((GradqOptimizer, GradqOptimizerStateHandler), (UniformCompressor, UniformCompressorStateHandler))


def register() -> None:
    """Put the handlers ahead of Horovod's own (idempotent)."""
    ours = {h for _, h in _HANDLERS}
    registry = [(t, h) for t, h in _state.get_handler_registry() if h not in ours]
    _state.set_handler_registry([*_HANDLERS, *registry])


register()
