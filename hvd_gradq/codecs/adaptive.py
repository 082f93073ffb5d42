"""Fitting quantization levels to the distribution of normalised gradient coordinates.

Notation as in the ALQ/AMQ paper (../shared/papers/alq-amq-adaptive-levels.txt): a coordinate
v_i of a bucket with norm ||v|| has normalised magnitude r_i = |v_i| / ||v|| in [0, 1]; levels
0 = l_0 < l_1 < ... < l_{s+1} = 1; stochastic rounding between the two neighbouring levels has
variance sigma^2(r) = (l_{j+1} - r)(r - l_j). The objective is the expected normalised variance
Psi(l) = E[sigma^2(r)] (Eq. 3), estimated here from samples of r (the empirical distribution).

* ALQ: coordinate descent, each interior level set to
  beta(a, c) = F^-1(F(c) - int_a^c (r - a)/(c - a) dF(r))  (Eq. 4-5), a and c its neighbours.
* AMQ: exponentially spaced levels l = (0, p^s, ..., p, 1) with one multiplier p, fitted by
  gradient descent on Psi(p); the derivative is the paper's Eq. 8 evaluated on the samples.
"""
from __future__ import annotations

import torch


def normalized_coordinates(x: torch.Tensor, norm: str, bucket_size: int) -> torch.Tensor:
    """r = |x| / ||bucket|| for every element of ``x`` (flattened, zero-norm buckets dropped)."""
    x = x.detach().reshape(-1).to(torch.float32)
    n = x.numel()
    nb = -(-n // bucket_size)
    xb = torch.zeros(nb * bucket_size)
    xb[:n] = x
    xb = xb.view(nb, bucket_size)
    ord_ = 2 if norm == "l2" else float("inf")
    norms = torch.linalg.vector_norm(xb, ord=ord_, dim=1, keepdim=True)
    keep = (norms > 0).view(-1)
    r = (xb[keep].abs() / norms[keep]).clamp_(max=1.0)
    # drop the zero padding of the last bucket
    pad = nb * bucket_size - n
    if pad and keep[-1]:
        r = r.reshape(-1)[:-pad]
    return r.reshape(-1)


def normalized_variance(levels: torch.Tensor, r: torch.Tensor) -> float:
    """Psi(levels): mean of (hi - r)(r - lo) over the samples ``r`` (Eq. 3, empirical)."""
    levels = levels.to(torch.float64)
    r = r.to(torch.float64)
    idx = (torch.searchsorted(levels, r, right=True) - 1).clamp_(0, levels.numel() - 2)
    lo, hi = levels[idx], levels[idx + 1]
    return float(((hi - r) * (r - lo)).mean())


def fit_alq(r: torch.Tensor, levels: torch.Tensor, sweeps: int = 10) -> torch.Tensor:
    """ALQ: coordinate descent on the interior levels (Eq. 5), starting from ``levels``."""
    rs = torch.sort(r.to(torch.float64).reshape(-1)).values
    n = rs.numel()
    if n == 0:
        return levels.clone()
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(rs, 0)])
    lv = levels.to(torch.float64).clone()

    def cdf_count(v: float) -> int:
        return int(torch.searchsorted(rs, torch.tensor([v], dtype=torch.float64), right=True))

    for _ in range(sweeps):
        old = lv.clone()
        for j in range(1, lv.numel() - 1):
            a, c = float(lv[j - 1]), float(lv[j + 1])
            if c <= a:
                continue
            ia, ic = cdf_count(a), cdf_count(c)
            # int_a^c (r - a)/(c - a) dF(r), with F the empirical CDF
            mass = (float(prefix[ic] - prefix[ia]) - a * (ic - ia)) / (c - a) / n
            q = ic / n - mass  # F(beta)
            k = min(max(int(torch.ceil(torch.tensor(q * n)).item()) - 1, 0), n - 1)
            # F^-1(q), kept strictly between the neighbours so the levels stay distinct
            gap = (c - a) * 1e-3
            lv[j] = min(max(float(rs[k]), a + gap), c - gap)
        if torch.allclose(lv, old, atol=1e-9):
            break
    return _keep_distinct(lv).to(levels.dtype)


def _keep_distinct(lv: torch.Tensor, gap: float = 1e-6) -> torch.Tensor:
    """Levels at least ``gap`` apart (so they stay distinct in float32), 0 and 1 kept in place.
    Degenerate samples (e.g. every r = 1) would otherwise pile levels onto each other."""
    lv = lv.clone()
    for j in range(lv.numel() - 2, 0, -1):
        lv[j] = min(float(lv[j]), float(lv[j + 1]) - gap)
    for j in range(1, lv.numel() - 1):
        lv[j] = max(float(lv[j]), float(lv[j - 1]) + gap)
    return lv


#: smallest nonzero level an exponential level set may reach: float32's smallest normal number,
#: so that all levels stay distinct (8-bit NUQSGD, p = 1/2 with 128 levels, reaches exactly this)
SMALLEST_LEVEL = 2.0**-126


def min_multiplier(count: int) -> float:
    """Smallest p whose levels p^(count-2) stay >= SMALLEST_LEVEL (distinct in float32)."""
    return SMALLEST_LEVEL ** (1.0 / (count - 2)) if count > 2 else 0.0


def exponential_levels(p: float, count: int) -> torch.Tensor:
    """(0, p^(count-2), ..., p, 1): ``count`` magnitude levels with multiplier ``p``."""
    if count < 2:
        raise ValueError("need at least 2 levels (0 and 1)")
    if not min_multiplier(count) * (1 - 1e-12) <= p < 1:
        raise ValueError(f"multiplier p must be in [{min_multiplier(count):.3g}, 1) for {count} levels, got {p}")
    powers = [p ** k for k in range(count - 2, -1, -1)]
    return torch.tensor([0.0, *powers], dtype=torch.float32)


def _amq_objective_and_grad(p: float, r: torch.Tensor, count: int) -> tuple[float, float]:
    s = count - 2  # number of levels strictly between 0 and 1
    levels = exponential_levels(p, count).to(torch.float64)
    idx = (torch.searchsorted(levels, r, right=True) - 1).clamp_(0, count - 2)
    lo, hi = levels[idx], levels[idx + 1]
    psi = float(((hi - r) * (r - lo)).mean())
    # derivative of (hi - r)(r - lo) wrt p per interval (Eq. 8): with hi = p^j, lo = p^(j+1),
    # (j p^(j-1) + (j+1) p^j) r - (2j+1) p^(2j); on [0, p^s]: s p^(s-1) r
    j = (s - idx).to(torch.float64)  # hi = p^j for idx >= 1
    inner = (j * p ** (j - 1) + (j + 1) * p**j) * r - (2 * j + 1) * p ** (2 * j)
    bottom = s * p ** (s - 1) * r if s > 0 else torch.zeros_like(r)
    grad = torch.where(idx == 0, bottom, inner)
    return psi, float(grad.mean())


def fit_amq(r: torch.Tensor, count: int, p0: float = 0.5, steps: int = 100) -> float:
    """AMQ: the multiplier p in (0, 1) minimising Psi over exponential levels: Psi(p) has several
    local minima, so the descent starts from the best of ``p0`` and a grid of 32 multipliers, then
    gradient descent with backtracking (every accepted step lowers Psi)."""
    r = r.to(torch.float64).reshape(-1)
    if count <= 2 or r.numel() == 0:
        return p0
    low = max(1e-3, min_multiplier(count))
    grid = torch.linspace(low, 1 - 1e-2, 32, dtype=torch.float64).tolist()
    starts = [min(max(low, p0), 1 - 1e-3), *(max(low, c) for c in grid)]
    p, (psi, grad) = min(((c, _amq_objective_and_grad(c, r, count)) for c in starts), key=lambda t: t[1][0])
    lr = 0.5
    for _ in range(steps):
        cand = min(max(p - lr * grad, low), 1 - 1e-3)
        psi_c, grad_c = _amq_objective_and_grad(cand, r, count)
        if psi_c <= psi:
            if abs(cand - p) < 1e-7:
                break
            p, psi, grad = cand, psi_c, grad_c
            lr *= 1.5
        else:
            lr *= 0.5
            if lr < 1e-8:
                break
    return p
