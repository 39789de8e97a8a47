"""EDM preconditioning, the Heun sampler and the corruption-aware objectives against closed forms."""

import math

import pytest
import torch

from rsd_core.kinds import build_operator
from rsd_core.train.networks import EDMPrecond, edm_coefficients
from rsd_core.train.objectives import AmbientDiffusionObjective, AmbientTweedieObjective, Objective
from rsd_core.train.sampling import edm_time_steps, heun_sample
from tests.gaussian import LinearNet, fit, gaussian_denoiser, random_covariance


def test_edm_constants_at_sigma_init():
    c_skip, c_out, c_in, c_noise = (float(c) for c in edm_coefficients(torch.tensor(2.5)))
    assert c_skip == pytest.approx(0.0385, abs=1e-4)
    assert c_out == pytest.approx(0.4903, abs=1e-4)
    assert c_in == pytest.approx(0.3922, abs=1e-4)
    assert c_noise == pytest.approx(0.2291, abs=1e-4)


class RecordingBackbone(torch.nn.Module):
    """A stub F(inp, c_noise) = 2 inp[:, :C] - inp[:, C:].sum(1) + c_noise that records what it was given."""

    def __init__(self, img_channels):
        super().__init__()
        self.img_channels = img_channels
        self.calls = []

    def forward(self, inp, c_noise):
        self.calls.append((inp.clone(), c_noise.clone()))
        c = self.img_channels
        return 2 * inp[:, :c] - inp[:, c:].sum(1, keepdim=True) + c_noise.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sigma_data", [0.5, 0.8])
def test_edm_precond_is_skip_plus_scaled_backbone_of_scaled_input(sigma_data):
    """D(x; sigma) = c_skip x + c_out F([c_in x, cond]; c_noise), with the coefficients written out here from
    docs/algorithms.md §2 (not taken from the code under test); the conditioning channels are not scaled."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 3, generator=gen)
    cond = torch.rand(4, 1, 3, 3, generator=gen)
    sigma = torch.tensor([0.01, 0.3, 2.5, 40.0])
    backbone = RecordingBackbone(2)
    out = EDMPrecond(backbone, img_channels=2, cond_channels=1, sigma_data=sigma_data)(x, sigma, cond)

    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (s**2 + sigma_data**2).sqrt()
    c_noise = sigma.double().log() / 4
    (inp, got_noise), = backbone.calls
    torch.testing.assert_close(inp.double(), torch.cat([c_in * x.double(), cond.double()], 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_noise.double(), c_noise, rtol=1e-5, atol=1e-6)
    f = 2 * c_in * x.double() - cond.double() + c_noise.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out.double(), c_skip * x.double() + c_out * f, rtol=1e-5, atol=1e-5)
    # a scalar sigma is broadcast over the batch
    scalar = EDMPrecond(RecordingBackbone(2), 2, 1, sigma_data)(x, 2.5, cond)
    torch.testing.assert_close(scalar[2], out[2])


def test_time_steps_match_the_published_levels():
    t = edm_time_steps(18)
    assert t.dtype == torch.float64 and len(t) == 19 and t[-1] == 0
    for got, want in zip(t[:4].tolist(), [80.0, 57.59, 40.79, 28.37], strict=True):
        assert got == pytest.approx(want, abs=0.01)
    assert float(t[11]) == pytest.approx(0.585, abs=1e-3)
    assert float(t[17]) == pytest.approx(0.002)


def test_heun_with_analytic_denoiser_reproduces_the_gaussian_in_35_calls():
    """18 Heun steps = 35 denoiser calls; the sample matches N(mu, Sigma).

    Measured: on Gaussians at the data scale (eigenvalues 0.05-2) the 18-level grid itself
    inflates the variance by 9-19% (its coarse high-sigma steps; the exact probability-flow map
    of the same latents is within 3.4%), so the 5% covariance bound is checked on a 200-step
    grid and the 18-step sampler is held to 15%.
    """
    d = 8
    mu = torch.linspace(-1, 1, d, dtype=torch.float64)
    cov = random_covariance(d)
    analytic = gaussian_denoiser(mu, cov)
    calls = []

    def denoise(x, t):
        calls.append(float(t))
        return analytic(x, t)

    latents = torch.randn(10_000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, nfe = heun_sample(denoise, latents)
    assert nfe == 35 and len(calls) == 35

    def errors(samples):
        mean_err = torch.linalg.norm(samples.mean(0) - mu) / torch.linalg.norm(mu)
        cov_err = torch.linalg.norm(torch.cov(samples.T) - cov) / torch.linalg.norm(cov)
        return float(mean_err), float(cov_err)

    mean_err, cov_err = errors(x)
    assert mean_err < 0.05 and cov_err < 0.15, (mean_err, cov_err)
    fine, _ = heun_sample(analytic, latents, num_steps=200)
    mean_err, cov_err = errors(fine)
    assert mean_err < 0.05 and cov_err < 0.05, (mean_err, cov_err)


def test_truncated_heun_returns_the_x0_prediction_at_the_stop_level():
    calls = []

    def denoise(x, t):
        calls.append(float(t))
        return torch.zeros_like(x)

    _, nfe = heun_sample(denoise, torch.randn(4, 3), sigma_stop=0.2)
    assert calls[-1] == pytest.approx(0.296, abs=1e-3)  # lowest grid level >= sigma_n = 0.2
    assert nfe == len(calls) == 25


def _gaussian_data(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cov = random_covariance(d, seed=seed, scale=1.0)
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return x0, cov, gen


class FixedSigma:
    """Pins the objective's noise level so that the loss is a quadratic in the predictor."""

    def __init__(self, objective, sigma):
        objective.sample_sigma = lambda batch, generator, device: torch.full((batch,), sigma, dtype=torch.float64)


def test_ambient_tweedie_minimiser_is_the_clean_posterior_mean():
    d, n, sigma_n, sigma_t = 4, 40_000, 0.5, 0.8
    x0, cov, _ = _gaussian_data(n, d)
    op = build_operator({"kind": "identity", "sigma_n": sigma_n})
    y = op.observe(x0, {}, torch.Generator().manual_seed(1))
    obj = AmbientTweedieObjective(op)
    FixedSigma(obj, sigma_t)
    net = LinearNet(d)
    fit(net, lambda: obj.loss(net, y, {}, torch.Generator().manual_seed(2)).mean())
    analytic = cov @ torch.linalg.inv(cov + sigma_t**2 * torch.eye(d, dtype=torch.float64))
    assert torch.allclose(net.W.detach(), analytic, atol=0.03), (net.W, analytic)

    # naive: the plain EDM loss on noisy data (full sigma_t added, y as the target) learns E[y | y_t]
    naive_obj = Objective(op)
    FixedSigma(naive_obj, sigma_t)
    naive = LinearNet(d)
    fit(naive, lambda: naive_obj.loss(naive, y, {}, torch.Generator().manual_seed(2)).mean())
    assert (naive.W.detach() - analytic).abs().max() > 0.1


class FlatLinearNet(LinearNet):
    """LinearNet on (B, C, H, W) images: h = W vec(x), reshaped back."""

    def forward(self, x, sigma, cond=None):
        return super().forward(x.flatten(1), sigma).reshape(x.shape)


def test_noisy_superres_minimiser_is_the_posterior_mean_of_the_low_resolution_image():
    """One 2x2 block, sigma_n 0.2, sigma_t 0.5: the Ambient Tweedie optimum is E[A x | y_t].

    With the noise drawn on the low-resolution grid and up-sampled (one value per block) the
    optimum was 0.14 away (largest entry 0.21): the objective's (1 - r) h + r y_t rule needs white noise."""
    d, n, sigma_n, sigma_t = 4, 40_000, 0.2, 0.5
    x0, cov, _ = _gaussian_data(n, d, seed=4)
    op = build_operator({"kind": "superres", "factor": 2, "sigma_n": sigma_n})
    y = op.observe(x0.reshape(n, 1, 2, 2), {}, torch.Generator().manual_seed(1))
    obj = AmbientTweedieObjective(op)
    FixedSigma(obj, sigma_t)
    net = FlatLinearNet(d)
    fit(net, lambda: obj.loss(net, y, {}, torch.Generator().manual_seed(2)).mean())
    a = torch.full((d, d), 1 / d, dtype=torch.float64)  # block averaging kept at full size
    cov_y = a @ cov @ a.T
    analytic = cov_y @ torch.linalg.inv(cov_y + sigma_t**2 * torch.eye(d, dtype=torch.float64))
    assert (net.W.detach() - analytic).abs().max() < 0.03, (net.W, analytic)


class SigmaRecordingNet(LinearNet):
    """A fixed random linear predictor that records the noise levels and inputs it is called with."""

    def __init__(self, d):
        super().__init__(d)
        self.W.data = torch.randn(d, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        self.sigmas, self.inputs = [], []

    def forward(self, x, sigma, cond=None):
        self.sigmas.append(sigma.detach().clone())
        self.inputs.append(x.detach().clone())
        return super().forward(x, sigma, cond)


def test_ambient_tweedie_clamps_sigma_t_below_sigma_n_to_sigma_n_with_zero_loss():
    """sigma_t = max(lognormal, sigma_n) (docs/algorithms.md §4): a draw below sigma_n is evaluated at sigma_n on
    the observation itself (no extra noise), where the mapped prediction is y exactly, so it carries no loss
    and no gradient whatever the network predicts; about 36.6% of draws clamp at sigma_n = 0.2."""
    d, sigma_n = 4, 0.2
    op = build_operator({"kind": "identity", "sigma_n": sigma_n})
    y = torch.randn(50_000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    below = AmbientTweedieObjective(op)
    FixedSigma(below, 0.1)
    net = SigmaRecordingNet(d)
    loss = below.loss(net, y[:64], {}, torch.Generator().manual_seed(1))
    assert torch.all(net.sigmas[0] == sigma_n) and torch.equal(net.inputs[0], y[:64])
    assert float(loss.detach().abs().max()) == 0.0
    loss.sum().backward()
    assert float(net.W.grad.abs().max()) == 0.0

    obj = AmbientTweedieObjective(op)
    net = SigmaRecordingNet(d)
    loss = obj.loss(net, y, {}, torch.Generator().manual_seed(2))
    clamped = net.sigmas[0] == sigma_n
    assert abs(float(clamped.double().mean()) - 0.366) < 0.01
    # zero up to the float32 rounding of sigma_n in the ratio sigma_n^2 / sigma_t^2
    assert float(loss[clamped].detach().abs().max()) < 1e-4 * float(loss[~clamped].detach().median())


class MaskIndexedLinearNet(torch.nn.Module):
    """One linear map per input-mask pattern: the most general predictor linear in A~ x_t given A~."""

    def __init__(self, d):
        super().__init__()
        self.d = d
        self.W = torch.nn.Parameter(torch.zeros(2**d, d, d, dtype=torch.float64))

    def pattern(self, mask):
        return (mask.long() * (2 ** torch.arange(self.d))).sum(1)

    def forward(self, x, sigma, cond):
        return torch.einsum("bij,bj->bi", self.W[self.pattern(cond)], x.double())


@pytest.mark.parametrize("heldout_sigma_floor", [0.0, 2.0])
def test_ambient_diffusion_minimiser_is_the_posterior_mean_given_the_further_mask(heldout_sigma_floor):
    """With a held-out weight floor above sigma the held-out pixels weigh less than the seen ones (the weight is
    a function of sigma and A~ only), and the minimiser must not move."""
    d, n, sigma = 3, 60_000, 0.5
    x0, cov, _ = _gaussian_data(n, d, seed=3)
    op = build_operator({"kind": "inpaint", "p": 0.3, "delta": 0.3})
    gen = torch.Generator().manual_seed(4)
    state = op.sample_state(n, (d,), gen)
    y = op.observe(x0, state, gen)
    obj = AmbientDiffusionObjective(op, heldout_sigma_floor=heldout_sigma_floor)
    FixedSigma(obj, sigma)
    net = MaskIndexedLinearNet(d)
    fit(net, lambda: obj.loss(net, y, state, torch.Generator().manual_seed(5)).mean(), steps=100)

    def analytic(pattern_mask):
        m = torch.diag(pattern_mask.double())
        return cov @ m @ torch.linalg.pinv(m @ (cov + sigma**2 * torch.eye(d, dtype=torch.float64)) @ m) @ m

    mask = torch.tensor([1.0, 0.0, 1.0])  # middle coordinate hidden from the network
    W = net.W.detach()[net.pattern(mask[None])[0]]
    assert torch.allclose(W, analytic(mask), atol=0.05), (W, analytic(mask))
    assert abs(float(analytic(mask)[1, 0])) > 0.1  # the hidden coordinate is really inferred

    # naive: an unmasked target (y, zero where A erased) shrinks the hidden coordinate toward 0
    class UnmaskedTarget(AmbientDiffusionObjective):
        def loss(self, net, y, state, rng=None):
            further = self.operator.further_mask(state["mask"], rng)
            s = self.sample_sigma(y.shape[0], rng, y.device)
            n_ = torch.randn(y.shape, generator=rng, dtype=y.dtype)
            h = self.denoise(net, y + s[:, None] * n_, s, {"mask": further})
            return ((h - y) ** 2).sum(1)

    naive_obj = UnmaskedTarget(op)
    FixedSigma(naive_obj, sigma)
    naive = MaskIndexedLinearNet(d)
    fit(naive, lambda: naive_obj.loss(naive, y, state, torch.Generator().manual_seed(5)).mean(), steps=100)
    W_naive = naive.W.detach()[naive.pattern(mask[None])[0]]
    assert (W_naive - analytic(mask)).abs().max() > 0.1


def test_ambient_heldout_floor_caps_only_the_heldout_pixels_weight():
    """Below the floor the held-out pixels (in A, not in A~) keep the EDM weight of the floor; the pixels the
    network sees keep EDM's weight at sigma; at or above the floor (or with no floor) both are EDM's."""
    from rsd_core.train.objectives import edm_weight

    op = build_operator({"kind": "inpaint", "p": 0.2, "delta": 0.4})
    y = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    state = op.sample_state(3, (1, 4, 4), torch.Generator().manual_seed(1))
    y = y * state["mask"]
    sigma = torch.tensor([0.02, 0.3, 1.5])
    prediction = torch.full_like(y, 0.7)

    def loss(floor):
        obj = AmbientDiffusionObjective(op, heldout_sigma_floor=floor)
        obj.sample_sigma = lambda batch, generator, device: sigma
        return obj.loss(lambda x, s, cond: prediction, y, state, torch.Generator().manual_seed(2))

    further = op.further_mask(state["mask"], torch.Generator().manual_seed(2))
    err = (prediction - y) ** 2
    seen = (further * err).flatten(1).sum(1)
    heldout = ((state["mask"] - further) * err).flatten(1).sum(1)
    assert float(heldout.min()) > 0 and float(seen.min()) > 0  # both kinds of pixel are in every sample
    floor = torch.tensor(0.3)
    expected = edm_weight(sigma) * seen + edm_weight(torch.maximum(sigma, floor)) * heldout
    torch.testing.assert_close(loss(0.3), expected)
    torch.testing.assert_close(loss(0.0), edm_weight(sigma) * (seen + heldout))
    capped, uncapped = loss(0.3), loss(0.0)
    assert float(capped[0]) < 0.5 * float(uncapped[0])  # only the sample below the floor moves
    torch.testing.assert_close(capped[1:], uncapped[1:])


def test_edm_weight_balances_the_loss_at_init():
    # lambda(sigma) * E||c_out F||^2 with F ~ unit variance should be O(1) per pixel: the EDM design rule
    from rsd_core.train.objectives import edm_weight

    for s in [0.01, 0.5, 10.0]:
        sigma = torch.tensor(s)
        _, c_out, _, _ = edm_coefficients(sigma)
        assert float(edm_weight(sigma) * c_out**2) == pytest.approx(1.0)
    assert math.isfinite(float(edm_weight(torch.tensor(1e-3))))
