"""The low-rank code of a matrix gradient (PowerSGD: Vogels, Karimireddy & Jaggi, NeurIPS 2019,
"PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization", Algorithm 1).
Pure tensor math: the exchange engine moves the factors.

A layer's gradient M (rows x cols; a conv kernel (out, in, *k) as (out, in * prod(k))) with its
error-feedback residual added is coded at rank r by one step of subspace iteration, warm-started
from the previous step's right factor Q (cols x r, the same on every rank):

    P_w = M_w Q                  summed over the ranks (first allreduce)
    P^  = orthonormalise(sum P)  the same on every rank
    Q_w = M_w^T P^               summed over the ranks (second allreduce)
    sum over ranks ~ P^ (sum Q_w)^T,   and Q <- sum Q_w for the next step.

Rank w's share of the aggregate is P^ Q_w^T = P^ P^^T M_w, its projection onto the common column
space, so its residual is M_w - P^ P^^T M_w: what it sent plus what it keeps is what it had,
exactly (error feedback conserves the gradient). The factors are float32; r (rows + cols) numbers
travel instead of rows * cols, worth it only where that is well below (``worth_it``, as PowerSGD's
``min_compression_rate``).
"""
from __future__ import annotations

import math

import torch

#: the factors travel at most this share of the matrix (PowerSGD's default min_compression_rate 2)
MIN_COMPRESSION = 2.0
_FINITE = float(torch.finfo(torch.float32).max)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of the matrix a parameter of ``shape`` is coded as; None for vectors and scalars."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def worth_it(rows: int, cols: int, rank: int, min_compression: float = MIN_COMPRESSION) -> bool:
    """Whether rank-``rank`` factors of a rows x cols matrix are at most 1/min_compression of it."""
    return rank >= 1 and (rows + cols) * rank * min_compression <= rows * cols


def factored_shape(shape: torch.Size | tuple[int, ...], rank: int) -> tuple[int, int] | None:
    """(rows, cols) when a parameter of ``shape`` can be sent as rank-``rank`` factors: a matrix
    (or conv kernel) with rank <= min(rows, cols) whose factors are ``worth_it``; None otherwise."""
    ms = matrix_shape(shape) if rank else None
    return ms if ms is not None and rank <= min(ms) and worth_it(*ms, rank) else None


def factor_numel(rows: int, cols: int, rank: int) -> tuple[int, int]:
    """Elements of P (rows x rank) and Q (cols x rank)."""
    return rows * rank, cols * rank


def initial_q(cols: int, rank: int, key: int) -> torch.Tensor:
    """The first right factor: standard normal from a generator seeded with ``key`` (the same on
    every rank that uses the same key)."""
    g = torch.Generator().manual_seed(int(key) % (1 << 63))
    return torch.randn(cols, rank, generator=g, dtype=torch.float32)


def orthonormalise(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``p`` (rows x r, r <= rows): the Q of a reduced QR
    decomposition (Householder; deterministic for the same input, so every rank gets the same)."""
    return torch.linalg.qr(p, mode="reduced").Q.contiguous()


def approximate(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What one rank's matrix ``m`` (rows x cols) would be sent as from the right factor ``q`` (as
    if it were the only rank): its projection P^ P^^T m onto the span of m q (flat)."""
    p_hat = orthonormalise(m @ q)
    return (p_hat @ (m.t() @ p_hat).t()).reshape(-1)


class LowRankCoder:
    """One rank's low-rank code of one layer across steps: the warm-start Q and the residual."""

    def __init__(self, name: str, shape: tuple[int, int], rank: int, key: int) -> None:
        rows, cols = shape
        if not 1 <= rank <= min(rows, cols):
            raise ValueError(f"layer {name!r}: rank {rank} for a {rows} x {cols} matrix; use 1..{min(rows, cols)}")
        self.name, self.rows, self.cols, self.rank = name, rows, cols, rank
        self.q = initial_q(cols, rank, key)
        self.residual: torch.Tensor | None = None  # flat float32, rows * cols
        self._m: torch.Tensor | None = None
        self._p_hat: torch.Tensor | None = None
        self._q_local: torch.Tensor | None = None
        self._keep = True

    # ---- one step: first (P), second (Q), decode ---------------------------------------------
    def first(self, grad: torch.Tensor, *, frozen: bool = False) -> torch.Tensor:
        """This rank's P = M Q (flat float32) for the first allreduce; M = gradient + residual.
        ``frozen``: the layer takes part without touching its residual."""
        g = grad.detach().reshape(-1).to(torch.float32)
        m = g + self.residual if (self.residual is not None and not frozen) else g.clone()
        self._keep = not frozen
        self._m = m.view(self.rows, self.cols)
        return (self._m @ self.q).reshape(-1)

    def second(self, p_sum: torch.Tensor) -> torch.Tensor:
        """From the summed P: the common column space P^ and this rank's Q_w = M^T P^ (flat) for the
        second allreduce."""
        self._p_hat = orthonormalise(p_sum.view(self.rows, self.rank))
        self._q_local = self._m.t() @ self._p_hat
        return self._q_local.reshape(-1).clone()  # the allreduce sums in place; Q_w is kept for the residual

    def decode(self, q_sum: torch.Tensor) -> torch.Tensor:
        """The aggregate P^ (sum Q_w)^T (flat, a tensor of its own); keeps the residual
        M - P^ Q_w^T and warm-starts the next step from sum Q_w. A non-finite aggregate leaves the
        residual and the warm start as they were (the step is to be skipped, not learnt from)."""
        q_sum = q_sum.view(self.cols, self.rank)
        out = (self._p_hat @ q_sum.t()).reshape(-1)
        # checked on the factors, not on rows x cols values: P^ has orthonormal columns (|entries|
        # <= 1), so every entry of the product is at most rank * max|sum Q_w|, finite when that is
        bound = float(q_sum.abs().max()) if q_sum.numel() else 0.0
        if bool(torch.isfinite(self._p_hat).all()) and bound * self.rank < _FINITE:
            if self._keep:  # M - P^ Q_w^T in place: M is this coder's own copy
                self.residual = self._m.addmm_(self._p_hat, self._q_local.t(), alpha=-1.0).reshape(-1)
            self.q = q_sum.clone()
        self._m = self._p_hat = self._q_local = None
        return out

    # ---- state ------------------------------------------------------------------------------
    def take_residual(self) -> torch.Tensor | None:
        """Remove and return the residual (flat) when the layer changes its code."""
        r, self.residual = self.residual, None
        return r

    def state_dict(self) -> dict:
        return {"rank": self.rank, "q": self.q.clone(),
                "residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["rank"] != self.rank or tuple(state["q"].shape) != (self.cols, self.rank):
            raise ValueError(f"layer {self.name!r}: saved low-rank state is rank {state['rank']} "
                             f"{tuple(state['q'].shape)}, this layer is rank {self.rank} ({self.cols}, {self.rank})")
        self.q = state["q"].clone().to(torch.float32)
        self.residual = None if state["residual"] is None else state["residual"].clone().to(torch.float32)
