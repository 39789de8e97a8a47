"""Multi-coil k-space made outside the project, with numpy only (no rsd_core), as a team would bring it:
elliptical phantoms seen through smooth random coil sensitivities of each scan's own, a centred unitary FFT
and a Cartesian line mask with a fully sampled centre."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def phantom_scans(n: int, coils: int = 4, size: int = 16, acs: int = 6, extra_lines: int = 3, seed: int = 0):
    """(k-space (n, coils, size, size) complex64, masks (n, size) float32, true maps (n, coils, size, size),
    images (n, size, size))."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    maps = np.empty((n, coils, size, size), np.complex128)
    for i in range(n):
        for c in range(coils):
            cy, cx = rng.uniform(-1.5, 1.5, 2)
            magnitude = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.8, 2.0))
            phase = rng.uniform(-np.pi, np.pi) + rng.normal() * xx + rng.normal() * yy
            maps[i, c] = magnitude * np.exp(1j * phase)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(1, keepdims=True))
    images = np.stack([
        (np.hypot(xx - rng.uniform(-0.2, 0.2), yy / rng.uniform(0.7, 1.0)) < 0.7) * (0.6 + 0.4 * np.cos(3 * xx))
        for _ in range(n)
    ]) * np.exp(1j * 0.3 * yy)
    axes = (-2, -1)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * images[:, None], axes=axes), norm="ortho"), axes=axes)
    masks = np.zeros((n, size), np.float32)
    start = size // 2 - acs // 2
    masks[:, start:start + acs] = 1
    others = [j for j in range(size) if not start <= j < start + acs]
    for i in range(n):
        masks[i, rng.choice(others, extra_lines, replace=False)] = 1
    return (kspace * masks[:, None, None, :]).astype(np.complex64), masks, maps.astype(np.complex64), images


def write_scans(folder: Path, n: int = 48, **kwargs) -> tuple[Path, Path]:
    """kspace.npy and mask.npy of :func:`phantom_scans` in ``folder``."""
    kspace, masks, _, _ = phantom_scans(n, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "kspace.npy", kspace)
    np.save(folder / "mask.npy", masks)
    return folder / "kspace.npy", folder / "mask.npy"
