"""The drop-in optimizer's compression state across interruptions and changes of the workers:
checkpoints (``compression_state_dict`` / ``load_compression_state_dict``), Horovod elastic
(rebuilding for a new world size, commit/restore of this rank's state) and ``hvd.join()``
(``sync_codebook``). A mixin of every class ``DistributedOptimizer`` makes; the bundle format is
``exchange.state``'s, shared with the stock compressor and the simulation.
"""
from __future__ import annotations

import logging

import horovod.torch as hvd

from hvd_gradq.exchange import state as checkpoint
from hvd_gradq.exchange.engine import GradientExchange
from hvd_gradq.horovod.channel import broadcast_object, gather_objects

_log = logging.getLogger("hvd_gradq")
LABEL = "hvd_gradq.DistributedOptimizer"


class CompressionResync:
    """Methods of the drop-in optimizer (see ``horovod.optimizer._GradqOptimizer`` for the state)."""

    def _gq_config(self) -> dict:
        return checkpoint.coding_config(self.gradient_exchange, self.reallocation)

    def compression_state_dict(self) -> dict | None:
        """Every rank's compression state in one bundle, for a checkpoint next to the model's and
        ``optimizer.state_dict()``: residuals, codebook, dither streams, coder state, step count,
        and rank 0's trigger and allocator state.

        Collective: call it on every rank of the process set at the same point (after ``step()``);
        every rank gets the whole bundle, so rank 0 alone can save it. None on ranks outside the
        process set."""
        if self._gq_pending:
            raise RuntimeError("compression_state_dict() was called with gradients in flight; call it after "
                               "optimizer.step() (or synchronize())")
        ex = self.gradient_exchange
        if ex is None:
            return None
        local = checkpoint.rank_state(self._gq_step, ex, self.reallocation)
        return checkpoint.bundle(gather_objects(local, self.process_set), layers=ex.numel, config=self._gq_config())

    def load_compression_state_dict(self, state: dict, reset: bool = False) -> None:
        """Resume from ``compression_state_dict()``: every rank takes its own part, and training
        continues exactly as it would have without the interruption (same seeds and data).

        A state saved by a different number of ranks, for a different model or with other coding
        settings raises ``hvd_gradq.StateMismatchError`` naming the mismatch, unless ``reset=True``:
        then the compression state starts afresh (residuals zero; with an allocator, the codebook
        is re-allocated at the next step). Call it on every rank, before the first step."""
        if self._gq_pending:
            raise RuntimeError("load_compression_state_dict() was called with gradients in flight")
        ex = self.gradient_exchange
        if ex is None:
            return
        parts = checkpoint.parts_to_resume(state, owner=LABEL, size=ex.size, ranks=[ex.rank], layers=ex.numel,
                                           config=self._gq_config(), reset=reset)
        if parts is None:
            self.reset_compression_state()
            return
        ex.load_state_dict(parts[0]["exchange"])
        self.reallocation.load_state_dict(parts[0])
        self._gq_step = parts[0]["step"]

    def reset_compression_state(self) -> None:
        """Zero every residual; with an allocator, re-allocate the codebook at the next step."""
        if self.gradient_exchange is not None:
            self.gradient_exchange.reset_state()
        self.reallocation.reset()

    def _gq_follow(self, root: int | None, fresh: GradientExchange) -> None:
        """Take global rank ``root``'s codebook, warm-start low-rank factors and step count
        (default: the process set's rank 0)."""
        mine = None
        is_root = hvd.rank() == root if root is not None else self.process_set.rank() == 0
        if is_root:
            ex = self.gradient_exchange
            mine = {"codebook": ex.codebook.state_dict(), "step": self._gq_step,
                    "factors": {n: c.q for n, c in ex.lowrank.items()}}
        shared = broadcast_object(mine, self.process_set, root=root)
        fresh.adopt(shared["codebook"], shared["factors"])
        self._gq_step = shared["step"]  # a worker that joined now counts steps like the others

    def elastic_resync(self) -> None:
        """After the set of workers changed (a Horovod elastic reset): rebuild everything that
        depends on N and this rank (lane widths, chunk bounds, transports) for the current process
        set, fold this rank's residuals into its next step, and take rank 0's codebook (bits,
        scales, versions), so that every rank starts the next step from the same one. With an
        allocator, the bits are re-decided at the next step for the new N. Collective: every rank
        of the process set calls it at the same point; ``hvd_gradq.horovod.elastic`` does so on
        sync and the optimizer does so itself at the first step after the world size or its rank
        changed."""
        old = self.gradient_exchange
        if old is None or not self.process_set.included():
            return
        owed = {n: t for n in list(old.numel) if (t := old.take_owed(n)) is not None}
        fresh = self._gq_make_exchange()
        self._gq_follow(None, fresh)
        fresh.residuals.carry = owed
        self.gradient_exchange = fresh
        self._gq_clear()
        if self.trigger is not None:
            self.trigger.reset()
        _log.info("rank %d of %d: codebook v%d adopted after the set of workers changed", fresh.rank, fresh.size,
                  fresh.codebook.version)

    def sync_codebook(self, root_rank: int) -> None:
        """Take the codebook (bits, shared scales, reduction counts, version) and the step count of
        global rank ``root_rank``. After ``hvd.join()``: the ranks that joined early missed the
        exchanges the others went on with. Call it on every rank of the process set after the join,
        with what ``hvd.join()`` returned (the rank that joined last), next to
        ``hvd.broadcast_parameters(model.state_dict(), root_rank=...)``. Residuals stay local.

        Under ``hvd.join()`` Horovod reduces only by allreduce: layers on the lanes (codec
        "shared_scale" with transport "allreduce", and the float32 ones) work; allgather, two-phase
        and the allocator's broadcasts raise Horovod's "not supported with Join" error."""
        if self.gradient_exchange is not None and self.process_set.included():
            self._gq_follow(root_rank, self.gradient_exchange)

    def local_compression_state(self) -> dict:
        """This rank's compression state (not collective; for Horovod elastic's commit/restore)."""
        ex = self.gradient_exchange
        state = {"size": None, "step": self._gq_step}
        if ex is not None:
            state.update(checkpoint.rank_state(self._gq_step, ex, self.reallocation), size=ex.size)
        return state

    def load_local_compression_state(self, state: dict) -> None:
        """Undo to ``local_compression_state()`` of this rank (elastic restore, before the reset).
        A state from another world size only restores the step count; the next step rebuilds."""
        ex = self.gradient_exchange
        self._gq_clear()
        self._gq_step = state["step"]
        if ex is None or state["size"] != ex.size:
            return
        ex.load_state_dict(state["exchange"])
        self.reallocation.load_state_dict(state)
