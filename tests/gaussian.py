"""Closed forms for Gaussian data x0 ~ N(mu, Sigma) under the EDM (VE) noising x_t = x0 + sigma n."""

import torch


def random_covariance(d: int, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return scale * (a @ a.T) / d + 0.05 * torch.eye(d, dtype=torch.float64)


def gaussian_denoiser(mu: torch.Tensor, cov: torch.Tensor):
    """E[x0 | x_t] = mu + Sigma (Sigma + sigma^2 I)^-1 (x_t - mu), for vectors (B, d)."""

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        s = float(sigma)
        gain = cov @ torch.linalg.inv(cov + s**2 * torch.eye(len(mu), dtype=cov.dtype))
        return mu + (x.double() - mu) @ gain.T

    return denoise


class LinearNet(torch.nn.Module):
    """A linear predictor h = W x with the EDMPrecond call signature (sigma is held fixed by the test)."""

    def __init__(self, d: int):
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(d, d, dtype=torch.float64))

    def forward(self, x, sigma, cond=None):
        return x.double() @ self.W.T


def fit(net: torch.nn.Module, loss_fn, steps: int = 50) -> None:
    """Minimise a deterministic quadratic loss with L-BFGS (the least-squares solution)."""
    opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
