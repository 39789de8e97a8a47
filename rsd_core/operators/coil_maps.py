"""Coil sensitivity maps: the simulated birdcage bank, smooth random maps, and the packed form a
dataset stores per scan.

Real multi-coil scans come with their own sensitivities, estimated per scan from the fully sampled
centre of k-space (ESPIRiT, Uecker et al. 2014; :mod:`rsd_core.data.kspace_import`). A dataset keeps them
as per-sample state ``maps``: real float32 (2 * n_coils, m, m) holding [Re c0, Im c0, Re c1, ...] at a
side m that may be smaller than the image (sensitivities are smooth), bilinearly interpolated to the
image on use. The birdcage bank and the smooth random maps are simulation sources only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def normalise_maps(s: torch.Tensor) -> torch.Tensor:
    """Scale (..., C, H, W) complex maps so that sum_c |S_c|^2 = 1 at every pixel (P_I = I)."""
    rss = torch.sqrt((s.abs() ** 2).sum(-3, keepdim=True)).clamp_min(1e-12)
    return s / rss


def birdcage_maps(n_coils: int, height: int, width: int, rotation: float = 0.0) -> torch.Tensor:
    """Simulated coil sensitivities (n_coils, H, W), complex64, with sum_c |S_c|^2 = 1.

    Coils sit on a ring of radius 1.5 (image half-width = 1); each map decays with the
    distance to its coil and carries the coil's azimuthal phase, like a birdcage array.
    """
    ys = torch.linspace(-1.0, 1.0, height, dtype=torch.float64)
    xs = torch.linspace(-1.0, 1.0, width, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    maps = []
    for c in range(n_coils):
        theta = 2 * math.pi * c / n_coils + rotation
        cy, cx = 1.5 * math.sin(theta), 1.5 * math.cos(theta)
        dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        phase = torch.atan2(yy - cy, xx - cx) + theta
        maps.append(torch.polar(1.0 / dist, phase))
    return normalise_maps(torch.stack(maps)).to(torch.complex64)


def smooth_random_maps(batch: int, n_coils: int, height: int, width: int, rng: torch.Generator) -> torch.Tensor:
    """(B, n_coils, H, W) complex64 sensitivities that belong to no bank: per scan and coil a Gaussian
    bump at a random place near or outside the field of view, of random width, with a random linear
    phase; normalised so that sum_c |S_c|^2 = 1."""
    ys = torch.linspace(-1.0, 1.0, height, dtype=torch.float64)
    xs = torch.linspace(-1.0, 1.0, width, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand((batch, n_coils, 1, 1), generator=rng, dtype=torch.float64)

    centre_y, centre_x, width2 = uniform(-1.5, 1.5), uniform(-1.5, 1.5), uniform(0.8, 2.0)
    offset, slope_y, slope_x = uniform(-math.pi, math.pi), uniform(-1.5, 1.5), uniform(-1.5, 1.5)
    magnitude = torch.exp(-((yy - centre_y) ** 2 + (xx - centre_x) ** 2) / width2)
    phase = offset + slope_y * yy + slope_x * xx
    return normalise_maps(torch.polar(magnitude, phase)).to(torch.complex64)


def pack_maps(maps: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """(B, C, H, W) complex -> the stored form (B, 2C, m, m) float32, resampled to side ``size``."""
    b, c, h, w = maps.shape
    packed = torch.view_as_real(maps.to(torch.complex64)).permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h, w)
    if size is not None and (size, size) != (h, w):
        packed = F.interpolate(packed, size=(size, size), mode="bilinear", align_corners=True, antialias=True)
    return packed.contiguous()


def unpack_maps(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The stored form (B, 2C, m, m) -> (B, C, H, W) complex64, bilinearly interpolated when m differs
    from the image (real and imaginary parts separately: the maps are smooth)."""
    b, c2, h, w = packed.shape
    packed = packed.float()
    if (h, w) != (height, width):
        packed = F.interpolate(packed, size=(height, width), mode="bilinear", align_corners=True)
    return torch.view_as_complex(packed.reshape(b, c2 // 2, 2, height, width).permute(0, 1, 3, 4, 2).contiguous())


# ESPIRiT's calibration kernel (k-space points per side); its calibration square must be at least twice as
# wide (a narrower one leaves the kernel matrix rank-deficient and the maps empty).
ESPIRIT_KERNEL_WIDTH = 3
MIN_CALIBRATION_LINES = 2 * ESPIRIT_KERNEL_WIDTH


def espirit_maps(kspace: torch.Tensor, calibration_lines: int) -> torch.Tensor:
    """Each scan's sensitivities from its own fully sampled centre: (B, C, H, W) complex centred k-space ->
    (B, C, H, W) complex64 maps, sum_c |S_c|^2 = 1, unique up to one phase per pixel shared by the coils.

    sigpy's ``EspiritCalib`` (Uecker et al. 2014), one set of maps, calibrated on the central
    ``calibration_lines`` x ``calibration_lines`` square of k-space, which the ACS block of a column mask
    samples fully; crop 0 keeps the maps unmasked (P_I = I everywhere), as the RSD reference's ``ecalib -c0``.
    """
    import sigpy.mri  # numba-compiled, ~2 s to import: loaded only where maps are estimated

    if calibration_lines < MIN_CALIBRATION_LINES:
        raise ValueError(f"ESPIRiT needs at least {MIN_CALIBRATION_LINES} fully sampled centre lines to estimate "
                         f"coil maps, the scans have {calibration_lines}: raise acs_fraction, or give the maps")
    maps = [
        sigpy.mri.app.EspiritCalib(k.numpy(), calib_width=calibration_lines, kernel_width=ESPIRIT_KERNEL_WIDTH,
                                   thresh=0.02, crop=0.0, show_pbar=False).run()
        for k in kspace.to(torch.complex64)
    ]
    return torch.from_numpy(np.stack(maps)).to(torch.complex64)
