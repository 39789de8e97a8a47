"""Multi-coil Cartesian MRI: y_c = M * F(S_c x) + noise, with centred unitary F, column masks M and coil
sensitivities S (a simulated bank, or each scan's own: :mod:`rsd_core.operators.coil_maps`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator

from rsd_core.operators import Operator, State, lowest, mask_errors, rng_device
from rsd_core.operators.coil_maps import (
    ESPIRIT_KERNEL_WIDTH,
    birdcage_maps,
    espirit_maps,
    pack_maps,
    smooth_random_maps,
    unpack_maps,
)
from rsd_core.operators.spec import OperatorSpecBase


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred unitary 2-D FFT over the last two axes (DC at the centre)."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c`."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def to_complex(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) real [Re, Im] -> (B, H, W) complex."""
    return torch.complex(x[:, 0].float(), x[:, 1].float())


def to_real(z: torch.Tensor) -> torch.Tensor:
    """(B, H, W) complex -> (B, 2, H, W) real [Re, Im]."""
    return torch.stack([z.real, z.imag], dim=1)


class MRISpec(OperatorSpecBase):
    """Multi-coil Cartesian k-space under-sampling (column masks, centred unitary FFT).

    ``R`` is the acceleration of the acquisition mask M; the further mask M~ has acceleration
    about ``R + delta_R`` (``delta_R = 1`` reproduces the reference code's "delta = R + 1").
    ``acs_fraction`` is the fraction of central phase-encode lines always sampled.
    ``coil_maps`` says where the coil sensitivities come from: ``bank``, a deterministic bank of
    ``n_map_variants`` rotated birdcage maps picked per sample (simulation); ``observed``, each
    scan's own maps stored with it (estimated from its calibration lines, or delivered with the data),
    at side ``maps_size`` (None: the image's) and interpolated to the image.
    """

    kind: Literal["mri"] = "mri"
    R: float = Field(4.0, description="acceleration")
    delta_R: float = Field(1.0, description="extra acceleration of the further mask")
    acs_fraction: float = Field(0.0625, description="always-sampled centre lines, as a fraction of the width")
    n_coils: int = Field(4, description="number of coils")
    n_map_variants: int = Field(8, description="coil-map variants in the bank")
    coil_maps: Literal["bank", "observed"] = Field("bank", description="coil sensitivities: a simulated bank, "
                                                   "or each scan's own (observed)")
    maps_size: int | None = Field(None, description="side of the stored per-scan maps (observed coil maps; "
                                                    "default: the image's)")

    @field_validator("R")
    @classmethod
    def _check_R(cls, value: float) -> float:
        if not value >= 1.0:
            raise ValueError(f"R (acceleration) must be >= 1, got {value}")
        return value

    @field_validator("delta_R")
    @classmethod
    def _check_delta_R(cls, value: float) -> float:
        if not value > 0.0:
            raise ValueError(f"delta_R (extra acceleration of the further mask) must be > 0, got {value}")
        return value

    @field_validator("acs_fraction")
    @classmethod
    def _check_acs(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"acs_fraction must be in (0, 1], got {value}")
        return value

    @field_validator("n_coils", "n_map_variants")
    @classmethod
    def _check_counts(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("maps_size")
    @classmethod
    def _check_maps_size(cls, value: int | None) -> int | None:
        if value is not None and value < 2:
            raise ValueError(f"maps_size must be >= 2, got {value}")
        return value


class MRI(Operator):
    """Multi-coil Cartesian under-sampling: A_M(x)_c = M * F(S_c x), with centred unitary F.

    Images are complex, stored as 2 real channels [Re, Im]; observations are per-coil k-space,
    stored as 2 * n_coils real channels [Re c0, Im c0, Re c1, ...]. The column mask M is shared
    by every row and coil; its ACS block of central lines is always sampled. The coil maps S are
    the state ``maps`` (each scan's own, :mod:`rsd_core.operators.coil_maps`) or a bank entry ``maps_index``;
    with observed maps, fresh states (distillation, selection, export) pair a mask and the maps of
    observed scans drawn independently from the attached pool, as the RSD reference draws them.
    """

    splits_observations = True
    further_field = "delta_R"

    def __init__(self, spec: MRISpec):
        super().__init__(spec)
        self.R = spec.R
        self.delta_R = spec.delta_R
        self.acs_fraction = spec.acs_fraction
        self.n_coils = spec.n_coils
        self.n_map_variants = spec.n_map_variants
        self.observed_maps = spec.coil_maps == "observed"
        self.estimated_model = self.observed_maps  # a scan's own maps are estimates (ESPIRiT), the bank is exact
        self.maps_size = spec.maps_size
        self.state_keys = ("mask", "maps") if self.observed_maps else ("mask", "maps_index")
        self.pool_keys = ("mask", "maps") if self.observed_maps else ()
        self._maps_cache: dict[tuple[int, int], torch.Tensor] = {}

    def observation_shape(self, image_shape):
        if image_shape[0] != 2:
            raise ValueError(f"mri operator needs complex images with 2 channels [Re, Im], got {image_shape}")
        return (2 * self.n_coils, image_shape[1], image_shape[2])

    def _image_shape_for(self, y):
        return (2, y.shape[-2], y.shape[-1])

    def image_view(self, y, state):
        """k-space seen as its coil-combined zero-filled reconstruction A^H y."""
        return self.adjoint(y.float(), state)

    def observation_bound(self, image_shape, value_range):
        """|F(S x)| <= sqrt(H W) max|x| with |S| <= 1 and |x| <= sqrt(2) max(|lo|, |hi|)."""
        lo, hi = value_range
        bound = math.sqrt(2.0 * image_shape[1] * image_shape[2]) * max(abs(lo), abs(hi))
        return (-bound, bound)

    def maps_bank(self, height: int, width: int, device="cpu") -> torch.Tensor:
        """(K, n_coils, H, W) complex maps a ``maps_index`` picks from: the birdcage bank rotated evenly over
        one coil spacing, or, with observed maps, the pool's."""
        if self.observed_maps:
            return unpack_maps(self._pool()["maps"], height, width).to(device)
        key = (height, width)
        if key not in self._maps_cache:
            step = 2 * math.pi / self.n_coils / self.n_map_variants
            self._maps_cache[key] = torch.stack(
                [birdcage_maps(self.n_coils, height, width, v * step) for v in range(self.n_map_variants)]
            )
        return self._maps_cache[key].to(device)

    def _pool(self) -> State:
        if self.pool is None:
            raise RuntimeError("the mri operator with observed coil maps draws fresh states from observed scans, and "
                               "none are attached: open it through its dataset or a saved model (attach_pool)")
        return self.pool

    def state_shapes(self, image_shape):
        if not self.observed_maps:
            return super().state_shapes(image_shape)
        side = self.maps_size or image_shape[-1]
        return {"mask": ((1, 1, image_shape[-1]), torch.float32),
                "maps": ((2 * self.n_coils, side, side), torch.float32)}

    def n_acs(self, width: int) -> int:
        return max(1, round(self.acs_fraction * width))

    def acs_block(self, width: int) -> torch.Tensor:
        """(W,) bool: the centred block of auto-calibration lines every mask keeps."""
        n_acs = self.n_acs(width)
        start = width // 2 - n_acs // 2
        acs = torch.zeros(width, dtype=torch.bool)
        acs[start : start + n_acs] = True
        return acs

    def column_masks(
        self, batch: int, width: int, accel: float, rng: torch.Generator | None, device="cpu"
    ) -> torch.Tensor:
        """(B, 1, 1, W) masks with floor(W / accel) lines: the ACS block plus random others."""
        n_acs = self.n_acs(width)
        n_random = max(n_acs, math.floor(width / accel)) - n_acs
        acs = self.acs_block(width)
        u = torch.rand((batch, width), generator=rng, device=rng_device(rng)).cpu()
        masks = (lowest(torch.where(acs, 2.0, u), n_random) | acs).float()
        return masks.view(batch, 1, 1, width).to(device)

    def sample_state(self, batch, image_shape, rng=None, device="cpu") -> State:
        if self.observed_maps:
            pool = self._pool()
            rows = torch.randint(len(pool["mask"]), (2, batch), generator=rng, device=rng_device(rng)).cpu()
            return {"mask": pool["mask"][rows[0]].to(device), "maps": pool["maps"][rows[1]].to(device)}
        width = image_shape[-1]
        mask = self.column_masks(batch, width, self.R, rng, device)
        maps_index = torch.randint(self.n_map_variants, (batch,), generator=rng, device=rng_device(rng)).to(device)
        return {"mask": mask, "maps_index": maps_index}

    def simulation_state(self, batch, image_shape, rng=None) -> State:
        """With observed maps, scans are simulated through smooth random coils of their own (in no bank)."""
        if not self.observed_maps:
            return super().simulation_state(batch, image_shape, rng)
        height, width = image_shape[-2:]
        maps = smooth_random_maps(batch, self.n_coils, height, width, rng or torch.Generator().manual_seed(0))
        return {"mask": self.column_masks(batch, width, self.R, rng), "maps": pack_maps(maps)}

    def recorded_state(self, y, state) -> State:
        """With observed maps, a dataset knows each scan's maps as a team would: estimated from its ACS lines."""
        if not self.observed_maps:
            return state
        maps = espirit_maps(self.complex_kspace(y), self.n_acs(y.shape[-1]))
        return {**state, "maps": pack_maps(maps, self.maps_size)}

    def simulation_provenance(self) -> dict[str, str]:
        if not self.observed_maps:
            return {}
        return {"coil_maps": "simulated through smooth random coils of each scan's own (in no bank); stored: "
                             f"ESPIRiT's estimates (sigpy EspiritCalib, kernel {ESPIRIT_KERNEL_WIDTH}, crop 0)"}

    def complex_kspace(self, y: torch.Tensor) -> torch.Tensor:
        """(B, 2 * n_coils, H, W) real observations -> (B, n_coils, H, W) complex k-space."""
        b, _, h, w = y.shape
        return torch.view_as_complex(y.float().reshape(b, self.n_coils, 2, h, w).permute(0, 1, 3, 4, 2).contiguous())

    def further_mask(self, mask: torch.Tensor, rng: torch.Generator | None, acs_holdout: float = 0.0) -> torch.Tensor:
        """M~ within M: keep ACS, drop random non-ACS lines down to floor(W / (R + delta_R)) lines.

        With ``acs_holdout`` > 0 each row's ACS lines, with that probability, are droppable like the others (a
        further draw, so the default's random stream is unchanged)."""
        batch, width = mask.shape[0], mask.shape[-1]
        target = max(self.n_acs(width), math.floor(width / (self.R + self.delta_R)))
        sampled = mask.reshape(batch, width) > 0
        optional = sampled & ~self.acs_block(width).to(mask.device)
        n_drop = (sampled.sum(1, keepdim=True) - target).clamp_min(0)
        u = torch.rand((batch, width), generator=rng, device=rng_device(rng)).to(mask.device)
        if acs_holdout:
            free = torch.rand((batch, 1), generator=rng, device=rng_device(rng)).to(mask.device) < acs_holdout
            optional = torch.where(free, sampled, optional)
        out = mask.reshape(batch, width) * ~(optional & lowest(torch.where(optional, u, 2.0), n_drop))
        return out.view_as(mask)

    def coil_maps(self, state: State, height: int, width: int, device="cpu") -> torch.Tensor:
        """(B, n_coils, H, W) complex sensitivities of each sample: its own, or its bank entry."""
        if "maps" in state:
            return unpack_maps(state["maps"].to(device), height, width)
        return self.maps_bank(height, width, device)[state["maps_index"].to(device).long()]

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        b, _, h, w = x.shape
        maps = self.coil_maps(state, h, w, x.device)
        k = fft2c(maps * to_complex(x)[:, None]) * state["mask"].to(x.device)
        return torch.view_as_real(k).permute(0, 1, 4, 2, 3).reshape(b, 2 * self.n_coils, h, w).to(x.dtype)

    def adjoint(self, y: torch.Tensor, state: State) -> torch.Tensor:
        h, w = y.shape[-2:]
        k = self.complex_kspace(y) * state["mask"].to(y.device)
        maps = self.coil_maps(state, h, w, y.device)
        return to_real((maps.conj() * ifft2c(k)).sum(1)).to(y.dtype)

    def first_invalid(self, y, state, atol):
        if self.observed_maps:
            maps = state["maps"]
            bad = ~torch.isfinite(maps).flatten(1).all(1) | (maps.flatten(1).abs().amax(1) == 0)
            if bad.any():
                return int(bad.nonzero()[0]), "state 'maps' is all zero or not finite"
        else:
            index = state["maps_index"]
            bad = (index < 0) | (index >= self.n_map_variants)
            if bad.any():
                return int(bad.nonzero()[0]), f"state 'maps_index' is outside [0, {self.n_map_variants})"
        return mask_errors(y, state["mask"], atol, "the k-space line is not sampled")

    def normal(self, x: torch.Tensor, state: State) -> torch.Tensor:
        """P_M x = A^H A x, the image-to-image map used by the Fourier-space Ambient objective."""
        return self.adjoint(self.forward(x, state), state)

    def noise(self, y, rng, state):
        # Only sampled k-space lines are measured.
        return super().noise(y, rng, state) * state["mask"].to(y.dtype)
