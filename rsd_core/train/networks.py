"""EDM preconditioning around plain backbones (a compact U-Net, an MLP for vectors).

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, cond; c_noise(sigma)).
``cond`` holds extra input channels (e.g. the Ambient mask A~, or the MRI mask and a ones
channel); they are concatenated to the scaled image but take no part in the skip path, so the
skip multiplies exactly the (masked/projected) image that the network was given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rsd_core.config import NetworkConfig


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_data**2)
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise condition c_noise."""

    def __init__(self, channels: int, max_positions: int = 10_000):
        super().__init__()
        self.channels = channels
        self.max_positions = max_positions

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.arange(half, device=t.device, dtype=torch.float32) / half
        freqs = (1.0 / self.max_positions) ** freqs
        x = t.float()[:, None] * freqs[None] * 1000.0
        return torch.cat([x.cos(), x.sin()], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the noise embedding as a per-channel scale and shift."""

    def __init__(self, c_in: int, c_out: int, emb_channels: int, dropout: float, attention: bool):
        super().__init__()
        self.norm0 = _norm(c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * c_out)
        self.norm1 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attention = attention
        if attention:
            self.norm2 = _norm(c_out)
            self.qkv = nn.Conv2d(c_out, 3 * c_out, 1)
            self.proj = nn.Conv2d(c_out, c_out, 1)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = (h + self.skip(x)) / math.sqrt(2)
        if self.attention:
            b, c, hh, ww = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, c, hh * ww).transpose(-1, -2).unbind(1)
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
            x = (x + self.proj(a.transpose(-1, -2).reshape(b, c, hh, ww))) / math.sqrt(2)
        return x


class UNet(nn.Module):
    """A compact DDPM++-style U-Net: one config scales from ~1 M parameters to 64x64 models."""

    def __init__(self, cfg: NetworkConfig, in_channels: int, out_channels: int):
        super().__init__()
        ch = cfg.model_channels
        emb_ch = 4 * ch
        self.map_noise = PositionalEmbedding(ch)
        self.map_layer0 = nn.Linear(ch, emb_ch)
        self.map_layer1 = nn.Linear(emb_ch, emb_ch)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        c = ch
        res = cfg.img_resolution
        for level, mult in enumerate(cfg.channel_mult):
            if level > 0:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                res //= 2
                skips.append(c)
            for _ in range(cfg.num_blocks):
                block = ResBlock(c, ch * mult, emb_ch, cfg.dropout, res in cfg.attn_resolutions)
                self.down.append(block)
                c = ch * mult
                skips.append(c)

        self.mid = nn.ModuleList(
            [ResBlock(c, c, emb_ch, cfg.dropout, True), ResBlock(c, c, emb_ch, cfg.dropout, False)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_blocks + 1):
                block = ResBlock(c + skips.pop(), ch * mult, emb_ch, cfg.dropout, res in cfg.attn_resolutions)
                self.up.append(block)
                c = ch * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.map_layer0(self.map_noise(c_noise)))
        emb = F.silu(self.map_layer1(emb))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLP(nn.Module):
    """Residual MLP denoiser backbone for vector data (the eigenspace experiment)."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        self.map_noise = PositionalEmbedding(32)
        self.inp = nn.Linear(in_features + 32, hidden)
        self.blocks = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.out = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x, self.map_noise(c_noise)], dim=1))
        for block in self.blocks:
            h = h + block(F.silu(h))
        return self.out(F.silu(h))


class EDMPrecond(nn.Module):
    """EDM-preconditioned denoiser D(x; sigma, cond) around any backbone F(input, c_noise).

    ``img_channels`` channels are denoised; ``cond_channels`` extra channels are inputs only.
    The preconditioning and the output are float32 even when the backbone runs in bf16.
    """

    def __init__(self, backbone: nn.Module, img_channels: int, cond_channels: int = 0, sigma_data: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.img_channels = img_channels
        self.cond_channels = cond_channels
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None):
        x = x.float()
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        c_skip, c_out, c_in, c_noise = (c.float() for c in edm_coefficients(sigma, self.sigma_data))
        inp = c_in.reshape(shape) * x
        if self.cond_channels:
            if cond is None or cond.shape[1] != self.cond_channels:
                got = None if cond is None else cond.shape[1]
                raise ValueError(f"network expects {self.cond_channels} conditioning channels, got {got}")
            inp = torch.cat([inp, cond.to(inp.dtype)], dim=1)
        f = self.backbone(inp, c_noise)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * f.float()


def build_unet(cfg: NetworkConfig, cond_channels: int = 0) -> EDMPrecond:
    """The EDM U-Net denoiser for images with ``cfg.img_channels`` plus ``cond_channels`` inputs."""
    backbone = UNet(cfg, cfg.img_channels + cond_channels, cfg.img_channels)
    return EDMPrecond(backbone, cfg.img_channels, cond_channels, cfg.sigma_data)


def build_mlp(dim: int, hidden: int = 256, depth: int = 3, cond_channels: int = 0) -> EDMPrecond:
    """The EDM MLP denoiser for vectors in R^dim (plus ``cond_channels`` conditioning features)."""
    return EDMPrecond(MLP(dim + cond_channels, dim, hidden, depth), dim, cond_channels)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
