"""Proximal FD features learnt from the corrupted dataset alone: no labels, no clean images.

A small conv encoder trained once per dataset on its own observations' image views with SimCLR's NT-Xent: two
augmented views of one observation map close. The augmentations (a small shift, a flip, a fresh random erasure
of a quarter of the pixels) teach invariance to which pixels a corruption removed, so the features describe
content, what Proximal FD should compare. Training is deterministic given the recipe's seed; the weights are
cached under ``<cache>/extractors/ssl-<key16>.safetensors``, keyed by the recipe and the data's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rsd_core.select.frechet import atomic_write, batched_features, default_cache_dir, feature_device


@dataclass(frozen=True)
class SSLRecipe:
    """Everything that determines the encoder's weights besides the data; hashed into the cache key."""

    channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    projection_dim: int = 64
    architecture: str = (
        "3x[conv3x3(no bias)-BN-ReLU-maxpool2]; adaptive avg pool 4x4; linear ->feature_dim (features, pre-ReLU); "
        "projection head ReLU-linear(feature_dim)-ReLU-linear(projection_dim), training only"
    )
    objective: str = "SimCLR NT-Xent between two augmented views of each observation"
    augment: str = "shift +-shift px (reflect pad), horizontal flip p=0.5, fresh erasure (to 0) of a fraction erase"
    shift: int = 3
    erase: float = 0.25
    temperature: float = 0.2
    # Training length: `epochs` passes over the observations, at most `max_steps` steps (a few CPU minutes),
    # so that small datasets (tests, smoke runs) train in seconds.
    epochs: float = 4.0
    max_steps: int = 300
    batch_size: int = 128  # observations per step; each gives two views
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "AdamW + cosine decay to 0"
    max_images: int = 20_000  # the first observations of the dataset, in index order
    seed: int = 0
    version: int = 1

    def steps(self, n_images: int) -> int:
        return max(1, min(self.max_steps, math.ceil(self.epochs * n_images / self.batch_size)))

    def key(self, data_fingerprint: str) -> str:
        blob = json.dumps({"recipe": asdict(self), "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class Encoder(nn.Module):
    """Conv encoder whose pre-ReLU linear output is the feature vector; the head serves training only."""

    def __init__(self, in_channels: int, recipe: SSLRecipe):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in recipe.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        # The adaptive pool lets one recipe serve any image size >= 32 (MRI magnitudes are 64x64).
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                  nn.Linear(c_in * 16, recipe.feature_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(recipe.feature_dim, recipe.feature_dim), nn.ReLU(),
                                  nn.Linear(recipe.feature_dim, recipe.projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def augment(x: torch.Tensor, recipe: SSLRecipe, rng: torch.Generator) -> torch.Tensor:
    """One random view per image: shift, flip, then a fresh erasure (see the module docstring)."""
    b, _, h, w = x.shape
    s = recipe.shift
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    dy, dx = (torch.randint(0, 2 * s + 1, (b,), generator=rng) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=rng) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    keep = torch.rand((b, 1, h, w), generator=rng) >= recipe.erase
    return out * keep.to(out.dtype)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is the other view of its image, among 2B - 1 candidates."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


def train_encoder(images: torch.Tensor, recipe: SSLRecipe) -> tuple[Encoder, dict[str, float]]:
    """Train on CPU under a forked RNG: reproducible, and the caller's random state is left untouched."""
    t0 = time.perf_counter()
    losses = []
    steps = recipe.steps(images.shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        gen = torch.Generator().manual_seed(recipe.seed + 1)
        net = Encoder(images.shape[1], recipe)
        opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        net.train()
        for _ in range(steps):
            x = images[torch.randint(0, images.shape[0], (recipe.batch_size,), generator=gen)].float()
            loss = nt_xent(net(augment(x, recipe, gen)), net(augment(x, recipe, gen)), recipe.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    net.eval()
    tail = losses[-max(1, steps // 10):]
    return net, {"steps": steps, "final_loss": round(float(np.mean(tail)), 4),
                 "train_seconds": round(time.perf_counter() - t0, 1)}


class SelfSupervisedExtractor:
    """Frechet-distance features of an encoder trained contrastively on one dataset's corrupted observations.

    ``images`` returns the training images, (N, C, H, W) in [-1, 1] (the observations' image views),
    and is only called when no cached encoder exists for ``data_fingerprint`` (the dataset's
    checksum) and ``recipe``; ``data_name`` only enters the label. Inputs to :meth:`features` must
    have the training images' channels and a size of at least 32x32.
    """

    dim: int

    def __init__(
        self,
        images: Callable[[], torch.Tensor],
        data_fingerprint: str,
        data_name: str,
        recipe: SSLRecipe = SSLRecipe(),
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
    ):
        self.recipe = recipe
        self.dim = recipe.feature_dim
        self.id = f"ssl-{recipe.key(data_fingerprint)[:16]}"
        self.label = (
            f"self-supervised encoder trained on the corrupted observations of '{data_name}' "
            f"(SimCLR, {recipe.feature_dim}-d; no labels, no clean images; not Inception FID)"
        )
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.weights_path = root / "extractors" / f"{self.id}.safetensors"
        self.info_path = self.weights_path.with_suffix(".json")
        self.device = feature_device(device)
        if self.weights_path.is_file() and self.info_path.is_file():
            self.info: dict[str, object] = json.loads(self.info_path.read_text())
            net = Encoder(int(self.info["in_channels"]), recipe)  # type: ignore[arg-type]
            net.load_state_dict(load_file(str(self.weights_path)))
        else:
            data = images()[: recipe.max_images]
            net, results = train_encoder(data, recipe)
            self.info = {"id": self.id, "recipe": asdict(recipe), "data_fingerprint": data_fingerprint,
                         "data_name": data_name, "n_images": int(data.shape[0]), "in_channels": int(data.shape[1]),
                         "image_size": list(data.shape[2:]), **results, "torch_threads": torch.get_num_threads(),
                         "torch_version": torch.__version__}
            state = {k: v.contiguous() for k, v in net.state_dict().items()}
            atomic_write(self.weights_path, lambda p: save_file(state, str(p)))
            atomic_write(self.info_path, lambda p: p.write_text(json.dumps(self.info, indent=2)))
        self._net = net.to(self.device).eval()

    def features(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Pre-ReLU encoder features of (N, C, H, W) images in [-1, 1]; values outside are clamped."""
        return batched_features(images, batch_size, self.device, self.dim, self._net.body)
