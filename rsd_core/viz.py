"""A dependency-light image grid, so datasets and samples can be eyeballed without matplotlib."""

from __future__ import annotations

import math

import fsspec
import numpy as np
import torch
from PIL import Image

from rsd_core.operators import Operator


def to_display(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) on the [-1, 1] scale -> (N, 1 or 3, H, W) in [0, 1].

    1 and 3 channels are shown as grey/RGB; 2 channels are complex [Re, Im] and shown as
    magnitude, whose range for such images is [0, 1] (larger values are clipped).
    """
    images = images.detach().float().cpu()
    channels = images.shape[1]
    if channels == 2:
        return images.pow(2).sum(dim=1, keepdim=True).sqrt().clamp(0.0, 1.0)
    if channels in (1, 3):
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)
    raise ValueError(f"cannot display images with {channels} channels (expected 1, 2 or 3)")


def observations_for_display(observations: torch.Tensor, operator: Operator, state: dict) -> torch.Tensor:
    """Observations as images, in the operator's own view (MRI k-space: its zero-filled adjoint)."""
    return operator.image_view(observations, state)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, padding: int = 2) -> None:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid, ``nrow`` images per row, to a local
    path or fsspec URL."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"save_grid needs a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    shown = to_display(images)
    n, c, h, w = shown.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.ones((c, rows * (h + padding) + padding, cols * (w + padding) + padding))
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[:, top : top + h, left : left + w] = shown[i]
    pixels = (grid * 255.0).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels[0] if c == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    with fsspec.open(path, "wb") as f:
        image.save(f, format="PNG")
