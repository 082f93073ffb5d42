"""SimulatedWorkers: N workers in one process give the aggregate of a real horovodrun -np N job
(the same exchange code on the same bytes), and the in-process collectives route bytes as
Horovod does."""
import copy

import pytest
import torch
import torch.nn.functional as F

import hvd_gradq
from hvd_gradq.exchange.collectives import SimulatedWorld
from hvd_gradq.wire.header import header_len
from tests.hvdrun import WORKERS, horovodrun
from tests.workers.sim_cases import STEPS, flat_grads, setup


def backward_all(sim, model, micro_batch, step: int, size: int) -> None:
    """One step's backward on every simulated worker, in rank order (its micro-batch of ``step``)."""
    sim.zero_grad()
    for r in range(size):
        x, y = micro_batch(step, r, size)
        sim.backward(F.cross_entropy(model(x), y))


def simulate(case: str, size: int):
    torch.set_num_threads(1)  # as the workers: the same kernels, so the same float32 gradients
    model, base, kw, micro_batch = setup(case)
    sim = hvd_gradq.SimulatedWorkers(base, model.named_parameters(), size, **kw)
    aggregates = []
    for step in range(STEPS):
        backward_all(sim, model, micro_batch, step, size)
        sim.synchronize()
        aggregates.append(flat_grads(model).clone())
        sim.step()
    return sim, aggregates


@pytest.mark.parametrize("case,size", [("lanes", 2), ("gather", 2), ("jointsq", 2), ("topk", 2), ("alq", 2),
                                       ("alq_type", 2),
                                       ("rotated", 2), ("gather", 4), ("lowrank", 2), ("lowrank", 4),
                                       ("lowrank16", 2), ("lowrank16", 4), ("mixed", 2)])
def test_simulated_workers_give_the_aggregate_of_a_real_job(tmp_path, case, size):
    run = horovodrun(WORKERS / "sim_check.py", "--case", case, "--out", tmp_path, np=size, timeout=240)
    assert run.returncode == 0, run.output[-6000:]
    real = torch.load(tmp_path / "real.pt")
    for r in range(1, size):  # every rank decoded the same aggregates, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / f"real_r{r}.pt"), real["aggregates"]))
    sim, aggregates = simulate(case, size)
    assert {p.name: p.bits for p in sim.layer_plans()} == real["bits"]
    assert {p.name: p.transport for p in sim.layer_plans()} == real["transports"]
    assert [p.payload_bytes for p in sim.layer_plans()] == real["payload"]
    assert [e.version for e in sim.allocation_events] == real["versions"]
    if case == "lanes":
        assert len(real["versions"]) == 2, "the interval trigger should have fired at steps 0 and 2"
    if case in ("alq", "alq_type"):
        assert real["levels"] and real["levels"] == levels_of(sim.exchanges[0])
    if case == "alq_type":  # one level set per type, the same on every rank (the digests agreed at every step)
        fit = real["level_fit"]
        assert set(fit) == {"conv", "linear"} and len(fit["conv"]["layers"]) >= 5 and fit == sim.exchanges[0].level_fit
        for group in fit.values():
            assert len({tuple(real["levels"][n]) for n in group["layers"]}) == 1
    if case == "lowrank":  # factors on the matrices, measured bytes as the cost model predicts
        low = [p for p in sim.layer_plans() if p.transport == "lowrank"]
        assert len(low) >= 3 and {p.rank for p in low} == {1, 2}
        assert all(p.payload_bytes == p.predicted.payload_bytes for p in low)
    if case == "lowrank16":  # P (the shorter side, float32, with the header) and Q (float16): 1.7-2x fewer bytes
        low = {p.name: p for p in sim.layer_plans() if p.transport == "lowrank"}
        assert set(low) == {"1.weight", "3.weight", "5.weight"}
        head = 4 * header_len(torch.float32, size)
        for name, (short, long) in {"1.weight": (64, 784), "3.weight": (64, 300), "5.weight": (10, 300)}.items():
            assert low[name].payload_bytes == low[name].predicted.payload_bytes == head + 4 * 2 * short + 2 * 2 * long
    if case == "mixed":  # the allocator sent the large matrix as rank-1 factors, on every rank alike
        assert [e.ranks for e in sim.allocation_events] == [{"1.weight": 1}] * 2
        assert {p.name: p.transport for p in sim.layer_plans()}["1.weight"] == "lowrank"
    if case == "rotated":  # every transport carries rotated codes
        plans = sim.layer_plans()
        assert {p.transport for p in plans if p.wire_codec == "rotated"} == {"allreduce", "allgather", "two_phase"}
    for step, (s, r) in enumerate(zip(aggregates, real["aggregates"])):
        if size == 2:  # a + b == b + a: the same bits
            assert torch.equal(s, r), f"step {step}: simulated aggregate differs from the real one"
            continue
        # with more ranks MPI may sum the float32 layers (and float16 factors) in another order
        scale = float(r.abs().max())
        err = float((s - r).abs().max())
        tol = 2e-3 if case == "lowrank16" else 1e-6
        assert err <= tol * scale, f"step {step}: simulated aggregate differs from the real one by {err} ({scale})"


def levels_of(exchange) -> dict:
    return {n: c.codec.levels.tolist() for n, c in exchange.coders.items()}


def test_adaptive_levels_are_refit_on_rank_0_and_shared_by_every_rank():
    model, base, kw, micro_batch = setup("alq")
    sim = hvd_gradq.SimulatedWorkers(base, model.named_parameters(), 3, **kw)
    sim.track_error = True
    initial = levels_of(sim.exchanges[0])
    variance = []
    for step in range(3):
        backward_all(sim, model, micro_batch, step, 3)
        sim.step()
        variance.append(sim.coding_variance())
    fitted = levels_of(sim.exchanges[0])
    assert fitted != initial and all(levels_of(e) == fitted for e in sim.exchanges[1:])
    keys = {c.codec_key for c in sim.codebook if c.transport == "allgather"}
    assert keys and all("levels=" in k for k in keys)
    # step 0 coded with the initial exponential levels, step 1 with levels fitted to step 0's gradient
    assert variance[1] < 0.5 * variance[0], variance


def test_world_routes_bytes_as_horovod_collectives_do():
    world = SimulatedWorld(3)
    ranks = [world.rank(r) for r in range(3)]
    hs = [rk.allreduce_sum_async(torch.tensor([r, 10 * r], dtype=torch.int64), "sum") for r, rk in enumerate(ranks)]
    assert all(torch.equal(rk.synchronize(h), torch.tensor([3, 30])) for rk, h in zip(ranks, hs))
    hs = [rk.allgather_async(torch.full((r + 1,), r, dtype=torch.uint8), "gather") for r, rk in enumerate(ranks)]
    assert all(rk.synchronize(h).tolist() == [0, 1, 1, 2, 2, 2] for rk, h in zip(ranks, hs))
    # rank i sends i*10 + j to rank j, (j + 1) copies of it
    hs = [rk.alltoall_async(torch.cat([torch.full((j + 1,), 10 * i + j) for j in range(3)]), [1, 2, 3], "a2a")
          for i, rk in enumerate(ranks)]
    for j, (rk, h) in enumerate(zip(ranks, hs)):
        got, splits = rk.synchronize(h)
        assert splits.tolist() == [j + 1] * 3
        assert got.tolist() == [10 * i + j for i in range(3) for _ in range(j + 1)]
    assert world.pending() == []


def test_world_refuses_reads_before_every_rank_submitted_and_mixed_collectives():
    world = SimulatedWorld(2)
    a, b = world.rank(0), world.rank(1)
    h = a.allgather_async(torch.zeros(2), "x")
    assert not a.poll(h)
    with pytest.raises(RuntimeError, match="before ranks \\[1\\] submitted"):
        a.synchronize(h)
    with pytest.raises(RuntimeError, match="rank 1 called allreduce, another rank allgather"):
        b.allreduce_sum_async(torch.zeros(2), "x")
    with pytest.raises(ValueError, match="integer >= 1"):
        SimulatedWorld(0)


def test_simulated_workers_check_their_use():
    model, base, kw, micro_batch = setup("gather")
    sim = hvd_gradq.SimulatedWorkers(base, model.named_parameters(), 2, **kw)
    x, y = micro_batch(0, 0, 2)
    sim.backward(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="after 1 of 2 workers"):
        sim.step()
    with pytest.raises(RuntimeError, match="zero_grad\\(\\) after 1 of 2"):
        sim.zero_grad()
    sim.backward(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="more than workers=2"):
        sim.backward(F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="codec=None sends float32"):
        hvd_gradq.SimulatedWorkers(base, model.named_parameters(), 2, codec=None,
                                   allocator=hvd_gradq.Allocator(2, probe=hvd_gradq.LossProbe(model, F.cross_entropy,
                                                                                                [(x, y)])))
    with pytest.raises(ValueError, match="codec must be one of"):
        hvd_gradq.SimulatedWorkers(base, model.named_parameters(), 2, codec="qsgd8")


def test_uncompressed_simulation_is_the_exact_mean_of_the_workers_gradients():
    model, base, _, micro_batch = setup("gather")
    sim = hvd_gradq.SimulatedWorkers(base, model.named_parameters(), 3, codec=None)
    grads = []
    for r in range(3):
        model.zero_grad()
        x, y = micro_batch(0, r, 3)
        F.cross_entropy(model(x), y).backward()
        grads.append(flat_grads(model).clone())
    model.zero_grad()
    sim.zero_grad()
    for r in range(3):
        x, y = micro_batch(0, r, 3)
        sim.backward(F.cross_entropy(model(x), y))
    sim.synchronize()
    assert torch.allclose(flat_grads(model), (grads[0] + grads[1] + grads[2]) / 3, rtol=0, atol=1e-7)
    assert sim.payload_bytes() == (4 * sum(p.numel() for p in model.parameters()),) * 2


def train(case: str, size: int, steps: range, state=None):
    """Train ``case`` over ``steps``, optionally from a saved (model, optimizer, compression) state."""
    model, base, kw, micro_batch = setup(case)
    sim = hvd_gradq.SimulatedWorkers(base, model.named_parameters(), size, **kw)
    if state is not None:
        model.load_state_dict(state["model"])
        base.load_state_dict(state["optimizer"])
        sim.load_compression_state_dict(state["compression"])
    for step in steps:
        backward_all(sim, model, micro_batch, step, size)
        sim.step()
    saved = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(base.state_dict()),
             "compression": copy.deepcopy(sim.compression_state_dict())}
    return sim, model, saved


@pytest.mark.parametrize("case", ["lanes", "gather", "jointsq", "alq", "rotated", "lowrank", "lowrank16", "mixed"])
def test_simulated_resume_is_bit_identical_to_uninterrupted_training(case):
    _, full, _ = train(case, 2, range(8))
    _, _, saved = train(case, 2, range(4))
    sim, resumed, _ = train(case, 2, range(4, 8), state=saved)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    if case == "lanes":
        assert [e.step for e in sim.allocation_events] == [0, 2, 4, 6]


def test_simulated_checkpoint_of_another_size_is_refused_or_reset():
    _, _, saved = train("gather", 2, range(2))
    model, base, kw, _ = setup("gather")
    sim = hvd_gradq.SimulatedWorkers(base, model.named_parameters(), 3, **kw)
    with pytest.raises(hvd_gradq.StateMismatchError, match="saved by 2 ranks and this job has 3"):
        sim.load_compression_state_dict(saved["compression"])
    sim.load_compression_state_dict(saved["compression"], reset=True)
    assert all(not ex.residuals.worker.residuals for ex in sim.exchanges)


def test_the_low_rank_layers_of_a_step_share_two_allreduces():
    """One allreduce of every low-rank layer's P (with its header), one of every Q: named after the
    first low-rank layer, as each layer's own first collective would be; the other layers keep
    their own collectives; every layer's payload_bytes are still its own P and Q."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Tanh(), torch.nn.Linear(64, 40),
                                torch.nn.Tanh(), torch.nn.Linear(40, 32))
    sim = hvd_gradq.SimulatedWorkers(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), 3,
                                     codec="lowrank", rank=2, min_elements=64)
    plans = sim.exchanges[0].plans
    assert [n for n, p in plans.items() if p.transport == "lowrank"] == ["0.weight", "2.weight", "4.weight"]
    submitted = []
    submit = sim.world.submit

    def record(kind, name, rank, tensor, splits=None):
        submitted.append((kind, name, rank, tensor.numel()))
        return submit(kind, name, rank, tensor, splits)

    sim.world.submit = record
    for _step in range(2):
        submitted.clear()
        sim.zero_grad()
        for _ in range(3):
            sim.backward(model(torch.randn(8, 48)).square().mean())
        sim.synchronize()
        names = {name for _, name, _, _ in submitted}
        assert {"hvd_gradq.0.weight", "hvd_gradq.0.weight.phase2"} <= names
        assert not names & {"hvd_gradq.2.weight", "hvd_gradq.4.weight", "hvd_gradq.2.weight.phase2"}
        fused = [(n, numel) for kind, n, r, numel in submitted if r == 0 and n.startswith("hvd_gradq.0.weight")]
        # P: (64 + 40 + 32) rows x rank 2 plus a header per layer; Q: (48 + 64 + 40) x 2
        heads = 3 * header_len(torch.float32, 3)
        assert dict(fused) == {"hvd_gradq.0.weight": 2 * (64 + 40 + 32) + heads,
                               "hvd_gradq.0.weight.phase2": 2 * (48 + 64 + 40)}
        for name, rows, cols in (("0.weight", 64, 48), ("2.weight", 40, 64), ("4.weight", 32, 40)):
            assert plans[name].payload_bytes == 4 * (2 * (rows + cols) + header_len(torch.float32, 3)), name
        sim.step()


def test_low_rank_layers_send_what_entered_minus_what_they_still_owe():
    """lr = 0 keeps the weights, so every worker's gradient is known: over the steps, N times the
    mean the low-rank layers applied plus every worker's residual is the sum of what entered."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Tanh(), torch.nn.Linear(64, 40))
    sim = hvd_gradq.SimulatedWorkers(torch.optim.SGD(model.parameters(), lr=0.0), model.named_parameters(), 3,
                                     codec="lowrank", rank=3, min_elements=64)
    names = [n for n, p in sim.exchanges[0].plans.items() if p.transport == "lowrank"]
    assert names == ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    sent = {n: torch.zeros(params[n].numel(), dtype=torch.float64) for n in names}
    entered = {n: torch.zeros(params[n].numel(), dtype=torch.float64) for n in names}
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        sim.zero_grad()
        for _r in range(3):
            x = torch.randn(16, 48, generator=g)
            loss = model(x).square().mean()
            for n, gr in zip(names, torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True)):
                entered[n] += gr.reshape(-1).double()
            sim.backward(loss)
        sim.synchronize()
        for n in names:
            sent[n] += 3 * params[n].grad.reshape(-1).double()
        sim.step()
    for n in names:
        owed = sum(ex.lowrank[n].residual.double() for ex in sim.exchanges)
        scale = float(entered[n].abs().max())
        assert float((sent[n] + owed - entered[n]).abs().max()) <= 1e-5 * scale, n
        assert float(owed.abs().max()) > 1e-3 * scale  # rank 3 of a 64 x 48 matrix: something is owed


def test_a_rank_change_starts_from_the_subspace_found_so_far():
    """A layer that moves from rank 4 to rank 2 (an allocation) keeps the leading part of its Q on
    every rank (``carried_q``), not the fresh Q of its key; the allocator's view of rank 2 starts
    from the same Q, and on a gradient that stays the same it is nearer the best rank-2
    approximation than the fresh Q's."""
    from hvd_gradq.bits.rotation import key_for
    from hvd_gradq.codecs.lowrank import approximate, carried_q, initial_q

    g = torch.Generator().manual_seed(6)
    u, _ = torch.linalg.qr(torch.randn(64, 16, generator=g))
    v, _ = torch.linalg.qr(torch.randn(48, 16, generator=g))
    target = (u * torch.tensor([8.0, 4.0] + [1.0] * 14)) @ v.t()  # every worker's gradient, every step
    layer = torch.nn.Linear(48, 64, bias=False)
    sim = hvd_gradq.SimulatedWorkers(torch.optim.SGD(layer.parameters(), lr=0.0), layer.named_parameters(), 2,
                                     codec="lowrank", rank=4, min_elements=64)
    for _ in range(3):
        sim.zero_grad()
        for _r in range(2):
            sim.backward((layer.weight * target).sum())
        sim.step()
    before = [ex.lowrank["weight"].q.clone() for ex in sim.exchanges]
    assert all(torch.equal(b, before[0]) for b in before)  # the summed Q: the same on every rank
    fresh = initial_q(48, 2, key_for(0, "weight"))
    best = (u[:, :2] * torch.tensor([8.0, 4.0])) @ v[:, :2].t()

    def gap(approx):
        return float(torch.linalg.norm(approx.reshape(64, 48) - best) / torch.linalg.norm(best))

    view = sim.exchanges[0].quantizer()("weight", -2, target.reshape(-1))  # the allocator's rank-2 view
    assert gap(view) < 0.2 * gap(approximate(target, fresh)), (gap(view), gap(approximate(target, fresh)))
    for ex in sim.exchanges:
        ex.replan({}, 1, {"weight": 2})
    for ex in sim.exchanges:
        coder = ex.lowrank["weight"]
        assert coder.rank == 2 and not torch.equal(coder.q, fresh)
        assert torch.equal(coder.q, carried_q(before[0], 2, fresh))
    assert torch.equal(approximate(target, sim.exchanges[0].lowrank["weight"].q), view)


def test_every_allocation_counts_the_layers_it_changed_and_their_rank_changes():
    """``AllocationEvent.changed`` / ``rank_changes``: the layers whose (bits, rank) differ from the
    step before the allocation, and of those the ones whose rank differs (to, from or between ranks),
    as the plans show them."""
    model, opt, kw, micro_batch = setup("mixed")
    kw["trigger"] = hvd_gradq.Trigger("interval", interval=1)  # every step: the choices move
    sim = hvd_gradq.SimulatedWorkers(opt, model.named_parameters(), 2, **kw)
    codes = [{p.name: (p.bits, p.rank) for p in sim.layer_plans()}]
    for step in range(5):
        backward_all(sim, model, micro_batch, step, 2)
        sim.step()
        codes.append({p.name: (p.bits, p.rank) for p in sim.layer_plans()})
    events = sim.allocation_events
    assert [e.step for e in events] == [0, 1, 2, 3, 4]
    for e, before, after in zip(events, codes, codes[1:]):
        names = [n for n in after if n in e.bits or n in e.ranks]
        assert e.changed == sum(before[n] != after[n] for n in names), (e.step, before, after)
        assert e.rank_changes == sum(before[n][1] != after[n][1] for n in names), (e.step, before, after)
    assert events[0].changed > 0 and events[0].rank_changes >= 1  # from 3 bits everywhere to a mix with a rank


def test_hysteresis_reaches_the_allocations_of_a_run():
    """The mix (bits and ranks at 0.3 bits per element), an allocation every step: afresh, the
    large matrix leaves its rank-1 factors at step 4; with ``Allocator(hysteresis=0.3)`` the engine
    hands the allocator each layer's current option and the layer stays through step 5."""
    def changes(hysteresis):
        model, opt, kw, micro_batch = setup("mixed")
        kw["allocator"] = hvd_gradq.Allocator(0.3, metric="mse", options=(0, 2, 4), ranks=(1, 2, 4), rate="wire",
                                              probe=kw["allocator"].probe, hysteresis=hysteresis)
        kw["trigger"] = hvd_gradq.Trigger("interval", interval=1)
        sim = hvd_gradq.SimulatedWorkers(opt, model.named_parameters(), 2, **kw)
        for step in range(6):
            backward_all(sim, model, micro_batch, step, 2)
            sim.step()
        return [(e.changed, e.rank_changes) for e in sim.allocation_events[1:]]

    assert changes(0.0) == [(0, 0), (0, 0), (0, 0), (2, 1), (0, 0)]
    assert changes(0.3) == [(0, 0)] * 5


@pytest.mark.parametrize("codec,extra,auto_keeps", [
    ("qsgd", {}, False), ("nuqsgd", {}, False), ("terngrad", {"bits": 2}, False),
    ("rotated", {"rounding": "stochastic"}, False),
    ("rotated", {}, True), ("jointsq", {"ratio": 20}, True), ("topk", {"ratio": 20}, True),
])
def test_error_feedback_auto_keeps_residuals_for_biased_codes_only(codec, extra, auto_keeps):
    """error_feedback="auto" (the default): biased codes (nearest-rounded rotated, JointSQ, top-k)
    keep what they drop, unbiased ones (stochastic rounding) do not; True / False override it."""
    def residuals_after_a_step(feedback):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
        sim = hvd_gradq.SimulatedWorkers(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), 2,
                                         codec=codec, transport="allgather", error_feedback=feedback,
                                         **{"bits": 3, **extra})
        sim.zero_grad()
        for _ in range(2):
            sim.backward(F.cross_entropy(model(torch.randn(8, 64)), torch.randint(3, (8,))))
        sim.step()
        kept = sim.exchanges[0].residuals.worker.residuals
        assert set(kept) <= {"0.weight"}  # the small layers go as float32
        return "0.weight" in kept and bool(kept["0.weight"].abs().sum() > 0)

    assert residuals_after_a_step("auto") is auto_keeps
    assert residuals_after_a_step(True) is True
    assert residuals_after_a_step(False) is False


def test_engines_whose_codebooks_differ_are_stopped_before_any_wait():
    """The first step's agreement (``exchange.agreement``) on the in-process world: every rank
    compares every rank's codebook and raises, naming the layer, what differs and the ranks."""
    from hvd_gradq.exchange.engine import GradientExchange
    from hvd_gradq.settings import Coding
    from hvd_gradq.wire.header import CodebookMismatchError

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 40)
    world = SimulatedWorld(3)
    engines = [GradientExchange(list(layer.named_parameters()), collectives=world.rank(r),
                                coding=Coding(codec="qsgd", transport="allgather", bits=2 if r == 2 else 4))
               for r in range(3)]
    pending = [e.launch("weight", torch.randn(40, 64)) for e in engines]
    for e in engines:
        with pytest.raises(CodebookMismatchError, match="layer 'weight': bits 4 on rank 0, 2 on rank 2"):
            e.agree()
    pair = SimulatedWorld(2)
    same = [GradientExchange(list(layer.named_parameters()), collectives=pair.rank(r),
                             coding=Coding(codec="qsgd", transport="allgather")) for r in range(2)]
    grads = [torch.randn(40, 64) for _ in same]
    pending = [e.launch("weight", g) for e, g in zip(same, grads)]
    for e in same:
        e.agree()  # the same codebooks: the exchange goes on
    outs = [e.finish("weight", p) for e, p in zip(same, pending)]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (40 * 64,)
