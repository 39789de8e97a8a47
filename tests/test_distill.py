"""RSD distillation: the SiD loss direction, re-corruption, no measurement noise in the G step, resume."""

import pytest
import torch
from torch import nn

from rsd_core.config import DistillConfig, DistillTrainConfig, NetworkConfig, TrainConfig
from rsd_core.kinds import build_operator, objective_for
from rsd_core.operators import Identity
from rsd_core.stages import ModelCard, checkpoint_distill_config, generator_from_checkpoint, save_model
from rsd_core.train.distill import (
    DistillPhase,
    OneStepGenerator,
    distill,
    fake_loss_mask,
    sid_generator_loss,
    sid_noise_levels,
)
from rsd_core.train.loop import StepContext, Trainer, list_checkpoints
from rsd_core.train.objectives import edm_weight
from rsd_core.train.pretrain import TensorSource, build_teacher, pretrain_teacher
from rsd_core.train.sampling import OneStepSampler, TeacherSampler, rho_fraction, rho_sigma


class GaussianDenoiser(nn.Module):
    """E[x0 | x0 + s n] = x var / (var + s^2) for x0 ~ N(0, var I): the exact denoiser of isotropic Gaussian data."""

    def __init__(self, var: float):
        super().__init__()
        self.var = nn.Parameter(torch.tensor(var, dtype=torch.float64))

    def forward(self, x, sigma):
        return x * self.var / (self.var + sigma.double().reshape(-1, 1, 1, 1) ** 2)


class ScaleGenerator(nn.Module):
    """G(z) = theta z, z ~ N(0, I): a generator of N(0, theta^2 I) with one weight."""

    def __init__(self, theta: float, shape=(1, 8, 8)):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))
        self.shape = shape

    def sample(self, n, rng, bf16=False):
        return self.theta * torch.randn((n, *self.shape), generator=rng, dtype=torch.float64)


def _generator_step_grad(theta, data_var, batch, swap=False, alpha=1.2):
    """d(loss)/d(theta) of one real generator step with exact Gaussian denoisers (teacher: the data's,
    fake: the generator's), and the same gradient in closed form from the step's own random draws.

    Per sample, with y = theta z + s n, teacher a y and fake b y (a = v / (v + s^2), b likewise with
    theta^2), d = (a - b) y and w = 1 / mean|theta z - a y| held fixed (computed without gradient):
        loss = w sum_pixels d . ((a y - theta z) - alpha d),  dy/dtheta = z,
        dloss/dtheta = w sum_pixels [-d . z + (a - b) z . ((a y - theta z) - alpha d) + d . (a z - alpha (a - b) z)].
    All but the first term reach theta through the networks' *inputs* y; detaching their outputs leaves
    -w sum d . z (returned too, to show the check can tell them apart). Returns (autograd grad, closed form,
    its Monte-Carlo standard error, detached closed form), all scaled as the step scales the loss.
    """
    objective = objective_for(build_operator({"kind": "identity"}))
    teacher, fake = GaussianDenoiser(data_var), GaussianDenoiser(theta**2)
    if swap:
        teacher, fake = fake, teacher
    generator = ScaleGenerator(theta)
    dcfg = DistillConfig(alpha=alpha)
    train = DistillTrainConfig(batch_size=batch, precision="fp32")
    phase = DistillPhase(teacher, objective, generator, fake, train, dcfg, {})
    phase._generator_step(StepContext(torch.Generator().manual_seed(0), torch.device("cpu"), False, False))

    gen = torch.Generator().manual_seed(0)  # replay the step's draws: z, then s, then n
    z = torch.randn((batch, *generator.shape), generator=gen, dtype=torch.float64)
    s = sid_noise_levels(batch, dcfg.t_max, gen, "cpu").double().reshape(-1, 1, 1, 1)
    n = torch.randn(z.shape, generator=gen).double()
    y = theta * z + s * n
    a, b = (net.var.item() / (net.var.item() + s**2) for net in (teacher, fake))
    d = (a - b) * y
    w = 1.0 / (theta * z - a * y).abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-5)
    scale = dcfg.loss_scaling_g
    direct = d * -z  # through y_g = x_g only
    via_inputs = (a - b) * z * ((a * y - theta * z) - alpha * d) + d * (a * z - alpha * (a - b) * z)
    per_sample = scale * (w * (direct + via_inputs)).sum((1, 2, 3))
    detached = scale * (w * direct).sum((1, 2, 3))
    se = float(per_sample.std()) / batch**0.5
    return float(generator.theta.grad), float(per_sample.mean()), se, float(detached.mean())


def test_sid_generator_gradient_flows_through_both_networks_inputs():
    """The generator step's gradient equals the closed form that includes the paths through f_phi's and
    f_psi's inputs (their weights frozen, their outputs not detached): docs/algorithms.md §7."""
    for theta in (0.5, 2.0):
        grad, closed, _, detached = _generator_step_grad(theta, 1.0, batch=256)
        assert grad == pytest.approx(closed, rel=1e-4), (theta, grad, closed)
        assert abs(closed - detached) > 0.02 * abs(closed), (theta, closed, detached)


def test_sid_generator_gradient_moves_toward_the_data_and_flips_when_swapped():
    """Data N(0, I), generator N(0, theta^2 I) in 64 dimensions: too narrow -> grow, too wide -> shrink,
    each by more than 30 Monte-Carlo standard errors; swapping teacher and fake reverses both."""
    for theta, swap, sign in ((0.5, False, -1), (2.0, False, 1), (0.5, True, 1), (2.0, True, -1)):
        grad, closed, se, _ = _generator_step_grad(theta, 1.0, batch=20_000, swap=swap)
        assert grad == pytest.approx(closed, rel=1e-4)
        assert sign * grad > 30 * se, (theta, swap, grad, se)


def test_generator_loss_mean_over_all_pixels_scales_the_loss_by_the_visible_fraction():
    """w = 1 / mean|y_g - f_phi| over the visible pixels (default) or over all of them (the reference's
    sid_loss.py): per sample the second is the first over the visible fraction."""
    gen = torch.Generator().manual_seed(0)
    f_phi, f_psi, y_g = (torch.randn(6, 2, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(6, 1, 8, 8, generator=gen) < torch.linspace(0.1, 0.9, 6).view(6, 1, 1, 1)).double()
    visible = sid_generator_loss(f_phi, f_psi, y_g, 1.2, mask)
    over_all = sid_generator_loss(f_phi, f_psi, y_g, 1.2, mask, mean_over="all")
    fraction = mask.flatten(1).mean(1)
    assert torch.allclose(over_all, visible / fraction, rtol=1e-10)
    assert not torch.allclose(visible, over_all)
    # without a mask every pixel is visible: the two agree
    assert torch.allclose(sid_generator_loss(f_phi, f_psi, y_g, 1.2, None, mean_over="all"),
                          sid_generator_loss(f_phi, f_psi, y_g, 1.2, None))


class MaskRecordingNet(nn.Module):
    """h = a learnable image per sample, whatever the input; records the input mask (conditioning) it was given."""

    def __init__(self, shape):
        super().__init__()
        self.image = nn.Parameter(torch.zeros(shape))
        self.seen_mask = None

    def forward(self, x, sigma, cond=None):
        self.seen_mask = cond.detach()
        return self.image


@pytest.mark.parametrize("loss_mask", ["observed", "further"])
def test_fake_loss_mask_observed_supervises_unseen_pixels_and_further_only_seen_ones(loss_mask):
    """Ambient inpainting: with the mask A the loss reaches pixels of A that A~ hid from the network (what
    makes the network inpaint); with A~ (the reference's train_loss) only pixels the network saw."""
    op = build_operator({"kind": "inpaint", "p": 0.5, "delta": 0.3})
    objective = objective_for(op)
    gen = torch.Generator().manual_seed(0)
    state = op.sample_state(16, (1, 8, 8), gen)
    y = op.forward(torch.rand(16, 1, 8, 8, generator=gen) + 0.5, state)
    net = MaskRecordingNet((16, 1, 8, 8))
    objective.loss(net, y, state, gen, loss_mask=loss_mask).sum().backward()
    seen = net.seen_mask.bool()
    hidden = state["mask"].bool() & ~seen  # in A, not in A~
    assert hidden.any() and (net.image.grad[seen] != 0).any()
    if loss_mask == "further":
        assert torch.all(net.image.grad[~seen] == 0)
    else:
        assert torch.all(net.image.grad[hidden] != 0)


@pytest.mark.parametrize(("kind", "setting", "used"), [
    ("inpaint", None, "further"), ("inpaint", "observed", "observed"), ("blur", None, "observed"),
    ("mri", None, "observed")])
def test_fake_loss_mask_default_is_the_further_mask_for_random_inpainting_only(kind, setting, used):
    """The measured default (docs/results.md, Distillation A/B): A~ for random inpainting, the objective's own
    loss elsewhere; an explicit setting wins."""
    objective = objective_for(build_operator({"kind": kind}))
    assert fake_loss_mask(DistillConfig(fake_loss_mask=setting), objective) == used


class SigmaCondRecordingNet(MaskRecordingNet):
    def forward(self, x, sigma, cond=None):
        self.sigma = sigma.detach()
        return super().forward(x, sigma, cond)


@pytest.mark.parametrize("loss_mask", ["observed", "further"])
def test_mri_fake_loss_compares_projections_onto_the_acquired_or_the_further_lines(loss_mask):
    """Fourier Ambient: ||P_M (h - x0)||^2 (the teacher's loss) or ||P_M~ (h - x0)||^2 (the reference MRI loop's
    fake-score train_loss), both from the measured k-space only, checked against the recorded M~ and sigma."""
    op = build_operator({"kind": "mri", "R": 4, "n_coils": 4})
    objective = objective_for(op)
    gen = torch.Generator().manual_seed(0)
    state = op.sample_state(3, (2, 16, 16), gen)
    y = op.observe(torch.randn(3, 2, 16, 16, generator=gen), state, gen)
    net = SigmaCondRecordingNet((3, 2, 16, 16))
    with torch.no_grad():
        net.image.normal_(generator=gen)
    loss = objective.loss(net, y, state, gen, loss_mask=loss_mask)
    further = {"mask": net.seen_mask[:, :1, :1, :], "maps_index": state["maps_index"]}
    used = further if loss_mask == "further" else state
    err = op.normal(net.image, used) - op.adjoint(y, used)
    expected = edm_weight(net.sigma, objective.sigma_data) * err.square().flatten(1).sum(1)
    assert torch.allclose(loss, expected, rtol=1e-4)
    assert not torch.equal(further["mask"].expand_as(state["mask"]), state["mask"])  # M~ is a strict subset


def test_fake_loss_mask_further_is_refused_for_objectives_without_a_further_mask():
    objective = objective_for(build_operator({"kind": "blur"}))
    teacher = GaussianDenoiser(1.0)
    with pytest.raises(ValueError, match="fake_loss_mask 'further' needs an objective with a further corruption"):
        DistillPhase(teacher, objective, ScaleGenerator(1.0), GaussianDenoiser(1.0),
                     DistillTrainConfig(batch_size=4), DistillConfig(fake_loss_mask="further"), {})


def test_noise_levels_follow_the_truncated_rho7_schedule():
    s = sid_noise_levels(100_000, 800, torch.Generator().manual_seed(0), "cpu")
    assert float(s.min()) >= 0.002 - 1e-6 and float(s.max()) <= 24.42
    assert abs(float((s < 0.2).float().mean()) - 0.33) < 0.02  # docs/algorithms.md §7: ~33% of s below 0.2


def test_a_generator_sigma_floor_truncates_the_schedule_and_keeps_its_law_above():
    """With a floor, s never falls below it, and above it the law is the schedule's conditioned on s >= floor:
    P(s < x) = (u(x) - u(floor)) / (0.8 - u(floor)) with u = 1 - the inverse of the rho-schedule."""
    floor, x = 0.02, 0.2
    s = sid_noise_levels(100_000, 800, torch.Generator().manual_seed(0), "cpu", sigma_floor=floor)
    assert float(s.min()) >= floor * (1 - 1e-5) and float(s.max()) <= 24.42
    expected = (rho_fraction(floor) - rho_fraction(x)) / (0.8 - 1 + rho_fraction(floor))
    assert abs(float((s < x).float().mean()) - expected) < 0.01, expected
    assert rho_sigma(rho_fraction(floor)) == pytest.approx(floor)


class SigmaRecorder(GaussianDenoiser):
    """The exact denoiser, recording the noise levels it is asked at."""

    def __init__(self, var: float):
        super().__init__(var)
        self.sigmas: list[torch.Tensor] = []

    def forward(self, x, sigma):
        self.sigmas.append(sigma.detach().clone())
        return super().forward(x, sigma)


@pytest.mark.parametrize("floor", [None, 0.5])
def test_the_generator_step_scores_at_and_above_generator_sigma_min(floor):
    teacher = SigmaRecorder(1.0)
    objective = objective_for(build_operator({"kind": "identity"}))
    phase = DistillPhase(teacher, objective, ScaleGenerator(0.5), GaussianDenoiser(0.25),
                         DistillTrainConfig(batch_size=512, precision="fp32"),
                         DistillConfig(generator_sigma_min=floor), {})
    phase._generator_step(StepContext(torch.Generator().manual_seed(0), torch.device("cpu"), False, False))
    lowest = float(torch.cat(teacher.sigmas).min())
    if floor is None:
        assert lowest < 0.01  # the whole schedule: about 14% of its levels are below 0.02
    else:
        assert lowest >= floor * (1 - 1e-5)


class RecordingIdentity(Identity):
    def __init__(self, spec):
        super().__init__(spec)
        self.calls = []

    def sample_state(self, *a, **k):
        self.calls.append("sample_state")
        return super().sample_state(*a, **k)

    def forward(self, x, state):
        self.calls.append("forward")
        return super().forward(x, state)

    def noise(self, y, rng, state):
        self.calls.append("noise")
        return super().noise(y, rng, state)


TINY = NetworkConfig(img_resolution=8, img_channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=())


def test_fake_step_sees_recorrupted_samples():
    op = RecordingIdentity(build_operator({"kind": "identity", "sigma_n": 0.3}).spec)
    objective = objective_for(op)
    seen = []
    original_loss = objective.loss

    def recording_loss(net, y, state, rng=None):
        seen.append(y.detach().clone())
        return original_loss(net, y, state, rng)

    objective.loss = recording_loss
    torch.manual_seed(0)
    teacher = build_teacher(TINY, objective)
    generator = OneStepGenerator(build_teacher(TINY, objective), objective, (1, 8, 8))
    cfg = DistillTrainConfig(steps=1, batch_size=8, precision="fp32", channels_last=False)
    phase = DistillPhase(teacher, objective, generator, build_teacher(TINY, objective), cfg, DistillConfig(), {})

    ctx = StepContext(torch.Generator().manual_seed(0), torch.device("cpu"), False, False)
    gen_before = ctx.rng.get_state()
    phase._fake_step(ctx)
    assert op.calls == ["sample_state", "forward", "noise"]  # fresh state, A, fresh measurement noise
    ctx.rng.set_state(gen_before)
    with torch.no_grad():
        x_g = generator.eval().sample(8, ctx.rng)
    assert len(seen) == 1 and not torch.allclose(seen[0], x_g)  # the fake saw A(x_g) + noise, not x_g
    residual = seen[0] - x_g
    assert abs(float(residual.std()) - 0.3) < 0.05


@pytest.mark.parametrize("updates", [1, 3])
def test_each_iteration_takes_fake_updates_fake_steps_before_one_generator_step(updates):
    """DMD2's two time-scale rule: ``fake_updates`` fake-score steps, each on its own batch, per generator
    step; the iteration reports their mean loss."""
    objective = objective_for(build_operator({"kind": "identity", "sigma_n": 0.1}))
    torch.manual_seed(0)
    teacher = build_teacher(TINY, objective)
    generator = OneStepGenerator(build_teacher(TINY, objective), objective, (1, 8, 8))
    cfg = DistillTrainConfig(steps=2, batch_size=4, precision="fp32", channels_last=False)
    phase = DistillPhase(teacher, objective, generator, build_teacher(TINY, objective), cfg,
                         DistillConfig(fake_updates=updates), {})
    losses = []
    original = phase._fake_step
    phase._fake_step = lambda ctx: losses.append(original(ctx)) or losses[-1]
    ctx = StepContext(torch.Generator().manual_seed(0), torch.device("cpu"), False, False)
    metrics = [phase.step(ctx) for _ in range(2)]

    def adam_steps(opt):
        return {int(state["step"]) for state in opt.state.values()}

    assert adam_steps(phase.opt_fake) == {2 * updates} and adam_steps(phase.opt_g) == {2}
    assert metrics[-1]["loss_fake"] == pytest.approx(sum(loss for loss, _ in losses[-updates:]) / updates)


def test_fake_updates_below_one_are_refused():
    with pytest.raises(ValueError, match="fake_updates"):
        DistillConfig(fake_updates=0)


class OtherNoiseIdentity(Identity):
    """The same operator with another measurement-noise source: ten times the noise, from its own generator."""

    def __init__(self, spec):
        super().__init__(spec)
        self.own = torch.Generator().manual_seed(123)

    def noise(self, y, rng, state):
        return 10 * super().noise(y, self.own, state)


def _generator_step_result(op):
    """Loss, gradient norm and updated weights of one generator step from fixed networks and seeds."""
    objective = objective_for(op)
    torch.manual_seed(0)
    teacher, net, fake = (build_teacher(TINY, objective) for _ in range(3))
    with torch.no_grad():  # off the zero-initialised output layers, so that teacher and fake disagree
        for p in (*teacher.parameters(), *fake.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    generator = OneStepGenerator(net, objective, (1, 8, 8))
    cfg = DistillTrainConfig(steps=1, batch_size=8, precision="fp32", channels_last=False)
    phase = DistillPhase(teacher, objective, generator, fake, cfg, DistillConfig(), {})
    loss, grad_norm = phase._generator_step(StepContext(torch.Generator().manual_seed(0), torch.device("cpu"),
                                                        False, False))
    return loss, grad_norm, [p.detach().clone() for p in generator.parameters()]


def test_generator_step_is_unchanged_by_the_measurement_noise():
    """y_g = A(G(z)) carries no measurement noise (docs/algorithms.md §7): the step's loss, gradient and updated
    generator are bit-identical whether the operator's noise is its own, ten times larger from another
    generator, or of twice the sigma_n; any use of the noise (through ``noise``, ``observe`` or sigma_n
    itself, or a draw from the step's generator) would change them."""
    spec = build_operator({"kind": "identity", "sigma_n": 0.3}).spec
    results = [_generator_step_result(op) for op in (
        Identity(spec), OtherNoiseIdentity(spec), build_operator({"kind": "identity", "sigma_n": 0.6}))]
    (loss, grad_norm, weights), *others = results
    assert grad_norm > 0
    for other_loss, other_norm, other_weights in others:
        assert (other_loss, other_norm) == (loss, grad_norm)
        assert all(torch.equal(a, b) for a, b in zip(weights, other_weights, strict=True))


def _tiny_teacher(digits8, tmp_path):
    op = build_operator({"kind": "inpaint", "p": 0.5})
    gen = torch.Generator().manual_seed(0)
    state = op.sample_state(len(digits8), (1, 8, 8), gen)
    objective = objective_for(op)
    torch.manual_seed(0)
    net = build_teacher(TINY, objective)
    cfg = TrainConfig(steps=40, batch_size=32, lr=2e-3, lr_rampup_steps=5, checkpoint_every=40, precision="fp32")
    phase, _ = pretrain_teacher(net, objective, TensorSource(op.observe(digits8, state, gen), state), cfg,
                                tmp_path / "teacher", progress=False)
    return phase.ema, objective


def test_short_distillation_runs_checkpoints_resumes_and_samples(digits8, tmp_path):
    teacher, objective = _tiny_teacher(digits8, tmp_path)
    cfg = DistillTrainConfig(steps=12, batch_size=16, checkpoint_every=4, precision="fp32", ema_halflife_nimg=100)
    dcfg = DistillConfig(lr_fake=1e-4, lr_generator=1e-4)
    straight, result = distill(teacher, objective, (1, 8, 8), cfg, dcfg, tmp_path / "a", progress=False)
    assert result.steps == 12 and result.nonfinite_skipped == 0
    assert {"loss_fake", "loss_generator"} <= set(result.metrics)

    short = cfg.model_copy(update={"steps": 8})
    distill(teacher, objective, (1, 8, 8), short, dcfg, tmp_path / "b", progress=False)
    resumed, result = distill(teacher, objective, (1, 8, 8), cfg, dcfg, tmp_path / "b", progress=False)
    assert result.steps == 12
    assert len(list_checkpoints(tmp_path / "b" / "checkpoints")) == 3
    # the checkpoints record the fake-score mask that was used (None resolved: A~ for random inpainting)
    assert checkpoint_distill_config(list_checkpoints(tmp_path / "b" / "checkpoints")[-1]).fake_loss_mask == "further"
    for a, b in zip(straight.generator_ema.parameters(), resumed.generator_ema.parameters(), strict=True):
        assert torch.equal(a, b)

    student = OneStepSampler(straight.generator_ema.net, objective, (1, 8, 8))
    samples = student.sample(10, seed=1)
    assert samples.shape == (10, 1, 8, 8) and torch.isfinite(samples).all() and student.nfe == 1
    assert torch.equal(samples, student.sample(10, seed=1))
    teacher_sampler = TeacherSampler(teacher, objective, (1, 8, 8), sigma_stop=0.05)  # returns at the grid level 0.0599
    assert teacher_sampler.nfe == 29 and torch.isfinite(teacher_sampler.sample(4, seed=0)).all()
    assert Trainer  # the distillation ran through the shared loop


def test_checkpoints_are_scored_at_the_sigma_init_they_were_distilled_with(digits8, tmp_path):
    """Selection samples checkpoints as the exported model will: at the distillation's sigma_init, not the
    teacher card's default 2.5."""
    teacher, objective = _tiny_teacher(digits8, tmp_path)
    card = ModelCard(kind="teacher", network=TINY, operator=objective.operator.spec, image_shape=(1, 8, 8),
                     objective=objective.name)
    teacher_dir = save_model(tmp_path / "teacher_model", teacher, card)
    cfg = DistillTrainConfig(steps=2, batch_size=8, checkpoint_every=2, precision="fp32")
    phase, _ = distill(teacher, objective, (1, 8, 8), cfg, DistillConfig(sigma_init=1.0), tmp_path / "d",
                       progress=False)
    sampler = generator_from_checkpoint(list_checkpoints(tmp_path / "d" / "checkpoints")[-1], teacher_dir)
    assert sampler.sigma_init == 1.0
    expected = OneStepSampler(phase.generator_ema.net, objective, (1, 8, 8), 1.0).sample(6, seed=3)
    assert torch.allclose(sampler.sample(6, seed=3), expected, atol=1e-5)


@pytest.mark.parametrize("floor", [0.001, 24.5])
def test_a_generator_sigma_min_outside_the_schedule_is_refused_naming_the_range(floor):
    with pytest.raises(ValueError, match=r"generator_sigma_min must be in \[0.002, 24.4\)"):
        DistillConfig(generator_sigma_min=floor)
