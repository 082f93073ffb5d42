"""The low-rank code's algebra (pure): N ranks simulated in one process, each with its own coder."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_gradq.codecs.lowrank import LowRankCoder, matrix_shape, orthonormalise, worth_it

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def step(coders, grads):
    """One exchange: P summed, Q summed, every rank decodes the same aggregate."""
    p_sum = sum(c.first(g) for c, g in zip(coders, grads))
    q_sum = sum(c.second(p_sum) for c in coders)
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
