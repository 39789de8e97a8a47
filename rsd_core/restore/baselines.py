"""Classical estimates per operator kind: what a data team gets without any learnt prior.

The reference every learnt restoration must beat, measured on the same observations:
- inpaint: biharmonic interpolation of the missing pixels (scikit-image);
- blur: Wiener/Tikhonov deconvolution with the known kernel, closed form in the Fourier domain;
- superres: bicubic up-sampling of the low-resolution grid;
- mri (and any other linear kind): regularised least squares (SENSE for MRI) by conjugate gradient
  over the operator's own normal map A^T A, so the coil model is exactly the one that made y.
Zero filling is not a baseline. Every estimate is clamped to the image range [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rsd_core.operators import Blur, Operator, State, SuperRes
from rsd_core.operators.mri import MRI, to_real
from rsd_core.restore.least_squares import CG_ITERS, lambda_by_held_out, solve_normal

# Wiener noise-to-signal ratio per unit noise variance, for the Laplacian regulariser below
# (tuned on training observations of blur-noise-0.2; docs/algorithms.md §10.3).
WIENER_NSR_PER_VARIANCE = 1.25
# Tikhonov weight of least squares and its floor for noiseless data, tuned on training slices of mri-r4
# (docs/algorithms.md §10.3); the CG iterations match the data-consistency step's.
LSQ_LAMBDA_PER_VARIANCE = 1.0
LSQ_LAMBDA_FLOOR = 1e-5
LSQ_ITERS = CG_ITERS


def biharmonic_inpaint(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill the pixels where ``mask`` (B, 1, H, W; 1 = observed) is 0 by biharmonic interpolation."""
    # scikit-image (and the scipy it loads, ~0.15 s) only where it is used: the operator registry imports this
    # module, so every process that builds an operator would pay for it at start-up.
    from skimage.restoration import inpaint_biharmonic

    out = np.empty(tuple(y.shape), dtype=np.float64)
    images = y.detach().cpu().double().numpy()
    missing = mask.detach().cpu().numpy()[:, 0] < 0.5
    for i in range(len(images)):
        out[i] = inpaint_biharmonic(images[i], missing[i], channel_axis=0)
    return torch.from_numpy(out).float().clamp(-1.0, 1.0)


def _symmetric_extension(x: torch.Tensor) -> torch.Tensor:
    """Whole-sample symmetric extension to period (2H - 2, 2W - 2): on it, circular convolution with
    a symmetric kernel equals the operator's reflect-padded convolution, so the Fourier closed form
    is exact for the forward model instead of assuming periodic images."""
    x = torch.cat([x, x[..., 1:-1, :].flip(-2)], dim=-2)
    return torch.cat([x, x[..., 1:-1].flip(-1)], dim=-1)


def _transfer(kernel: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The FFT of a centred kernel placed on a grid of ``shape`` with its centre at (0, 0)."""
    grid = torch.zeros(shape, dtype=torch.float64)
    kh, kw = kernel.shape
    grid[:kh, :kw] = kernel.double()
    return torch.fft.fft2(torch.roll(grid, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1)))


def wiener_deblur(y: torch.Tensor, kernel: torch.Tensor, nsr: float) -> torch.Tensor:
    """x = F^-1[ conj(K) Y / (|K|^2 + nsr |L|^2) ] on the symmetric extension, cropped.

    L is the discrete Laplacian: the regulariser leaves the mean (DC) alone, which a plain
    Tikhonov term would shrink towards 0, i.e. towards mid-grey.
    """
    h, w = y.shape[-2:]
    ext = _symmetric_extension(y.detach().cpu().double())
    shape = tuple(ext.shape[-2:])
    laplacian = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
    k, lap = _transfer(kernel, shape), _transfer(laplacian, shape)
    x = torch.fft.ifft2(k.conj() * torch.fft.fft2(ext) / (k.abs() ** 2 + nsr * lap.abs() ** 2)).real
    return x[..., :h, :w].float().clamp(-1.0, 1.0)


def bicubic_upsample(y: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic up-sampling of the low-resolution grid (one value per constant ``factor`` block of y)."""
    low = y.detach().cpu().float()[..., ::factor, ::factor]
    return F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def least_squares_cg(operator: Operator, y: torch.Tensor, state: State, lam: float | torch.Tensor,
                     iters: int = LSQ_ITERS) -> torch.Tensor:
    """argmin_x ||A(x) - y||^2 + lam ||x||^2 per sample on the CPU, clamped to the image range."""
    state = {k: v.cpu() for k, v in state.items()}
    return solve_normal(operator, y.detach().cpu().float(), state, lam, iters).clamp(-1.0, 1.0)


def inpaint_classical(operator: Operator, y: torch.Tensor, state: State) -> torch.Tensor:
    return biharmonic_inpaint(y, state["mask"])


def blur_classical(operator: Blur, y: torch.Tensor, state: State) -> torch.Tensor:
    return wiener_deblur(y, operator.kernel, WIENER_NSR_PER_VARIANCE * max(operator.sigma_n, 1e-2) ** 2)


def superres_classical(operator: SuperRes, y: torch.Tensor, state: State) -> torch.Tensor:
    return bicubic_upsample(y, operator.factor)


def least_squares_classical(operator: Operator, y: torch.Tensor, state: State) -> torch.Tensor:
    """The weight follows the noise variance; where the forward model is an estimate (SENSE with coil maps
    estimated per scan) each observation's held-out measurements choose it (lambda_by_held_out)."""
    lam = max(LSQ_LAMBDA_PER_VARIANCE * operator.sigma_n**2, LSQ_LAMBDA_FLOOR)
    if operator.estimated_model and operator.splits_observations and operator.sigma_n == 0:
        lam = lambda_by_held_out(operator, y.detach().cpu().float(), {k: v.cpu() for k, v in state.items()},
                                 LSQ_ITERS).clamp_min(LSQ_LAMBDA_FLOOR)
    return least_squares_cg(operator, y, state, lam)


# L1-wavelet compressed sensing for MRI: the weights the held-out lines choose from, and the iterations.
CS_LAMBDAS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2)
CS_ITERS = 100


def l1_wavelet_mri(operator: MRI, y: torch.Tensor, state: State, lam: float | torch.Tensor,
                   iters: int = CS_ITERS) -> torch.Tensor:
    """argmin_x ||A(x) - y||^2 / 2 + lam ||W x||_1 (Daubechies-4 wavelets) per scan, by sigpy's
    ``L1WaveletRecon`` (FISTA) with each scan's mask and coil maps: the compressed-sensing reconstruction the
    RSD and Ambient-MRI papers compare against (the reference notebook's ``bart pics -l1``)."""
    import sigpy.mri  # numba-compiled, ~2 s to import: loaded only where it is used

    height, width = y.shape[-2:]
    kspace = (operator.complex_kspace(y) * state["mask"]).numpy()
    maps = operator.coil_maps(state, height, width).numpy()
    masks = state["mask"].float().numpy()
    lams = lam.tolist() if isinstance(lam, torch.Tensor) else [lam] * len(y)
    images = [sigpy.mri.app.L1WaveletRecon(k, s, w, weights=m[0], max_iter=iters, show_pbar=False).run()
              for k, s, m, w in zip(kspace, maps, masks, lams, strict=True)]
    return to_real(torch.from_numpy(np.stack(images)).to(torch.complex64)).clamp(-1.0, 1.0)


def compressed_sensing_mri(operator: MRI, y: torch.Tensor, state: State) -> torch.Tensor:
    """L1-wavelet compressed sensing with the weight the held-out k-space lines choose (no clean image)."""
    y = y.detach().cpu().float()
    state = {k: v.cpu() for k, v in state.items()}

    def solve(y_part: torch.Tensor, state_part: State, lam: float) -> torch.Tensor:
        return l1_wavelet_mri(operator, y_part, state_part, lam)

    lam = lambda_by_held_out(operator, y, state, CS_ITERS, lambdas=CS_LAMBDAS, solve=solve)
    return l1_wavelet_mri(operator, y, state, lam)

