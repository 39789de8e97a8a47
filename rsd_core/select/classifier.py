"""A small Fashion-MNIST CNN whose penultimate features give a cheap in-domain Frechet distance.

An evaluation tool: it is trained with labels on clean Fashion-MNIST images, which a data team
selecting checkpoints does not have (selection defaults to :mod:`rsd_core.select.ssl_features`). It serves the
true FD of the Fashion-MNIST benchmarks and comparisons of Proximal FD features. Given a ``view`` (a
corruption), the same CNN is trained on corrupted views of the training images instead, so that its
features stay discriminative on corrupted images. Images come from :func:`rsd_core.data.sources.fashion_mnist`.
The clean classifier's weights ship in ``weights/`` (:data:`SHIPPED_DIR`), so its FD is the same on every machine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rsd_core.data.sources import FASHION_MNIST_DIR, fashion_mnist
from rsd_core.select.frechet import atomic_write, batched_features, default_cache_dir, feature_device

# sha256 of the *decompressed* Debian `dataset-fashion-mnist` train files (images, labels). The classifier's
# cache key uses these constants, so a cached classifier loads without the data being installed at all.
_FASHION_MNIST_TRAIN_SHA256 = (
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
)


# Weights that ship with the package, by extractor id: retrained on another machine (or thread count) the same
# recipe gives other weights, and FD / KID numbers that do not compare; the clean classifier's ship.
SHIPPED_DIR = Path(__file__).parent / "weights"


def _train_digest(root: Path) -> str:
    """sha256 over the decompressed train images and labels (what the recipe's constants describe)."""
    parts = []
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} not found: install it with `apt-get install dataset-fashion-mnist`")
        with gzip.open(root / name, "rb") as f:
            parts.append(hashlib.sha256(f.read()).digest())
    return hashlib.sha256(b"".join(parts)).hexdigest()


def _split(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 1, 32, 32) in [-1, 1] and labels of one split, through the project's loader."""
    source = fashion_mnist(split, root)
    return source.load(0, source.count)


def _expected_train_digest() -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(h) for h in _FASHION_MNIST_TRAIN_SHA256)).hexdigest()


@dataclass(frozen=True)
class _ClassifierRecipe:
    """Everything that determines the classifier's weights; its sha256 is the cache key and extractor id."""

    channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    architecture: str = (
        "3x[conv3x3(no bias)-BN-ReLU-maxpool2]; linear 1024->feature_dim (features, pre-ReLU); ReLU; linear->10"
    )
    input: str = "1x32x32 in [-1,1]: 28x28 uint8 /127.5-1, padded 2px with -1"
    optimizer: str = "Adam + OneCycleLR, cross-entropy, no augmentation"
    max_lr: float = 3e-3
    epochs: int = 1
    batch_size: int = 128
    seed: int = 0
    data: str = "fashion-mnist train (60k); sha256 of the decompressed IDX images and labels"
    data_sha256: tuple[str, str] = _FASHION_MNIST_TRAIN_SHA256
    version: int = 1
    # Set for a corruption-trained classifier: every training batch is replaced by its corrupted view
    # (fresh corruption state per batch). The canonical description of the corruption enters the key.
    corruption: str | None = None

    def key(self) -> str:
        recipe = asdict(self)
        if recipe["corruption"] is None:  # keeps the clean classifier's key (and its cache) unchanged
            del recipe["corruption"]
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


class _SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks and a linear bottleneck whose output is the feature vector."""

    def __init__(self, channels: tuple[int, int, int], feature_dim: int, n_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 4 * 4, feature_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


View = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _train_classifier(
    recipe: _ClassifierRecipe, data_dir: Path, view: View | None = None
) -> tuple[_SmallCNN, dict[str, float]]:
    """Train on CPU under a forked RNG (reproducible, and the caller's random state is left untouched).

    With ``view`` every batch is corrupted before the step, and the test accuracy is also measured on
    corrupted test images (``test_accuracy_corrupted``)."""
    digest = _train_digest(data_dir)
    if digest != _expected_train_digest():
        raise ValueError(
            f"Fashion-MNIST train data in {data_dir} differs from the recipe's (sha256 {digest}); "
            "refusing to cache a classifier under a key that would not describe it."
        )
    x, y = _split("train", data_dir)
    steps_per_epoch = x.shape[0] // recipe.batch_size
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        view_gen = torch.Generator().manual_seed(recipe.seed + 1)
        net = _SmallCNN(recipe.channels, recipe.feature_dim)
        opt = torch.optim.Adam(net.parameters(), lr=recipe.max_lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=recipe.max_lr, total_steps=recipe.epochs * steps_per_epoch
        )
        net.train()
        for _ in range(recipe.epochs):
            perm = torch.randperm(x.shape[0])
            for i in range(steps_per_epoch):
                idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
                xb = x[idx] if view is None else view(x[idx], view_gen)
                loss = F.cross_entropy(net(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    train_seconds = time.perf_counter() - t0
    net.eval()
    xt, yt = _split("test", data_dir)
    def accuracy(images: torch.Tensor) -> float:
        with torch.inference_mode():
            pred = torch.cat([net(images[i : i + 1000]).argmax(1) for i in range(0, images.shape[0], 1000)])
        return round(float((pred == yt).double().mean()), 4)

    results = {"test_accuracy": accuracy(xt), "train_seconds": round(train_seconds, 1)}
    if view is not None:
        results["test_accuracy_corrupted"] = accuracy(view(xt, torch.Generator().manual_seed(recipe.seed + 2)))
    return net, results


class ClassifierExtractor:
    """In-domain Frechet distance features: a small CNN trained once on the clean Fashion-MNIST train split.

    An evaluation tool: it needs clean, labelled images of the benchmark's own domain, which a data team
    selecting checkpoints does not have (selection defaults to ``rsd_core.select.ssl_features``). It serves the
    true FD of the Fashion-MNIST benchmarks and comparisons of Proximal FD features.

    With ``view`` (a function ``(images, generator) -> corrupted images``, described by ``view_id``, a
    canonical string that enters the cache key, and ``view_name`` for the label) the CNN is trained for
    two epochs on corrupted views of the training images instead. Proximal FD compares corrupted images
    only; a clean-trained CNN maps heavily erased images to nearly the same features, and on inpainting
    with heavy erasure its Proximal FD can miss the late gains of a distillation.

    Features are the 128-d penultimate activations taken *before* the ReLU, which keeps the covariance
    full-rank and closer to Gaussian than rectified features. Inputs are (N, 1|3, H, W) in [-1, 1]; RGB is
    averaged to grayscale and other sizes are resized (bilinear, antialiased) to 32x32.

    The weights are cached as ``<cache>/extractors/fmnist-cnn-<key16>.safetensors`` plus a ``.json`` with
    the recipe, test accuracy and training time, ``key`` being the sha256 of the recipe (architecture,
    optimiser, epochs, seed, data hash). The first use trains (one epoch, about 25 s on one idle CPU thread,
    ~90% test accuracy); later uses, in any process sharing the cache, just load the file. The data hash in the
    recipe is a constant, checked when training, so a populated cache needs no dataset installed.
    """

    dim = 128
    label = ("Fashion-MNIST classifier FD, trained with labels on clean images: evaluation only "
             "(small CNN, 128-d penultimate features; not Inception FID)")

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        data_dir: str | Path = FASHION_MNIST_DIR,
        view: View | None = None,
        view_id: str | None = None,
        view_name: str | None = None,
    ):
        if (view is None) != (view_id is None):
            raise ValueError("ClassifierExtractor: view and view_id go together (view_id describes the view)")
        self.recipe = _ClassifierRecipe() if view is None else _ClassifierRecipe(epochs=2, corruption=view_id)
        self.id = f"fmnist-cnn-{self.recipe.key()[:16]}"
        if view is not None:
            self.label = (
                f"Fashion-MNIST classifier FD, trained with labels on {view_name or 'corrupted'} views of clean "
                "images: evaluation only "
                "(small CNN, 128-d penultimate features; not Inception FID)"
            )
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        shipped = SHIPPED_DIR / f"{self.id}.safetensors"
        ships = shipped.is_file() and shipped.with_suffix(".json").is_file()
        self.weights_path = shipped if ships else root / "extractors" / f"{self.id}.safetensors"
        self.info_path = self.weights_path.with_suffix(".json")
        self.device = feature_device(device)

        if self.weights_path.is_file() and self.info_path.is_file():
            net = _SmallCNN(self.recipe.channels, self.recipe.feature_dim)
            self.info: dict[str, object] = json.loads(self.info_path.read_text())
            recorded = self.info.get("weights_sha256")
            if recorded and hashlib.sha256(self.weights_path.read_bytes()).hexdigest() != recorded:
                raise ValueError(f"{self.weights_path}: sha256 differs from the weights_sha256 in {self.info_path}; "
                                 "the shipped classifier was altered (a Git LFS pointer?): restore it from the repo")
            net.load_state_dict(load_file(str(self.weights_path)))
        else:
            net, results = _train_classifier(self.recipe, Path(data_dir), view)
            self.info = {
                "id": self.id,
                "recipe": asdict(self.recipe),
                **results,
                "torch_threads": torch.get_num_threads(),
                "torch_version": torch.__version__,
            }
            state = {k: v.contiguous() for k, v in net.state_dict().items()}
            atomic_write(self.weights_path, lambda p: save_file(state, str(p)))
            atomic_write(self.info_path, lambda p: p.write_text(json.dumps(self.info, indent=2)))
        self._net = net.to(self.device).eval()

    @property
    def test_accuracy(self) -> float:
        """Accuracy on the 10k Fashion-MNIST test images, recorded when the classifier was trained."""
        return float(self.info["test_accuracy"])  # type: ignore[arg-type]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return self._net.body(x)

    def features(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Penultimate (pre-ReLU) features of (N, 1|3, H, W) images in [-1, 1]; values outside are clamped."""
        return batched_features(images, batch_size, self.device, self.dim, self._forward)
