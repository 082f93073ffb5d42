"""QODA (hvd_gradq.QODA): the update and its step sizes against hand-computed values, convergence on
games with known solutions where gradient descent-ascent fails, with and without quantization,
checkpoints, bad input; and a real np = 2 job (tests/workers/qoda_check.py)."""
import copy
import json
import math

import pytest
import torch

import hvd_gradq
from hvd_gradq import QODA
from tests.hvdrun import WORKERS, horovodrun


def bilinear(d: int = 64, seed: int = 0) -> torch.Tensor:
    """A with singular values spread over [0.5, 1]: min_x max_y x^T A y has its only saddle at 0."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return u @ torch.diag(torch.linspace(0.5, 1.0, d)) @ v.t()


def game_loss(x, y, a):
    """A loss whose gradient is the bilinear game's operator (A y, -A^T x)."""
    return x @ (a @ y.detach()) - x.detach() @ (a @ y)


def play(opt_fn, a, steps, seed=1):
    torch.manual_seed(seed)
    d = a.shape[0]
    x, y = torch.nn.Parameter(torch.randn(d)), torch.nn.Parameter(torch.randn(d))
    opt = opt_fn([x, y])
    start = float(torch.cat([x.detach(), y.detach()]).norm())
    for _ in range(steps):
        opt.zero_grad()
        game_loss(x, y, a).backward()
        opt.step()
    return start, float(torch.cat([x.detach(), y.detach()]).norm()), opt


def test_on_a_bilinear_game_qoda_converges_to_the_saddle_where_gradient_descent_ascent_diverges():
    a = bilinear()
    start, end, opt = play(lambda p: QODA(p, lr=10.0), a, 300)
    assert end < 2e-3 * start, (start, end)
    assert opt.param_groups[0]["steps"] == 300 and opt.param_groups[0]["skipped"] == 0
    start, end, _ = play(lambda p: torch.optim.SGD(p, lr=0.1), a, 300)
    assert end > 2 * start, (start, end)  # simultaneous GDA spirals out


def test_on_a_strongly_monotone_quadratic_game_qoda_reaches_the_solution():
    """V(z) = M z - c with M = P + K (P positive definite, K skew): the solution is M^-1 c."""
    g = torch.Generator().manual_seed(3)
    d = 40
    r = torch.randn(d, d, generator=g) / d ** 0.5
    m = r @ r.t() + 0.5 * torch.eye(d) + (lambda k: k - k.t())(torch.randn(d, d, generator=g) / d ** 0.5)
    c = torch.randn(d, generator=g)
    solution = torch.linalg.solve(m, c)
    z = torch.nn.Parameter(torch.zeros(d))
    opt = QODA([z], lr=3.0)
    for _ in range(400):
        opt.zero_grad()
        z.grad = m @ z.detach() - c
        opt.step()
    assert float((z.detach() - solution).norm()) < 1e-3 * float(solution.norm())


def test_step_sizes_and_iterates_are_the_formula_s_hand_computed_values():
    p = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = QODA([p], lr=1.0)
    p.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    # S = (2 - 0)^2 = 4; eta = gamma = 1/sqrt(5); X_2 = 0.5 - 2/sqrt(5); X_{5/2} = X_2 - 2/sqrt(5)
    assert opt.step_sizes(opt.param_groups[0]) == (1 / math.sqrt(5), 1 / math.sqrt(5))
    assert float(p) == pytest.approx(0.5 - 4 / math.sqrt(5), abs=1e-15)  # -1.28885438...
    p.grad = torch.tensor([-1.0], dtype=torch.float64)
    opt.step()
    # S = 4 + (-1 - 2)^2 = 13; Y = -2 + 1 = -1; X_3 = 0.5 - 1/sqrt(14); X_{7/2} = X_3 + 1/sqrt(14) = 0.5
    assert opt.param_groups[0]["variation"] == 13.0
    assert float(p) == pytest.approx(0.5, abs=1e-15)
    q = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = QODA([q], lr=2.0, lr_half=0.5, q=0.25)
    q.grad = torch.tensor([3.0], dtype=torch.float64)
    opt.step()
    # S = 9: eta = 2/sqrt(10) = 0.632455..., gamma = 0.5 * 10^(-1/4) = 0.281170...
    eta, gamma = opt.step_sizes(opt.param_groups[0])
    assert eta == pytest.approx(0.6324555320336759) and gamma == pytest.approx(0.28117066259517454)
    assert float(q) == pytest.approx(-3 * 0.6324555320336759 - 3 * 0.28117066259517454, abs=1e-12)


def test_a_resumed_optimizer_continues_bit_for_bit():
    a = bilinear(16)

    def run(steps, state=None, params=None):
        torch.manual_seed(1)
        x, y = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))
        if params is not None:
            with torch.no_grad():
                x.copy_(params[0])
                y.copy_(params[1])
        opt = QODA([{"params": [x], "lr": 2.0}, {"params": [y], "lr": 3.0, "q": 0.1}])
        if state is not None:
            opt.load_state_dict(state)
        for _ in range(steps):
            opt.zero_grad()
            game_loss(x, y, a).backward()
            opt.step()
        return (x.detach().clone(), y.detach().clone()), copy.deepcopy(opt.state_dict())

    full, _ = run(20)
    half, state = run(10)
    resumed, _ = run(10, state, half)
    assert all(torch.equal(u, v) for u, v in zip(full, resumed))
    assert state["param_groups"][0]["variation"] != state["param_groups"][1]["variation"]  # one S per player


def test_non_finite_dual_vectors_leave_the_group_as_it_was():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = QODA([p], lr=1.0)
    p.grad = torch.tensor([0.5, -0.5])
    opt.step()
    before, state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    p.grad = torch.tensor([float("nan"), 1.0])
    opt.step()
    assert torch.equal(p.detach(), before) and opt.param_groups[0]["skipped"] == 1
    assert opt.param_groups[0]["variation"] == state["param_groups"][0]["variation"]


@pytest.mark.parametrize("kw, message", [({"lr": 0.0}, "lr must be"), ({"lr": -1.0}, "lr must be"),
                                         ({"q": 0.3}, r"q must be .*\[0, 0.25\]"), ({"lr_half": -1.0}, "lr_half")])
def test_bad_settings_are_refused_with_the_rule(kw, message):
    with pytest.raises(ValueError, match=message):
        QODA([torch.nn.Parameter(torch.zeros(2))], **kw)


@pytest.mark.parametrize("codec, bits", [("rotated", 4), ("rotated", 2), ("qsgd", 4)])
def test_with_quantized_exchanges_qoda_converges_and_communicates_once_per_step(codec, bits):
    """Four simulated workers, each with its own noise on the operator (zero mean over the workers);
    the exchange runs the collectives of one gradient exchange per step, the same as SGD's."""
    a = bilinear()
    d = a.shape[0]

    def run(make):
        torch.manual_seed(1)
        x, y = torch.nn.Parameter(torch.randn(d)), torch.nn.Parameter(torch.randn(d))
        sim = hvd_gradq.SimulatedWorkers(make([x, y]), [("x", x), ("y", y)], 4, codec=codec, bits=bits,
                                         min_elements=32)
        calls = []
        submit = sim.world.submit
        sim.world.submit = lambda *args: (calls.append(args[0]), submit(*args))[1]  # count the collectives
        start = float(torch.cat([x.detach(), y.detach()]).norm())
        g = torch.Generator().manual_seed(5)
        for _ in range(300):
            sim.zero_grad()
            noise = torch.randn(4, 2, d, generator=g) * 0.05
            noise -= noise.mean(0)
            for k in range(4):
                sim.backward(game_loss(x, y, a) + noise[k, 0] @ x + noise[k, 1] @ y)
            sim.step()
        return start, float(torch.cat([x.detach(), y.detach()]).norm()), len(calls), sim.payload_bytes()

    start, end, calls, sent = run(lambda p: QODA(p, lr=10.0))
    assert end < 0.02 * start, (start, end)
    _, _, sgd_calls, sgd_sent = run(lambda p: torch.optim.SGD(p, lr=0.01))
    assert calls == sgd_calls and sent == sgd_sent  # QODA adds no exchange


def test_under_horovodrun_np2_qoda_converges_through_the_drop_in_with_every_rank_identical(tmp_path):
    run = horovodrun(WORKERS / "qoda_check.py", "--out", tmp_path, np=2, timeout=180)
    assert run.returncode == 0, run.output[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in ranks:
        for name in ("dropin", "horovod_fp16"):
            assert res[name]["end"] < 0.02 * res[name]["start"], res
        assert res["dropin"]["steps"] == 300 and res["dropin"]["skipped"] == 0
    assert ranks[0]["dropin"]["digest"] == ranks[1]["dropin"]["digest"]
    assert ranks[0]["horovod_fp16"]["digest"] == ranks[1]["horovod_fp16"]["digest"]
