"""Image metrics against a clean reference: PSNR, NMSE and SSIM (complex MRI images as magnitudes).

Evaluation only: they need the clean image, so they score restorations and benchmarks, never selection.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor


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
