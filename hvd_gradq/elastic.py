"""Horovod elastic: hvd_gradq's compression state inside ``hvd.elastic.TorchState``.

    import hvd_gradq.elastic  # registers the handler below with Horovod
    state = hvd.elastic.TorchState(model=model, optimizer=opt, batch=0)  # opt: hvd_gradq.DistributedOptimizer

``state.commit()`` then also keeps this rank's compression state (residuals, codebook, dither
streams, trigger and allocator state) and ``restore()`` (after a failed step) puts it back, as it
does for the optimizer's own state. On ``sync()`` after the set of workers changed, the optimizer
rebuilds what depends on N and the rank (lane widths, chunk bounds, transports), carries each
rank's residuals into its next step and takes rank 0's codebook, so every rank starts the next
compressed step from the same one; with an allocator, the bits are re-decided for the new N at
that step. When Horovod skips ``sync()`` (workers only removed), the optimizer notices the new
world size at the next step and does the same there.
"""
from __future__ import annotations

import copy

from horovod.torch.elastic import state as _state
from horovod.torch.functions import broadcast_optimizer_state

from hvd_gradq.optimizer import GradqOptimizer


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
        # Horovod initialises a new optimizer's state with a zero-gradient step(); that step must
        # stay local (as Horovod arranges for its own optimizer), not become a compressed exchange
        with self.value.skip_synchronize():
            broadcast_optimizer_state(self.value, root_rank=0)
        self.value.elastic_resync()


def register() -> None:
    """Put the handler ahead of Horovod's optimizer handler (idempotent)."""
    registry = [(t, h) for t, h in _state.get_handler_registry() if h is not GradqOptimizerStateHandler]
    _state.set_handler_registry([(GradqOptimizer, GradqOptimizerStateHandler), *registry])


register()
