"""The amortised latent encoder: fitted on observations alone, it reaches the closed-form MAP of a
linear Gaussian generator in one pass, leaves the generator untouched, and round-trips through safetensors."""

import pytest
import torch

from rsd_core.encoder import EncoderConfig, encoder_inputs, load_encoder, restoration_loss, save_encoder
from rsd_core.restore import RestoreConfig, fit_restore_encoder, restore_observations
from tests.test_restore import SHAPE, SIGMA_INIT, D, LinearGenerator, matrix_of, observe, one_step

BLUR = {"kind": "blur", "kernel_size": 3, "std": 1.0, "sigma_n": 0.1}


def _map_latents(net, operator, y, config):
    """argmin_e ||A(W e + b) - y||^2 / (2 s^2) + lam ||e||^2 / 2 for a stateless linear A (rows of y)."""
    A = matrix_of(operator, {}).double()
    W, b = net.W.double(), net.b.double()
    s2 = max(operator.sigma_n, config.sigma_floor) ** 2
    AW = A @ W
    lhs = AW.T @ AW / s2 + config.prior_weight * torch.eye(D, dtype=torch.float64)
    rhs = AW.T @ (y.flatten(1).double() - A @ b).T / s2
    return torch.linalg.solve(lhs, rhs).T.float().view(len(y), *SHAPE)


def _loss(operator, net, eps, y, config):
    x = net(SIGMA_INIT * eps, torch.full((len(eps),), SIGMA_INIT))
    inv = 1.0 / (2.0 * max(operator.sigma_n, config.sigma_floor) ** 2)
    return restoration_loss(operator, x, eps, y, {}, inv, config.prior_weight)


@pytest.fixture(scope="module")
def fitted():
    operator, _, state, y = observe(BLUR, n=512, seed=3)
    net = LinearGenerator()
    config = RestoreConfig(steps=0, restarts=1, prior_weight=0.5, data_consistency=False,
                           encoder=EncoderConfig(steps=400, batch_size=64, lr=3e-3, width=16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    encoder, losses = fit_restore_encoder(one_step(net, operator), y, state, config)
    return operator, net, config, encoder, losses, before


def test_encoder_latents_approach_the_closed_form_map_on_unseen_observations(fitted):
    """On held-out observations the encoder closes at least 90% of the gap between the prior's mode
    (eps = 0: what an unfitted or detached encoder gives) and the MAP, the minimum of the objective."""
    operator, net, config, encoder, losses, _ = fitted
    _, _, _, y = observe(BLUR, n=128, seed=11)
    with torch.no_grad():
        eps = encoder(encoder_inputs(operator, y, {}, SHAPE))
        best = _loss(operator, net, _map_latents(net, operator, y, config), y, config).mean()
        got = _loss(operator, net, eps, y, config).mean()
        mode = _loss(operator, net, torch.zeros_like(eps), y, config).mean()
    assert best <= got + 1e-4  # the MAP is the minimum: a loss below it would mean a wrong objective
    assert (got - best) < 0.1 * (mode - best), (float(best), float(got), float(mode))
    assert losses[-1] < 0.5 * losses[0]


def test_fit_leaves_the_generator_untouched_and_trainable_flags_restored(fitted):
    _, net, _, _, _, before = fitted
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in net.parameters()] == [False, False]  # LinearGenerator's own flags


def test_restore_with_the_encoder_alone_is_its_latent_through_g(fitted):
    operator, net, config, encoder, _, _ = fitted
    _, _, state, y = observe(BLUR, n=5, seed=12)
    got = restore_observations(one_step(net, operator), y, state, config, encoder=encoder)
    with torch.no_grad():
        eps = encoder(encoder_inputs(operator, y, {}, SHAPE))
        want = net(SIGMA_INIT * eps, torch.full((5,), SIGMA_INIT)).clamp(-1, 1)
    assert torch.allclose(got.mean, want, atol=1e-6)
    with pytest.raises(ValueError, match="no fitted encoder was given"):
        restore_observations(one_step(net, operator), y, state, config)
    with pytest.raises(ValueError, match="steps 0 restores nothing without an encoder"):
        RestoreConfig(steps=0, encoder=None)


def test_encoder_round_trips_through_safetensors(fitted, tmp_path):
    operator, _, _, encoder, _, _ = fitted
    path = save_encoder(encoder, tmp_path / "encoder.safetensors", {"model": "m/1"})
    loaded, meta = load_encoder(path)
    _, _, _, y = observe(BLUR, n=4, seed=13)
    x = encoder_inputs(operator, y, {}, SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))
    assert meta == {"model": "m/1"}
    (tmp_path / "other.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception, match="other.safetensors|header"):
        load_encoder(tmp_path / "other.safetensors")
