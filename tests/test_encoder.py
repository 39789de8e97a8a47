"""The amortised latent encoder: fitted on observations alone, it reaches the closed-form MAP of a
linear Gaussian generator in one pass, leaves the generator untouched, and round-trips through safetensors."""

import pytest
import torch

from rsd_core.kinds import build_operator
from rsd_core.restore.encoder import (
    AmortisedEncoder,
    EncoderConfig,
    encoder_inputs,
    fit_encoder,
    load_encoder,
    posterior_loss,
    posterior_moments,
    restoration_loss,
    save_encoder,
)
from rsd_core.restore.estimate import RestoreConfig, fit_restore_encoder, restore_observations
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
                           encoder=EncoderConfig(steps=400, batch_size=64, lr=3e-3, width=16, target="latent"))
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


def _gaussian_posterior(net, operator, y):
    """E[x | y] and diag Cov[x | y] for x = W eps + b, eps ~ N(0, I), y = A x + sigma_n n (stateless A)."""
    A = matrix_of(operator, {}).double()
    W, b = net.W.double(), net.b.double()
    C = W @ W.T
    gain = C @ A.T @ torch.linalg.inv(A @ C @ A.T + operator.sigma_n**2 * torch.eye(len(A), dtype=torch.float64))
    mean = b + (y.flatten(1).double() - A @ b) @ gain.T
    var = torch.diagonal(C - gain @ A @ C)
    return mean.float().view(len(y), *SHAPE), var.sqrt().float().view(SHAPE)


@pytest.fixture(scope="module")
def image_target():
    operator = observe(BLUR, n=1)[0]
    net = LinearGenerator(scale=0.4)  # prior std ~ 0.4 per pixel against noise 0.1: both terms of the gain matter
    config = RestoreConfig(steps=0, data_consistency=False,
                           encoder=EncoderConfig(steps=1000, batch_size=64, lr=3e-3, width=16, target="image"))
    _, _, state, y = observe(BLUR, n=64, seed=3)  # the fit uses their states (none for blur), not their values
    encoder, losses = fit_restore_encoder(one_step(net, operator), y, state, config)
    return operator, net, config, encoder, losses


def test_image_target_reaches_the_gaussian_posterior_mean_and_std(image_target):
    """Trained only on the generator's samples seen through A with noise, the encoder's mean closes at
    least 90% of the squared-error gap between the prior mean (what an unfitted encoder gives) and
    E[x | y], and its std is within 15% of the closed-form posterior std. Trained without the
    measurement noise, or with the mean's error dropped, it fails one or the other."""
    operator, net, config, encoder, losses = image_target
    _, x, state, y = observe(BLUR, n=256, seed=11)
    with torch.no_grad():
        x = net(SIGMA_INIT * torch.randn(x.shape, generator=torch.Generator().manual_seed(5)),
                torch.full((len(x),), SIGMA_INIT))  # draws of the generator's own distribution
        y = operator.observe(x, {}, torch.Generator().manual_seed(6))
    want_mean, want_std = _gaussian_posterior(net, operator, y)
    want_mean = want_mean.clamp(-1, 1)  # as restorations are
    got = restore_observations(one_step(net, operator), y, state, config, encoder=encoder)
    gap = (got.mean - want_mean).square().mean()
    prior_gap = (net.b.view(SHAPE) - want_mean).square().mean()
    assert gap < 0.1 * prior_gap, (float(gap), float(prior_gap))
    # The Bayes estimate has the least squared error against the true x; the encoder's is close to it.
    assert (got.mean - x).square().mean() < 1.1 * (want_mean - x).square().mean()
    ratio = got.spread.mean(0) / want_std
    assert ratio.min() > 0.85 and ratio.max() < 1.15, ratio
    assert losses[-1] < losses[0]


def test_image_target_round_trips_and_refuses_a_latent_config(image_target, tmp_path):
    operator, net, config, encoder, _ = image_target
    loaded, _ = load_encoder(save_encoder(encoder, tmp_path / "e.safetensors", {}))
    assert loaded.target == "image"
    _, _, state, y = observe(BLUR, n=3, seed=13)
    latent = config.updated(encoder=config.encoder.updated(target="latent"))
    with pytest.raises(ValueError, match="target 'image' but config.encoder.target is 'latent'"):
        restore_observations(one_step(net, operator), y, state, latent, encoder=loaded)
    with pytest.raises(ValueError, match="steps refine G's latent"):
        config.updated(steps=3)


INPAINT = {"kind": "inpaint", "p": 0.5, "delta": 0.3, "sigma_n": 0.05}


def _masked_posterior(net, y, mask, sigma_n):
    """E[x | y] and diag Cov[x | y] for x = W eps + b and y = M x + sigma_n n on M's pixels, per sample."""
    W, b = net.W.double(), net.b.double()
    C = W @ W.T
    means, variances = [], []
    for y_i, m_i in zip(y.flatten(1).double(), mask.flatten(1).double(), strict=True):
        M = torch.diag(m_i)
        gain = C @ M @ torch.linalg.inv(M @ C @ M + sigma_n**2 * torch.eye(D, dtype=torch.float64))
        means.append(b + gain @ (y_i - M @ b))
        variances.append(torch.diagonal(C - gain @ M @ C))
    return torch.stack(means).float().view(-1, *SHAPE), torch.stack(variances).float().view(-1, *SHAPE)


def _generator_draws(net, operator, n, seed):
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = net(SIGMA_INIT * torch.randn((n, *SHAPE), generator=rng), torch.full((n,), SIGMA_INIT))
    state = operator.sample_state(n, SHAPE, rng)
    return x, state, operator.observe(x, state, rng)


@pytest.fixture(scope="module")
def ambient_fit():
    """A posterior-mean network fitted on masked observations of Gaussian images alone (fit_on
    'observations'): the generator is never evaluated, so it is a stub that fails if called."""
    operator = build_operator(INPAINT)
    net = LinearGenerator()
    # A shared offset plus pixel noise: E[x | y~] pools the pixels y~ has, a map a small network learns
    # in 1,000 steps (a dense random covariance takes many times more).
    net.W.data = 0.5 * torch.ones(D, D) / D**0.5 + 0.2 * torch.eye(D)
    _, state, y = _generator_draws(net, operator, 4096, seed=3)
    config = EncoderConfig(steps=1000, batch_size=64, lr=3e-3, width=16, target="image", fit_on="observations")

    def no_generator(eps, n):
        raise AssertionError("the observation fit evaluated the generator")

    encoder, losses = fit_encoder(no_generator, operator, SHAPE, y, state, config, prior_weight=0.1,
                                  sigma_floor=0.05)
    return operator, net, encoder, losses


def test_the_observation_fit_reaches_the_gaussian_posterior_mean_given_the_further_corrupted_input(ambient_fit):
    """Scored only on held-out measurements of the observations, the network fed y~ = A~(x) + noise closes
    at least 90% of the squared-error gap between the prior mean and E[x | y~] (the Gaussian closed form,
    per sample's mask) on the pixels y~ lacks, and its spread there is within 20% of
    sqrt(Var[x | y~] + sigma_n^2). Fed y itself instead of y~ (the held measurements leaking into its
    input), it learns to copy them and never the missing pixels: it fails."""
    operator, net, encoder, losses = ambient_fit
    x, state, y = _generator_draws(net, operator, 512, seed=11)
    y_in, state_in, _ = operator.split_observation(y, state, torch.Generator().manual_seed(12))
    want_mean, want_var = _masked_posterior(net, y_in, state_in["mask"], operator.sigma_n)
    with torch.no_grad():
        mean, log_var = posterior_moments(encoder(encoder_inputs(operator, y_in, state_in, SHAPE)))
    lacks = state_in["mask"].expand_as(mean) == 0
    gap = (mean - want_mean)[lacks].square().mean()
    prior_gap = (net.b.view(SHAPE) - want_mean).expand_as(mean)[lacks].square().mean()
    assert gap < 0.1 * prior_gap, (float(gap), float(prior_gap))
    assert (mean - x)[lacks].square().mean() < 1.3 * (want_mean - x)[lacks].square().mean()
    ratio = (0.5 * log_var).exp()[lacks] / (want_var + operator.sigma_n**2).sqrt()[lacks]
    assert 0.8 < float(ratio.mean()) < 1.2, float(ratio.mean())
    assert losses[-1] < losses[0]


def test_a_network_fitted_on_observations_restores_with_the_measurements_it_was_given(ambient_fit):
    """Never scored on the measurements its input has, the network's own output there is arbitrary; the
    restoration puts the measurements back even with data_consistency off (with held_out_passes 0, as they
    are, noise included), and keeps the network's estimate elsewhere."""
    operator, net, encoder, _ = ambient_fit
    _, state, y = _generator_draws(net, operator, 64, seed=13)
    config = RestoreConfig(steps=0, data_consistency=False, held_out_passes=0,
                           encoder=EncoderConfig(target="image", fit_on="observations", width=16))
    got = restore_observations(one_step(net, operator), y, state, config, encoder=encoder)
    with torch.no_grad():
        mean, _ = posterior_moments(encoder(encoder_inputs(operator, y, state, SHAPE)))
    measured = state["mask"].expand_as(y) > 0
    torch.testing.assert_close(got.mean[measured], y[measured].clamp(-1, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.mean[~measured], mean.clamp(-1, 1)[~measured], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def noisy_fit():
    """The observation fit of ``ambient_fit`` on noisier measurements (sigma_n 0.2), where pasting them back
    costs as much as the network's own error."""
    operator = build_operator({**INPAINT, "sigma_n": 0.2})
    net = LinearGenerator()
    net.W.data = 0.5 * torch.ones(D, D) / D**0.5 + 0.2 * torch.eye(D)
    _, state, y = _generator_draws(net, operator, 4096, seed=3)
    config = EncoderConfig(steps=1000, batch_size=64, lr=3e-3, width=16, target="image", fit_on="observations")
    encoder, _ = fit_encoder(None, operator, SHAPE, y, state, config, prior_weight=0.1, sigma_floor=0.05)
    return operator, net, encoder


def test_noisy_measurements_are_shrunk_toward_their_prediction_from_the_others(noisy_fit):
    """On measured pixels of noisy masked data the restoration is closer to E[x | y] (the Gaussian closed form,
    all of y) than the noisy measurements are: under half their squared error. Pasting y back
    (held_out_passes 0) fails this. On the pixels y lacks, the network fed all of y (it was fitted on the sparser
    y~) closes more than 80% of the gap between the prior mean and E[x | y]."""
    operator, net, encoder = noisy_fit
    _, state, y = _generator_draws(net, operator, 256, seed=21)
    want, _ = _masked_posterior(net, y, state["mask"], operator.sigma_n)
    config = RestoreConfig(steps=0, encoder=EncoderConfig(target="image", fit_on="observations", width=16))
    got = restore_observations(one_step(net, operator), y, state, config, encoder=encoder).mean
    measured = state["mask"].expand_as(y) > 0
    error = (got - want)[measured].square().mean()
    pasted = (y.clamp(-1, 1) - want)[measured].square().mean()
    assert error < 0.5 * pasted, (float(error), float(pasted))
    # fed all of y (trained on the sparser y~), the restoration is E[x | y] on the pixels y lacks too
    lacks = ~measured
    gap = (got - want)[lacks].square().mean()
    prior_gap = (net.b.view(SHAPE) - want).expand_as(got)[lacks].square().mean()
    assert gap < 0.2 * prior_gap, (float(gap), float(prior_gap))


def test_fit_on_resolves_by_operator_and_refuses_what_cannot_be_done():
    """'auto' fits on the observations where the operator can hold measurements out, on the generator
    elsewhere; asking for observations of a blur or of inpainting without further corruption, fit_on on
    the latent encoder, or a further mask that drops nothing at run time, is one clear error."""
    inpaint, blur = build_operator(INPAINT), build_operator(BLUR)
    assert EncoderConfig().image_pairs(inpaint) == "observations"
    assert EncoderConfig().image_pairs(blur) == "generator"
    assert EncoderConfig(fit_on="generator").image_pairs(inpaint) == "generator"
    with pytest.raises(ValueError, match="fit_on 'observations' needs an operator whose further mask holds"):
        EncoderConfig(fit_on="observations").image_pairs(blur)
    no_further = build_operator({**INPAINT, "delta": 0.0})  # its further mask is its mask: nothing held out
    assert EncoderConfig().image_pairs(no_further) == "generator"
    with pytest.raises(ValueError, match="'delta': 0.0"):
        EncoderConfig(fit_on="observations").image_pairs(no_further)
    # An MRI whose ACS block is every line it samples: the further mask can drop nothing.
    mri = build_operator({"kind": "mri", "R": 4, "n_coils": 2, "acs_fraction": 0.25})
    state = mri.sample_state(4, (2, 8, 8), torch.Generator().manual_seed(0))
    y = mri.forward(torch.randn(4, 2, 8, 8), state)
    with pytest.raises(ValueError, match="held out no measurement of 4 observations"):
        fit_encoder(None, mri, (2, 8, 8), y, state, EncoderConfig(steps=2, width=8), prior_weight=0.1,
                    sigma_floor=0.05)
    with pytest.raises(ValueError, match="fit_on 'generator' chooses the training pairs of target 'image'"):
        EncoderConfig(target="latent", fit_on="generator")


def _smooth_mri(operator, shape, grid, rng):
    """Observations of smooth complex images (a grid x grid field of random values, upsampled)."""

    def draw(n):
        x = torch.nn.functional.interpolate(torch.randn((n, 2, grid, grid), generator=rng), size=shape[1:],
                                            mode="bilinear", align_corners=True)
        state = operator.sample_state(n, shape, rng)
        return state, operator.observe(x, state, rng)

    return draw


def test_the_observation_fit_learns_multicoil_kspace_lines_it_was_not_given():
    """The same fit on 2-coil 16x16 k-space whose one ACS line cannot fix the image (8 complex values of
    freedom): the held lines' misfit on new observations falls to 0.23 of their energy. Fitted to copy its
    input (nothing held out) or fed the full y, it stays at 0.53-0.54 (measured)."""
    operator = build_operator({"kind": "mri", "R": 2, "n_coils": 2, "acs_fraction": 1 / 16})
    shape = (2, 16, 16)
    rng = torch.Generator().manual_seed(0)
    draw = _smooth_mri(operator, shape, 2, rng)
    state, y = draw(1024)
    config = EncoderConfig(steps=300, batch_size=32, lr=3e-3, width=8, target="image", fit_on="observations")
    encoder, losses = fit_encoder(None, operator, shape, y, state, config, prior_weight=0.1, sigma_floor=0.05)
    state, y = draw(256)
    y_in, state_in, held = operator.split_observation(y, state, rng)
    with torch.no_grad():
        mean, _ = posterior_moments(encoder(encoder_inputs(operator, y_in, state_in, shape)))
    misfit = ((operator.forward(mean, state) - y) * held).square().sum()
    assert misfit < 0.4 * (y * held).square().sum(), float(misfit / (y * held).square().sum())


def test_the_observation_fit_feeds_the_network_only_what_the_further_mask_kept(monkeypatch):
    """What one fitting step gives the network: the observation and the sampling pattern of the further mask,
    and nothing of the held lines it is scored on (a copy, a leak of y or of the full pattern fails here)."""
    operator = build_operator({"kind": "mri", "R": 2, "n_coils": 2, "acs_fraction": 1 / 16})
    shape = (2, 16, 16)
    state, y = _smooth_mri(operator, shape, 2, torch.Generator().manual_seed(0))(8)
    splits, inputs = [], []
    split = type(operator).split_observation  # on the class: the fit may split with a copy of another strength
    monkeypatch.setattr(type(operator), "split_observation",
                        lambda *a, **kw: splits.append(split(*a, **kw)) or splits[-1])
    forward = AmortisedEncoder.forward
    monkeypatch.setattr(AmortisedEncoder, "forward", lambda self, x, **kw: inputs.append(x) or forward(self, x, **kw))
    fit_encoder(None, operator, shape, y, state, EncoderConfig(steps=1, batch_size=8, width=8, target="image",
                                                               fit_on="observations"),
                prior_weight=0.1, sigma_floor=0.05)
    (y_in, state_in, held), given = splits[0], inputs[0]
    assert held.any() and not (held * state_in["mask"]).any()  # held lines are not among the kept ones
    assert not (y_in * held).any()
    torch.testing.assert_close(given, encoder_inputs(operator, y_in, state_in, shape))


@pytest.mark.parametrize("score_on", ["held", "all"])
def test_score_on_chooses_which_measurements_the_fit_is_scored_on(monkeypatch, score_on):
    """'held' scores the measurements the network's input lacks, none of those it has; 'all' scores every
    measurement of y (Ambient Diffusion's full objective), the input's included."""
    operator = build_operator(INPAINT)
    _, state, y = _generator_draws(LinearGenerator(), operator, 16, seed=4)
    splits, weights = [], []
    split = type(operator).split_observation  # on the class: the fit may split with a copy of another strength
    monkeypatch.setattr(type(operator), "split_observation",
                        lambda *a, **kw: splits.append(split(*a, **kw)) or splits[-1])
    monkeypatch.setattr("rsd_core.restore.encoder.held_out_loss",
                        lambda op, out, y_b, state_b, held: weights.append((held, state_b)) or out.sum((1, 2, 3)))
    config = EncoderConfig(steps=1, batch_size=16, width=8, target="image", fit_on="observations", score_on=score_on)
    fit_encoder(None, operator, SHAPE, y, state, config, prior_weight=0.1, sigma_floor=0.05)
    (_, state_in, _), (held, state_b) = splits[0], weights[0]
    kept = (held * state_in["mask"]).sum()
    if score_on == "held":
        assert held.any() and kept == 0
    else:
        torch.testing.assert_close(held, state_b["mask"].to(held.dtype))
        assert kept > 0


def test_holdout_delta_sets_the_share_of_measurements_the_fit_holds_out(monkeypatch):
    """The split's strength: inpainting with holdout_delta 0.6 holds out about 60% of the measured pixels per draw;
    without it, the operator's default for restorers (0.2), and where an operator has none its own delta (0.3);
    the operator the data were made with is left as it was."""
    operator = build_operator(INPAINT)
    _, state, y = _generator_draws(LinearGenerator(), operator, 256, seed=4)
    shares = []
    monkeypatch.setattr("rsd_core.restore.encoder.held_out_loss", lambda op, out, y_b, state_b, held: shares.append(
        float(held.sum() / state_b["mask"].sum())) or out.sum((1, 2, 3)))

    def fit(delta: float | None) -> None:
        config = EncoderConfig(steps=1, batch_size=256, width=8, fit_on="observations", holdout_delta=delta)
        fit_encoder(None, operator, SHAPE, y, state, config, prior_weight=0.1, sigma_floor=0.05)

    fit(None), fit(0.6)
    monkeypatch.setattr(operator, "restorer_further", None)
    fit(None)
    assert [round(share, 1) for share in shares] == [0.2, 0.6, 0.3], shares
    assert operator.delta == 0.3
    with pytest.raises(ValueError, match="delta"):
        build_operator(INPAINT).with_further(1.5)


@pytest.mark.parametrize("detach", [True, False])
def test_a_detached_variance_head_leaves_the_features_to_the_mean(detach):
    """The variance half of the output, differentiated alone: detached, it reaches only the head's own last layer
    (the features get no gradient from it); shared, the features get one."""
    encoder = AmortisedEncoder(1, 8, "image")
    torch.nn.init.normal_(encoder.out[-1].weight, std=0.1)  # zero-initialised: no gradient would flow either way
    out = encoder(torch.randn(4, 2, *SHAPE[1:]), detach_variance=detach)
    out[:, 1:].square().sum().backward()
    feature_grad = encoder.inp.weight.grad
    assert encoder.out[-1].weight.grad.abs().sum() > 0
    assert (feature_grad is None or feature_grad.abs().sum() == 0) == detach


@pytest.mark.parametrize(("detach", "fit_on", "want"), [(None, "observations", True), (None, "generator", False),
                                                     (False, "observations", False), (True, "generator", True)])
def test_detach_variance_reaches_the_network_as_configured(monkeypatch, detach, fit_on, want):
    operator = build_operator(INPAINT)
    net = LinearGenerator()
    _, state, y = _generator_draws(net, operator, 8, seed=4)
    calls = []
    forward = AmortisedEncoder.forward
    monkeypatch.setattr(AmortisedEncoder, "forward",
                        lambda self, x, **kw: calls.append(kw.get("detach_variance", False)) or forward(self, x, **kw))
    config = EncoderConfig(steps=1, batch_size=8, width=8, fit_on=fit_on, detach_variance=detach)
    fit_encoder(lambda eps, n: net(eps, torch.ones(n)), operator, SHAPE, y, state, config, prior_weight=0.1,
                sigma_floor=0.05)
    assert calls == [want]


def test_fit_choices_that_cannot_apply_are_refused_by_name():
    """The observation split's choices on a generator fit or on the latent encoder, and ACS lines on inpainting."""
    blur = build_operator(BLUR)
    with pytest.raises(ValueError, match="score_on 'all' / acs_holdout 0.0 / holdout_delta None choose how"):
        EncoderConfig(score_on="all").image_pairs(blur)
    with pytest.raises(ValueError, match="acs_holdout set the fit of target 'image'"):
        EncoderConfig(target="latent", acs_holdout=0.5)
    operator = build_operator(INPAINT)
    _, state, y = _generator_draws(LinearGenerator(), operator, 8, seed=4)
    with pytest.raises(ValueError, match="inpainting has no always-sampled"):
        fit_encoder(None, operator, SHAPE, y, state, EncoderConfig(steps=1, width=8, acs_holdout=0.5),
                    prior_weight=0.1, sigma_floor=0.05)


def test_the_spread_is_bounded_by_the_data_range_whatever_the_network_outputs():
    # a value in [-1, 1] has std <= 1: a head that outputs a huge log-variance still gives a spread <= 1
    # (an unbounded one gave 8.9 and failed the restoration's last step), and small outputs pass through
    raw = torch.tensor([-30.0, -8.0, 0.0, 5.0, 1e4]).reshape(1, 1, 1, 5)
    mean, log_var = posterior_moments(torch.cat([torch.zeros_like(raw), raw], dim=1))
    std = torch.exp(0.5 * log_var)
    assert float(std.max()) <= 1.0 and float(std.min()) > 0
    assert torch.allclose(log_var[..., 1], torch.tensor(-8.0), atol=1e-3)
    loss = posterior_loss(torch.cat([torch.zeros_like(raw), raw], dim=1).requires_grad_(), torch.zeros_like(raw))
    assert torch.isfinite(loss).all()


def test_a_fit_reports_its_progress_in_plain_lines_off_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("RSD_PROGRESS_INTERVAL", "0")
    operator = build_operator(INPAINT)
    _, state, y = _generator_draws(LinearGenerator(), operator, 64, seed=4)
    config = EncoderConfig(steps=3, batch_size=16, width=8, target="image", fit_on="observations")
    fit_encoder(None, operator, SHAPE, y, state, config, prior_weight=0.1, sigma_floor=0.05, progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[fit restorer]")]
    assert [line.split()[3] for line in lines] == ["1/3", "2/3", "3/3"] and "loss" in lines[-1]
