"""The compression state across interruptions and changes of the workers: checkpoints
(``compression_state_dict`` / ``load_compression_state_dict``), Horovod elastic (rebuilding for a
new world size, commit/restore of this rank's state) and ``hvd.join()`` (``sync_codebook``).

A mixin of ``horovod.compressor.Compressor`` (which the drop-in optimizer runs too): it reads the
compressor's engine (``gradient_exchange``), its reallocation step, its step count and process
set. The bundle format is ``exchange.state``'s, shared with the simulation.
"""
from __future__ import annotations

import logging

import horovod.torch as hvd

from hvd_gradq.exchange import state as checkpoint
from hvd_gradq.exchange.engine import GradientExchange
from hvd_gradq.horovod.channel import broadcast_object, gather_objects

_log = logging.getLogger("hvd_gradq")


class CompressionResync:
    """Methods of ``Compressor`` (see there for the state they read)."""

    def _config(self) -> dict:
        return checkpoint.coding_config(self.gradient_exchange, self.reallocation)

    def _check_between_steps(self, what: str) -> None:
        if self._in_step():
            raise RuntimeError(f"{what} was called with gradients in flight; call it after optimizer.step() (or "
                               "synchronize())")

    def compression_state_dict(self) -> dict | None:
        """Every rank's compression state in one bundle, for a checkpoint next to the model's and
        ``optimizer.state_dict()``: residuals, codebook, dither streams, coder state, step count,
        and rank 0's trigger and allocator state.

        Collective: call it on every rank of the process set at the same point (after ``step()``);
        every rank gets the whole bundle, so rank 0 alone can save it. None on ranks outside the
        process set."""
        self._check_between_steps("compression_state_dict()")
        ex = self.gradient_exchange
        if ex is None:
            return None
        local = checkpoint.rank_state(self._step, ex, self.reallocation)
        return checkpoint.bundle(gather_objects(local, self.process_set), layers=ex.numel, config=self._config())

    def load_compression_state_dict(self, state: dict, reset: bool = False) -> None:
        """Resume from ``compression_state_dict()``: every rank takes its own part, and training
        continues exactly as it would have without the interruption (same seeds and data).

        A state saved by a different number of ranks, for a different model or with other coding
        settings raises ``hvd_gradq.StateMismatchError`` naming the mismatch, unless ``reset=True``:
        then the compression state starts afresh (residuals zero; with an allocator, the codebook
        is re-allocated at the next step). Call it on every rank, before the first step."""
        self._check_between_steps("load_compression_state_dict()")
        ex = self.gradient_exchange
        if ex is None:
            return
        parts = checkpoint.parts_to_resume(state, owner=self.label, size=ex.size, ranks=[ex.rank], layers=ex.numel,
                                           config=self._config(), reset=reset)
        if parts is None:
            self.reset_compression_state()
            return
        if "exchange" not in parts[0]:
            raise checkpoint.StateMismatchError(
                f"cannot resume {self.label}'s compression state: it was saved by an earlier version of hvd_gradq "
                f"(before one engine served both ways in); {checkpoint.RESET_HINT}")
        checkpoint.load_engine_state(ex, parts[0]["exchange"])
        self.reallocation.load_state_dict(parts[0])
        self._step = parts[0]["step"]

    def reset_compression_state(self) -> None:
        """Zero every residual; with an allocator, re-allocate the codebook at the next step."""
        if self.gradient_exchange is not None:
            self.gradient_exchange.reset_state()
        self.reallocation.reset()

    def _follow(self, root: int | None, fresh: GradientExchange) -> None:
        """Take global rank ``root``'s codebook, warm-start low-rank factors and step count
        (default: the process set's rank 0)."""
        mine = None
        is_root = hvd.rank() == root if root is not None else self.process_set.rank() == 0
        if is_root:
            ex = self.gradient_exchange
            mine = {"codebook": ex.codebook.state_dict(), "step": self._step,
                    "factors": {n: c.q for n, c in ex.lowrank.items()}}
        shared = broadcast_object(mine, self.process_set, root=root)
        fresh.adopt(shared["codebook"], shared["factors"])
        self._step = shared["step"]  # a worker that joined now counts steps like the others

    def elastic_resync(self) -> None:
        """After the set of workers changed (a Horovod elastic reset): rebuild everything that
        depends on N and this rank (lane widths, chunk bounds, transports) for the current process
        set, fold this rank's residuals into its next step, and take rank 0's codebook (bits,
        scales, versions), so that every rank starts the next step from the same one. With an
        allocator, the bits are re-decided at the next step for the new N. Collective: every rank
        of the process set calls it at the same point; ``hvd_gradq.horovod.elastic`` does so on
        sync and the compressor does so itself at the first step after the world size or its rank
        changed."""
        old = self.gradient_exchange
        if old is None or not self.process_set.included():
            return
        owed = {n: t for n in list(old.numel) if (t := old.take_owed(n)) is not None}
        fresh = self._make_exchange()
        self._follow(None, fresh)
        fresh.residuals.carry = owed
        self.gradient_exchange = fresh
        self._clear_step()
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

        Under ``hvd.join()`` Horovod reduces only by allreduce: layers that go by allreduce work
        (the lanes, the rotated lanes with this step's scales, float32 and 0-bit layers, low-rank
        factors); allgather, two-phase and the allocator's broadcasts raise Horovod's "not supported
        with Join" error."""
        if self.gradient_exchange is not None and self.process_set.included():
            self._follow(root_rank, self.gradient_exchange)

    def local_compression_state(self) -> dict:
        """This rank's compression state (not collective; for Horovod elastic's commit/restore)."""
        ex = self.gradient_exchange
        state = {"size": None, "step": self._step}
        if ex is not None:
            state.update(checkpoint.rank_state(self._step, ex, self.reallocation), size=ex.size)
        return state

    def load_local_compression_state(self, state: dict) -> None:
        """Undo to ``local_compression_state()`` of this rank (elastic restore, before the reset).
        A state from another world size only restores the step count; the next step rebuilds."""
        ex = self.gradient_exchange
        self._clear_step()
        self._step = state["step"]
        if ex is None or state["size"] != ex.size:
            return
        checkpoint.load_engine_state(ex, state["exchange"])
        self.reallocation.load_state_dict(state)
