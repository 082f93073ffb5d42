"""The set-ups tests/test_simulate.py runs both under horovodrun (worker: sim_check.py) and in
``SimulatedWorkers``: the same model, data and coding arguments, so the two must give the same
aggregates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import hvd_gradq
from workloads.datasets import fashion_mnist
from workloads.models import FashionCNN

STEPS = 4


def setup(case: str, seed: int = 0):
    """(model, base optimizer, coding kwargs, micro_batch(step, rank, size)) for ``case``."""
    torch.manual_seed(seed)
    x_all, y_all = fashion_mnist("test")
    model = FashionCNN(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def micro_batch(step: int, rank: int, size: int, n: int = 32):
        i = ((step * size + rank) * n) % (len(x_all) - n)
        return x_all[i:i + n], y_all[i:i + n]

    if case == "lanes":  # shared-scale lanes on allreduce, float32 layers, the allocator every 2 steps
        probe = hvd_gradq.LossProbe(model, F.cross_entropy, [micro_batch(999, 0, 1, 64)])
        kw = {"codec": "shared_scale", "bits": 4, "transport": "allreduce",
              "allocator": hvd_gradq.Allocator(3.0, metric="mse", solver="greedy", options=(0, 2, 3, 4, 8),
                                               probe=probe),
              "trigger": hvd_gradq.Trigger("interval", interval=2)}
    elif case == "gather":  # QSGD over allgather and two-phase, one 0-bit layer
        kw = {"codec": "qsgd", "bits": {".*": 4, "features.2.body.0.weight": 0, "classifier.weight": 2},
              "transport": {".*": "allgather", "features.3.*": "two_phase", "features.4.*": "two_phase"},
              "min_elements": 256}
    elif case == "rotated":  # rotated codes on every transport: lanes with this step's scales, gathered
        kw = {"codec": "rotated", "bits": {".*": 3, "classifier.weight": 2},
              "transport": {".*": "allreduce", "features.3.*": "allgather", "features.4.*": "two_phase"},
              "min_elements": 256}
    elif case == "jointsq":
        kw = {"codec": "jointsq", "ratio": 20, "transport": "two_phase"}
    elif case == "alq":  # adaptive levels refit on rank 0 after steps 0 and 2, broadcast to every rank
        kw = {"codec": "alq", "bits": 3, "transport": "allgather", "refit_levels": 2}
    elif case == "alq_type":  # one level set per layer type (QODA's layer-wise quantization)
        kw = {"codec": "alq", "bits": 3, "transport": "allgather", "refit_levels": 2, "min_elements": 64,
              "level_groups": hvd_gradq.layer_types(model)}
    elif case == "lowrank":  # PowerSGD factors on the matrices, the rotated code on the rest
        kw = {"codec": "lowrank", "rank": {".*": 2, "classifier.weight": 1}, "bits": 3, "min_elements": 256}
    elif case == "lowrank16":  # float16 Q factors; an MLP with a wide, a tall (coded as its transpose) and a
        # small matrix
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        kw = {"codec": "lowrank", "rank": 2, "factors": "float16", "bits": 3, "min_elements": 256}
    elif case == "mixed":  # the allocator chooses per layer between bit widths and low-rank factors (an MLP:
        # at 0.3 bits per element its large matrix goes as rank-r factors, the rest as bits or not at all)
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        probe = hvd_gradq.LossProbe(model, F.cross_entropy, [micro_batch(999, 0, 1, 64)])
        kw = {"codec": "rotated", "bits": 3, "min_elements": 256,
              "allocator": hvd_gradq.Allocator(0.3, metric="mse", options=(0, 2, 4), ranks=(1, 2, 4),
                                               rate="wire", probe=probe),
              "trigger": hvd_gradq.Trigger("interval", interval=2)}
    elif case == "topk":
        kw = {"codec": "topk", "ratio": 20, "transport": "allgather"}
    else:
        raise ValueError(case)
    return model, opt, kw, micro_batch


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])
