"""The low-rank code's algebra (pure): N ranks simulated in one process, each with its own coder."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_gradq.codecs.lowrank import (
    LowRankCoder,
    approximate,
    carried_q,
    factor_bits,
    factor_numel,
    half_scale,
    initial_q,
    matrix_shape,
    orthonormalise,
    worth_it,
)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def step(coders, grads):
    """One exchange: P summed, Q summed, every rank decodes the same aggregate."""
    p_sum = sum(c.first(g) for c, g in zip(coders, grads))
    norm_sum = sum(c.norm for c in coders)  # float16 factors: a word of P's summed header
    payloads = [c.second(p_sum, norm_sum) for c in coders]
    q_sum = payloads[0].clone()
    for q in payloads[1:]:  # in rank order, rounded after each add (as the allreduce does)
        q_sum += q
    outs = [c.decode(q_sum) for c in coders]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    return outs[0]


@SETTINGS
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), rank=st.integers(1, 6), n=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_the_aggregate_is_the_projection_of_the_sum_and_error_feedback_conserves_it(rows, cols, rank, n, seed):
    rank = min(rank, rows, cols)
    g = torch.Generator().manual_seed(seed)
    coders = [LowRankCoder("w", (rows, cols), rank, key=7) for _ in range(n)]
    kept = torch.zeros(rows * cols, dtype=torch.float64)
    entered = torch.zeros(rows * cols, dtype=torch.float64)
    for _ in range(3):
        grads = [torch.randn(rows * cols, generator=g) for _ in range(n)]
        m_sum = sum(gr.double() + (0 if c.residual is None else c.residual.double()) for gr, c in zip(grads, coders))
        out = step(coders, grads)
        assert coders[0].q.shape == (cols, rank)
        entered += sum(gr.double() for gr in grads)
        kept += out.double()
        residual = sum(c.residual.double() for c in coders)  # sent + kept = what each rank had
        assert torch.allclose(out.double() + residual, m_sum, atol=1e-4 * (1 + float(m_sum.abs().max())))
    # over the steps: everything that entered was sent or is still owed
    owed = sum(c.residual.double() for c in coders)
    assert torch.allclose(kept + owed, entered, atol=1e-4 * (1 + float(entered.abs().max())))


def test_a_sum_of_rank_r_is_recovered_exactly_by_the_warm_started_iteration():
    g = torch.Generator().manual_seed(3)
    rows, cols, rank, n = 60, 45, 3, 3
    u, v = torch.randn(rows, rank, generator=g), torch.randn(cols, rank, generator=g)
    target = u @ v.t()
    grads = [(target * (w + 1) / 6).reshape(-1) for w in range(n)]  # sums to target
    coders = [LowRankCoder("w", (rows, cols), rank, key=11) for _ in range(n)]
    out = step(coders, grads)
    rel = float((out.view(rows, cols) - target).norm() / target.norm())
    assert rel < 1e-5, rel  # the column space of a rank-r matrix is found in one iteration


def test_the_projection_matches_the_summed_gradient_projected_on_the_common_space():
    g = torch.Generator().manual_seed(5)
    rows, cols, rank = 30, 20, 4
    coders = [LowRankCoder("w", (rows, cols), rank, key=1) for _ in range(2)]
    grads = [torch.randn(rows * cols, generator=g) for _ in range(2)]
    p_sum = sum(c.first(gr) for c, gr in zip(coders, grads))
    q_sum = sum(c.second(p_sum) for c in coders)
    p_hat = orthonormalise(p_sum.view(rows, rank))
    expected = p_hat @ p_hat.t() @ sum(gr.view(rows, cols) for gr in grads)
    out = coders[0].decode(q_sum)
    assert torch.allclose(out.view(rows, cols), expected, atol=1e-5)
    assert torch.equal(coders[0].q, q_sum.view(cols, rank))  # warm start for the next step


def test_shapes_ranks_and_non_finite_steps():
    assert matrix_shape((8, 3, 3, 3)) == (8, 27) and matrix_shape((5,)) is None and matrix_shape(()) is None
    assert worth_it(512, 512, 4) and not worth_it(10, 10, 4) and not worth_it(512, 512, 0)
    with pytest.raises(ValueError, match=r"rank 9 for a 8 x 30 matrix; use 1\.\.8"):
        LowRankCoder("w", (8, 30), 9, key=0)
    c = LowRankCoder("w", (6, 5), 2, key=0)
    step([c], [torch.randn(30)])
    q, res = c.q.clone(), c.residual.clone()
    bad = torch.randn(30)
    bad[3] = float("nan")
    out = step([c], [bad])
    assert not bool(torch.isfinite(out).all())
    assert torch.equal(c.q, q) and torch.equal(c.residual, res)  # nothing learnt from a skipped step
    state = c.state_dict()
    d = LowRankCoder("w", (6, 5), 2, key=99)
    d.load_state_dict(state)
    assert torch.equal(d.q, c.q) and torch.equal(d.residual, c.residual)
    with pytest.raises(ValueError, match="rank 2"):
        LowRankCoder("w", (6, 5), 3, key=0).load_state_dict(state)


# ---- float16 factors --------------------------------------------------------------------------------
@SETTINGS
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), rank=st.integers(1, 6), n=st.integers(1, 4),
       seed=st.integers(0, 10_000), magnitude=st.sampled_from([1e-12, 1e-6, 1.0, 1e6, 1e12]))
def test_float16_factors_conserve_per_rank_and_stay_within_half_precision_of_float32(rows, cols, rank, n, seed,
                                                                                     magnitude):
    rank = min(rank, rows, cols)
    g = torch.Generator().manual_seed(seed)
    half = [LowRankCoder("w", (rows, cols), rank, key=7, factors="float16") for _ in range(n)]
    full = [LowRankCoder("w", (rows, cols), rank, key=7) for _ in range(n)]
    for _ in range(3):
        grads = [torch.randn(rows * cols, generator=g) * magnitude for _ in range(n)]
        ms = [gr.double() + (0 if c.residual is None else c.residual.double()) for gr, c in zip(grads, half)]
        p_sum = sum(c.first(gr) for c, gr in zip(half, grads))
        norm_sum = sum(c.norm for c in half)
        sent = [c.second(p_sum, norm_sum) for c in half]
        # what each rank contributes: P^ times its Q_w as rounded to float16 and unscaled
        shares = [(c._q_local @ c._p_hat.t() if c.transposed else c._p_hat @ c._q_local.t()).reshape(-1).double()
                  for c in half]
        q_sum = sent[0].clone()
        for q in sent[1:]:
            q_sum += q
        out = half[0].decode(q_sum)
        for c in half[1:]:
            assert torch.equal(c.decode(q_sum), out)
        assert bool(torch.isfinite(out).all())  # no overflow at any magnitude
        for c, m, share in zip(half, ms, shares):  # each rank: what it sent + what it kept = what it had
            assert torch.allclose(share + c.residual.double(), m, atol=1e-5 * float(m.abs().max()), rtol=0)
        # the aggregate is the sum of the shares, rounded to float16 at each add (2^-11 relative per add)
        scale = max(float(m.abs().max()) for m in ms)
        assert torch.allclose(out.double(), sum(shares), atol=n * 2e-3 * scale, rtol=0)
    if rows <= cols:  # same orientation: the float32 code of the same inputs, up to float16's rounding
        for c in full:
            c.q = torch.randn(cols, rank, generator=torch.Generator().manual_seed(1))
        for c in half:
            c.q, c.residual = full[0].q.clone(), None
        grads = [torch.randn(rows * cols, generator=g) * magnitude for _ in range(n)]
        a, b = step(half, grads), step(full, grads)
        assert float((a - b).norm()) <= 4e-3 * float(b.norm())


def test_float16_factors_of_a_tall_matrix_work_on_its_transpose_and_recover_a_rank_r_sum():
    rows, cols, rank, n = 90, 20, 3, 2
    assert factor_numel(rows, cols, rank, "float16") == (cols * rank, rows * rank)  # P: the shorter side
    assert factor_numel(rows, cols, rank) == (rows * rank, cols * rank)
    assert factor_bits(rows, cols, rank, "float16") == 32 * cols * rank + 16 * rows * rank
    assert factor_bits(rows, cols, rank) == 32 * (rows + cols) * rank
    g = torch.Generator().manual_seed(4)
    target = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    coders = [LowRankCoder("w", (rows, cols), rank, key=5, factors="float16") for _ in range(n)]
    assert coders[0].transposed and coders[0].q.shape == (rows, rank)
    p = coders[0].first((target / 2).reshape(-1))
    assert p.dtype == torch.float32 and p.numel() == cols * rank
    coders[1].first((target / 2).reshape(-1))
    sent = coders[0].second(p + p, coders[0].norm * 2)
    assert sent.dtype == torch.float16 and sent.numel() == rows * rank
    coders[1].second(p + p, coders[0].norm * 2)
    out = coders[0].decode(sent + sent)
    assert float((out.view(rows, cols) - target).norm() / target.norm()) < 2e-3
    # the allocator's view of the same code (one rank, from the same Q)
    c = LowRankCoder("w", (rows, cols), rank, key=5, factors="float16")
    view = approximate(target, c.q, transpose=True)
    assert float((view.view(rows, cols) - target).norm() / target.norm()) < 1e-4


def test_the_float16_scale_bounds_every_sum_and_is_shared():
    for s in (1e-38, 3e-9, 0.7, 1.0, 2.0, 12345.0, 3e37):
        k = half_scale(s)
        assert k == 2.0 ** round(__import__("math").log2(k))  # a power of two: exact to undo
        assert s * k <= 2.0 ** 14 and (s * k > 2.0 ** 13 or k == 2.0 ** 120)
    assert half_scale(0.0) == half_scale(float("inf")) == half_scale(float("nan")) == 1.0
    c = LowRankCoder("w", (6, 5), 2, key=0, factors="float16")
    step([c], [torch.randn(30)])
    with pytest.raises(ValueError, match=r"float16 factors, this layer is rank 2 .* with float32 factors"):
        LowRankCoder("w", (6, 5), 2, key=0).load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="factors must be one of"):
        LowRankCoder("w", (6, 5), 2, key=0, factors="bfloat16")


def test_a_rank_change_carries_the_leading_subspace_of_q():
    """Fewer columns: q V_r, the leading right singular subspace scaled by its singular values, so the
    last aggregate's best rank-r part is what the new rank starts from; more columns: q kept, the
    rest fresh; a q of another shape or not finite: fresh."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(30, 4, generator=g) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.2]))
    fresh2, fresh6 = initial_q(30, 2, 9), initial_q(30, 6, 9)
    small = carried_q(q, 2, fresh2)
    assert small.shape == (30, 2) and small.dtype == torch.float32
    s_all = torch.linalg.svdvals(q.double())
    assert torch.allclose(torch.linalg.svdvals(small.double()), s_all[:2], rtol=1e-5)
    # its columns span the top-2 left singular vectors of q: projecting q onto them keeps s1^2 + s2^2
    basis = orthonormalise(small.double())
    assert float((basis.t() @ q.double()).square().sum()) == pytest.approx(float(s_all[:2].square().sum()), rel=1e-6)
    p_hat = orthonormalise(torch.randn(40, 4, generator=g))  # the aggregate P^ q^T: its best rank-2 part
    agg = p_hat @ q.t()
    best = torch.linalg.svdvals(agg.double())[2:].square().sum().sqrt()
    via = approximate(agg, small).view(40, 30).double()
    assert float(torch.linalg.norm(agg.double() - via)) == pytest.approx(float(best), rel=1e-4)
    grown = carried_q(q, 6, fresh6)
    assert torch.equal(grown[:, :4], q) and torch.equal(grown[:, 4:], fresh6[:, 4:])
    assert torch.equal(carried_q(q, 2, initial_q(20, 2, 9)), initial_q(20, 2, 9))  # another shape
    bad = q.clone()
    bad[0, 0] = float("nan")
    assert torch.equal(carried_q(bad, 2, fresh2), fresh2)
