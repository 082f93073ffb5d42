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
exactly (error feedback conserves the gradient). r (rows + cols) numbers travel instead of rows *
cols, worth it only where that is well below (``worth_it``, as PowerSGD's ``min_compression_rate``).

Factors in float32 (PowerSGD's own), or ``factors="float16"``: the matrix is then taken so that P is
its shorter side (M^T when rows > cols) and stays float32 with the summed header; Q_w, the longer
side, travels in float16 times a power of two 2^e that every rank takes from the same number, the
sum S of the ranks' ||M_w||_F (a word of P's header). Every entry of Q_w and of every partial sum
of the Q_w is at most S in magnitude (|M_w^T p^| <= ||M_w||_F for a unit p^), so with 2^e S <= 2^14
no sum can overflow float16's 65504, and entries down to 2^-28 S stay normal numbers. Each rank's
residual keeps what its own rounding to float16 dropped, so conservation stays exact per rank.
"""
from __future__ import annotations

import math

import torch

#: the factors travel at most this share of the matrix (PowerSGD's default min_compression_rate 2)
MIN_COMPRESSION = 2.0
_FINITE = float(torch.finfo(torch.float32).max)
#: the dtypes the factors travel in: float32, or P in float32 and Q in float16 (module docstring)
FACTORS = ("float32", "float16")
_Q_BYTES = {"float32": 4, "float16": 2}  # bytes per element of Q as it travels (P: always 4)
_HALF_TOP = 14  # float16 sums are scaled so that their bound is at most 2^14 (of 65504)


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


def transposed(rows: int, cols: int, factors: str) -> bool:
    """Whether the code works on M^T: float16 factors with more rows than columns (P, in float32,
    is then the shorter side)."""
    return factors == "float16" and rows > cols


def factor_numel(rows: int, cols: int, rank: int, factors: str = "float32") -> tuple[int, int]:
    """Elements of P and of Q: rows x rank and cols x rank (swapped when ``transposed``)."""
    a, b = (cols, rows) if transposed(rows, cols, factors) else (rows, cols)
    return a * rank, b * rank


def factor_bytes(rows: int, cols: int, rank: int, factors: str = "float32") -> tuple[int, int]:
    """Bytes of P and of Q (without the summed header) in the dtypes they travel in."""
    p, q = factor_numel(rows, cols, rank, factors)
    return 4 * p, _Q_BYTES[factors] * q


def factor_bits(rows: int, cols: int, rank: int, factors: str = "float32") -> int:
    """Bits of P and Q (without the summed header) in the dtypes they travel in."""
    return 8 * sum(factor_bytes(rows, cols, rank, factors))


def half_scale(norm_sum: float) -> float:
    """The power of two 2^e with 2^e S <= 2^14 for S = ``norm_sum`` (1 for S zero or not finite),
    e clamped to [-120, 120] so that 2^e is a normal float32."""
    if not math.isfinite(norm_sum) or norm_sum <= 0.0:
        return 1.0
    e = _HALF_TOP - math.ceil(math.log2(norm_sum))
    return math.ldexp(1.0, max(-120, min(120, e)))


def initial_q(cols: int, rank: int, key: int) -> torch.Tensor:
    """The first right factor: standard normal from a generator seeded with ``key`` (the same on
    every rank that uses the same key)."""
    g = torch.Generator().manual_seed(int(key) % (1 << 63))
    return torch.randn(cols, rank, generator=g, dtype=torch.float32)


def carried_q(q: torch.Tensor, rank: int, fresh: torch.Tensor) -> torch.Tensor:
    """The warm start of a layer whose rank changes from ``q``'s (q_rows x r) to ``rank``:
    fewer columns, the leading right singular subspace of ``q`` scaled by its singular values
    (q V_rank: since the aggregate was P^ q^T with P^ orthonormal, it is the best rank-``rank``
    part of the last aggregate's row space); more columns, all of ``q`` and the rest from
    ``fresh`` (the layer's initial Q at ``rank``, q_rows x rank). Every rank holds the same summed
    q, so every rank computes the same warm start. A ``q`` of another shape, or not finite,
    gives ``fresh``."""
    if q.dim() != 2 or q.shape[0] != fresh.shape[0] or fresh.shape[1] != rank or not bool(torch.isfinite(q).all()):
        return fresh
    old = q.shape[1]
    if rank >= old:
        return torch.cat([q.to(torch.float32), fresh[:, old:]], dim=1).contiguous()
    _, _, vh = torch.linalg.svd(q.to(torch.float64), full_matrices=False)
    return (q.to(torch.float64) @ vh[:rank].t()).to(torch.float32).contiguous()


def orthonormalise(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``p`` (rows x r, r <= rows): the Q of a reduced QR
    decomposition (Householder; deterministic for the same input, so every rank gets the same)."""
    return torch.linalg.qr(p, mode="reduced").Q.contiguous()


def approximate(m: torch.Tensor, q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """What one rank's matrix ``m`` (rows x cols) would be sent as from the right factor ``q`` (as
    if it were the only rank): its projection P^ P^^T m onto the span of m q (flat); ``transpose``:
    the code of m^T (float16 factors of a tall matrix; see ``transposed``), in m's layout. The
    float16 rounding of Q is not in it (relative 2^-11 of each entry)."""
    w = m.t() if transpose else m
    p_hat = orthonormalise(w @ q)
    q_w = w.t() @ p_hat
    return (q_w @ p_hat.t() if transpose else p_hat @ q_w.t()).reshape(-1)


class LowRankCoder:
    """One rank's low-rank code of one layer across steps: the warm-start Q and the residual."""

    def __init__(self, name: str, shape: tuple[int, int], rank: int, key: int, factors: str = "float32") -> None:
        rows, cols = shape
        if not 1 <= rank <= min(rows, cols):
            raise ValueError(f"layer {name!r}: rank {rank} for a {rows} x {cols} matrix; use 1..{min(rows, cols)}")
        if factors not in FACTORS:
            raise ValueError(f"factors must be one of {FACTORS}, got {factors!r}")
        self.name, self.rows, self.cols, self.rank, self.factors = name, rows, cols, rank, factors
        self.transposed = transposed(rows, cols, factors)
        self.q_rows = rows if self.transposed else cols  # Q is (the longer side of a transposed M) x rank
        self.q = initial_q(self.q_rows, rank, key)
        self.residual: torch.Tensor | None = None  # flat float32, rows * cols
        self.norm = 0.0  # ||M||_F of this step (float16 factors: a word of P's header)
        self._m: torch.Tensor | None = None
        self._p_hat: torch.Tensor | None = None
        self._q_local: torch.Tensor | None = None
        self._scale = 1.0
        self._keep = True

    def _work(self) -> torch.Tensor:
        """M, or M^T when transposed (a view)."""
        return self._m.t() if self.transposed else self._m

    # ---- one step: first (P), second (Q), decode ---------------------------------------------
    def first(self, grad: torch.Tensor, *, frozen: bool = False) -> torch.Tensor:
        """This rank's P = M Q (flat float32) for the first allreduce; M = gradient + residual.
        ``frozen``: the layer takes part without touching its residual."""
        g = grad.detach().reshape(-1).to(torch.float32)
        m = g + self.residual if (self.residual is not None and not frozen) else g.clone()
        self._keep = not frozen
        self._m = m.view(self.rows, self.cols)
        if self.factors == "float16":
            self.norm = float(torch.linalg.vector_norm(m))
        return (self._work() @ self.q).reshape(-1)

    def second(self, p_sum: torch.Tensor, norm_sum: float = 0.0) -> torch.Tensor:
        """From the summed P: the common column space P^ and this rank's Q_w = M^T P^ (flat) for the
        second allreduce; float16 factors: 2^e Q_w in float16, e from ``norm_sum`` (the sum of
        the ranks' ``norm``, the same on every rank)."""
        self._p_hat = orthonormalise(p_sum.view(-1, self.rank))
        q_local = self._work().t() @ self._p_hat
        if self.factors == "float16":
            self._scale = half_scale(norm_sum)
            sent = q_local.mul_(self._scale).to(torch.float16)
            self._q_local = sent.to(torch.float32).div_(self._scale)  # what was sent, for the residual
            return sent.reshape(-1)
        self._q_local = q_local
        return q_local.reshape(-1).clone()  # the allreduce sums in place; Q_w is kept for the residual

    def decode(self, q_sum: torch.Tensor) -> torch.Tensor:
        """The aggregate P^ (sum Q_w)^T (flat, a tensor of its own); keeps the residual
        M - P^ Q_w^T and warm-starts the next step from sum Q_w. A non-finite aggregate leaves the
        residual and the warm start as they were (the step is to be skipped, not learnt from)."""
        q_sum = q_sum.view(self.q_rows, self.rank)
        if self.factors == "float16":
            q_sum = q_sum.to(torch.float32).div_(self._scale)
        out = (q_sum @ self._p_hat.t() if self.transposed else self._p_hat @ q_sum.t()).reshape(-1)
        # checked on the factors, not on rows x cols values: P^ has orthonormal columns (|entries|
        # <= 1), so every entry of the product is at most rank * max|sum Q_w|, finite when that is
        bound = float(q_sum.abs().max()) if q_sum.numel() else 0.0
        if bool(torch.isfinite(self._p_hat).all()) and bound * self.rank < _FINITE:
            if self._keep:  # M - P^ Q_w^T in place (transposed: M - Q_w P^^T): M is this coder's own copy
                a, b = (self._q_local, self._p_hat.t()) if self.transposed else (self._p_hat, self._q_local.t())
                self.residual = self._m.addmm_(a, b, alpha=-1.0).reshape(-1)
            self.q = q_sum.clone()
        self._m = self._p_hat = self._q_local = None
        return out

    # ---- state ------------------------------------------------------------------------------
    def take_residual(self) -> torch.Tensor | None:
        """Remove and return the residual (flat) when the layer changes its code."""
        r, self.residual = self.residual, None
        return r

    def state_dict(self) -> dict:
        return {"rank": self.rank, "factors": self.factors, "q": self.q.clone(),
                "residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: dict) -> None:
        factors = state.get("factors", "float32")
        if state["rank"] != self.rank or tuple(state["q"].shape) != (self.q_rows, self.rank) or factors != self.factors:
            raise ValueError(f"layer {self.name!r}: saved low-rank state is rank {state['rank']} "
                             f"{tuple(state['q'].shape)} with {factors} factors, this layer is rank {self.rank} "
                             f"({self.q_rows}, {self.rank}) with {self.factors} factors")
        self.q = state["q"].clone().to(torch.float32)
        self.residual = None if state["residual"] is None else state["residual"].clone().to(torch.float32)
