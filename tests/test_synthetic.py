"""The linear eigenspace experiment: exact Gaussian denoisers, the matrix operator, and RSD recovering col(U)."""

import copy
import math

import numpy as np
import pytest
import torch

from benchmarks.synthetic import (
    GaussianDenoiser,
    LinearGenerator,
    MatrixOperator,
    MatrixSpec,
    Stage,
    blur_corruption,
    blur_matrix,
    condition_number,
    covariance_error,
    distill_linear,
    low_rank_basis,
    mask_corruption,
    principal_angles_deg,
    projection_distance,
    sample_clean,
    scaled_components,
    subspace_report,
)

D = 64


def _closed_form(cov: torch.Tensor, x: torch.Tensor, s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """M P (P (M + s^2 I) P + (I - P))^{-1} P x, one sample at a time with explicit d x d matrices."""
    eye = torch.eye(len(cov), dtype=torch.float64)
    out = []
    for i in range(len(x)):
        p = eye if mask is None else torch.diag(mask[i].double())
        k = p @ (cov + s[i].double() ** 2 * eye) @ p + (eye - p)
        out.append(cov @ p @ torch.linalg.solve(k, p @ x[i].double()))
    return torch.stack(out)


def test_gaussian_denoiser_equals_the_closed_form_with_and_without_a_mask():
    u = low_rank_basis(D)
    a = blur_matrix(D)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=gen)
    s = torch.tensor([0.002, 0.05, 0.3, 1.0, 5.0, 24.0])
    mask = (torch.rand(6, D, generator=gen) < 0.2).float()
    for cov in (u @ u.T, a @ u @ u.T @ a.T, 0.3 * torch.eye(D, dtype=torch.float64)):
        net = GaussianDenoiser.from_covariance(cov)
        torch.testing.assert_close(net(x, s).double(), _closed_form(cov, x, s, None), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(net(x, s, mask).double(), _closed_form(cov, x, s, mask), atol=1e-5, rtol=1e-4)
    # a scalar sigma broadcasts over the batch, as in the Heun sampler
    torch.testing.assert_close(net(x, 0.5), net(x, torch.full((6,), 0.5)))


def test_learnable_denoiser_is_psd_and_trains():
    net = GaussianDenoiser.from_covariance(low_rank_basis(D) @ low_rank_basis(D).T, learnable=True)
    assert net.factor.shape == (D, 4) and net.factor.requires_grad
    loss = net(torch.randn(8, D), 0.5).square().sum()
    loss.backward()
    assert net.factor.grad is not None and torch.isfinite(net.factor.grad).all()
    assert torch.linalg.eigvalsh(net.covariance.detach()).min() > -1e-9


def test_matrix_operator_adjoint_identity_and_blur_conditioning():
    a = blur_matrix(D)
    op = MatrixOperator(a, MatrixSpec(sigma_n=0.3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, D, generator=gen), torch.randn(5, D, generator=gen)
    lhs = (op.forward(x, {}) * y).sum()
    rhs = (x * op.adjoint(y, {})).sum()
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(op.adjoint(y, {}), super(MatrixOperator, op).adjoint(y, {}))  # the VJP default
    assert 4.5 < condition_number(a) < 5.5
    assert condition_number(blur_matrix(D, (0.25, 0.5, 0.25))) > 1_000
    noise = op.observe(x, {}, gen) - op.forward(x, {})
    assert abs(float(noise.std()) - 0.3) < 0.05


def test_pca_baselines_fail():
    u = low_rank_basis(D)
    gen = torch.Generator().manual_seed(1)
    blur = blur_corruption(u, 0.3)
    y, _ = blur.observe(sample_clean(u, 20_000, gen), gen)
    assert subspace_report(scaled_components(blur.backproject(y), 4), u).max_angle_deg > 30
    mask = mask_corruption(u)
    y, _ = mask.observe(sample_clean(u, 20_000, gen), gen)
    assert subspace_report(scaled_components(mask.backproject(y), 4), u).max_angle_deg > 30


def test_short_analytic_distillation_on_the_blur_recovers_the_eigenspace():
    torch.manual_seed(0)
    u = low_rank_basis(D)
    blur = blur_corruption(u, 0.3)
    teacher = GaussianDenoiser.from_covariance(blur.teacher_covariance)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    generator = LinearGenerator(D, 4)
    start = subspace_report(generator.theta.detach(), u).max_angle_deg
    theta = distill_linear(teacher, fake, generator, blur.objective, [Stage(800, 2e-3, 6e-3)], batch_size=256)
    end = subspace_report(theta, u).max_angle_deg
    assert start > 60 and end < 10, (start, end)


def test_subspace_metrics_same_rotated_and_orthogonal() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 2))
    rotation = np.array([[0.6, -0.8], [0.8, 0.6]])
    np.testing.assert_allclose(principal_angles_deg(a, a @ rotation), 0.0, atol=1e-6)
    assert projection_distance(a, a @ rotation) == pytest.approx(0.0, abs=1e-12)

    e = np.eye(6)
    np.testing.assert_allclose(principal_angles_deg(e[:, :2], e[:, 2:4]), 90.0)
    assert projection_distance(e[:, :2], e[:, 2:4]) == pytest.approx(2.0)

    theta = math.radians(30)
    tilted = math.cos(theta) * e[:, :1] + math.sin(theta) * e[:, 1:2]
    np.testing.assert_allclose(principal_angles_deg(e[:, :1], tilted), 30.0)
    b = rng.standard_normal((6, 2))
    assert projection_distance(a @ rotation, b) == pytest.approx(projection_distance(a, b))
    assert projection_distance(e[:, :1], tilted) == pytest.approx(math.sqrt(2) * math.sin(theta))


def test_covariance_error() -> None:
    rng = np.random.default_rng(4)
    u = rng.standard_normal((8, 3))
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    assert covariance_error(u, u) == pytest.approx(0.0, abs=1e-12)
    assert covariance_error(torch.tensor(u @ q), u) == pytest.approx(0.0, abs=1e-12)
    assert covariance_error(np.zeros_like(u), u) == pytest.approx(1.0)
    assert covariance_error(2 * u, u) == pytest.approx(3.0)


def test_eigenspace_sweep_plumbing_at_general_d_and_r(monkeypatch):
    """The --sweep helpers work away from d = 64, r = 4 (numbers meaningless: 1 % of the schedule)."""
    import argparse

    import benchmarks.eigenspace as eigenspace
    from benchmarks.eigenspace import coherence, profile_scales, sweep

    assert len(eigenspace.sweep_grid(quick=False)) == 36
    monkeypatch.setattr(eigenspace, "sweep_grid", lambda quick: [(16, 2, "steep", 100), (32, 8, "flat", 101)])
    assert profile_scales("decreasing", 4) == pytest.approx((3.0, 2.0, 1.5, 1.0))
    assert profile_scales("steep", 8)[0] == pytest.approx(3.0) and profile_scales("steep", 8)[-1] == pytest.approx(0.5)
    assert profile_scales("flat", 2) == (1.0, 1.0)
    assert 1.0 <= coherence(low_rank_basis(32, (1.0, 1.0), seed=3)) <= 16.0
    e = torch.zeros(8, 2, dtype=torch.float64)
    e[0, 0] = e[1, 1] = 1.0
    assert coherence(e) == pytest.approx(4.0)  # d / r: whole directions on single coordinates
    args = argparse.Namespace(quick=True, sweep_steps=0.5, generator_scale=0.05, batch=16, delta=0.1)
    result = sweep(args)
    assert result["runs"] == 4 and len(result["rows"]) == 4
    assert {(row["d"], row["r"], row["corruption"]) for row in result["rows"]} == {
        (16, 2, "mask"), (16, 2, "blur"), (32, 8, "mask"), (32, 8, "blur")}
    assert all(0.0 <= row["max_angle_deg"] <= 90.0 and math.isfinite(row["covariance_error"]) for row in result["rows"])
    assert result["worst_deg"] == max(row["max_angle_deg"] for row in result["rows"])
