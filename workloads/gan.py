"""The WGAN workload (issue 19; the layer-wise quantization paper's experiment, on Fashion-MNIST
offline): a DCGAN-style generator and critic for 1x28x28 images in [-1, 1], the WGAN-GP losses
written so that one backward pass gives each player the gradient of its own loss (the game's
operator, what QODA steps on), and an offline quality metric: the Frechet distance between real
and generated images in the feature space of the project's Fashion-MNIST classifier (FashionCNN,
trained once and cached). This is "FID" in spirit only: the features are not Inception's, so the
numbers compare runs of this workload with each other, not with published FIDs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from workloads.datasets import cache_dir, fashion_mnist
from workloads.models import FashionCNN

LATENT = 64
_MEAN, _STD = 0.2860, 0.3530  # Fashion-MNIST's, as workloads.datasets normalises


class Generator(nn.Module):
    """z (LATENT) -> 128 x 7 x 7 -> 64 x 14 x 14 -> 1 x 28 x 28 in [-1, 1] (about 0.6M parameters)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        self.project = nn.Linear(LATENT, 2 * w * 7 * 7)
        self.body = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(),
                                  nn.ConvTranspose2d(w, 1, 4, 2, 1), nn.Tanh())
        self.width = w

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, 2 * self.width, 7, 7))


class Critic(nn.Module):
    """1 x 28 x 28 -> 64 x 14 x 14 -> 128 x 7 x 7 -> a score (no normalisation: the gradient
    penalty is per sample)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(nn.Conv2d(1, w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(w, 2 * w, 4, 2, 1),
                                  nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(2 * w * 7 * 7, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).view(-1)


def to_gan_range(x: torch.Tensor) -> torch.Tensor:
    """workloads.datasets' normalised images -> [-1, 1]."""
    return ((x * _STD + _MEAN) * 2 - 1).clamp_(-1, 1)


def game_losses(gen: Generator, critic: Critic, real: torch.Tensor, z: torch.Tensor, penalty: float = 10.0,
                generator=None) -> tuple[torch.Tensor, dict]:
    """One loss whose backward gives the critic the gradient of its WGAN-GP loss
    D(fake) - D(real) + penalty * (||grad D(interpolate)|| - 1)^2 and the generator the gradient
    of its loss -D(fake), both at the current point (the critic's parameters enter the generator's
    term detached, the fake images enter the critic's detached). Returns (loss, figures)."""
    fake = gen(z)
    critic_real, critic_fake = critic(real), critic(fake.detach())
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator)
    mix = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    gp = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    critic_loss = critic_fake.mean() - critic_real.mean() + penalty * gp
    frozen = {n: p.detach() for n, p in critic.named_parameters()}
    gen_loss = -functional_call(critic, frozen, (fake,)).mean()
    return critic_loss + gen_loss, {"critic_loss": float(critic_loss.detach()), "gen_loss": float(gen_loss.detach()),
                                    "wasserstein": float((critic_real.mean() - critic_fake.mean()).detach())}


class GANGame(nn.Module):
    """Both players; ``forward((real, z, generator))`` is ``game_losses``' loss (the benchmarks
    call a model on its inputs and backpropagate what comes out)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.gen, self.critic = Generator(width), Critic(width)

    def forward(self, batch) -> torch.Tensor:
        real, z, generator = batch
        return game_losses(self.gen, self.critic, real, z, generator=generator)[0]


def feature_net(path: Path | None = None, seed: int = 0) -> nn.Module:
    """The features (64 per image) of a FashionCNN trained on 200 batches of 128 training images
    (Adam, seed 0), cached in the project's cache directory."""
    path = path or cache_dir() / "fashion_cnn_features_v1.pt"
    model = FashionCNN(width=16)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(seed)
        x, y = fashion_mnist("train")
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        model.train()
        for i in range(200):
            idx = order[128 * i:128 * (i + 1)]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    model.eval()
    return model.features


@torch.no_grad()
def features(net: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Features (float64) of images in [-1, 1]."""
    x = ((images + 1) / 2 - _MEAN) / _STD
    return torch.cat([net(x[i:i + batch]) for i in range(0, len(x), batch)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) of two feature sets
    (rows: samples), in float64 with symmetric eigendecompositions."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.t()), torch.cov(b.t())

    def sqrt_psd(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh((m + m.t()) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.t()

    ra = sqrt_psd(ca)
    cross = torch.linalg.eigvalsh(ra @ cb @ ra).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross)


def save_grid(images: torch.Tensor, path: str | Path, rows: int = 8) -> None:
    """A PNG of ``images`` (n, 1, 28, 28) in [-1, 1], ``rows`` per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = -(-n // rows)
    grid = torch.ones(rows * 30, cols * 30)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = (images[i, 0] + 1) / 2
    plt.imsave(str(path), grid.numpy(), cmap="gray", vmin=0, vmax=1)
