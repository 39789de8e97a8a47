"""RSD distillation: the SiD loss direction, re-corruption, no measurement noise in the G step, resume."""

import torch

from rsd_core.config import DistillConfig, NetworkConfig, TrainConfig
from rsd_core.distill import DistillPhase, OneStepGenerator, distill, sid_generator_loss, sid_noise_levels
from rsd_core.objectives import objective_for
from rsd_core.operators import Identity, build_operator
from rsd_core.pretrain import TensorSource, build_teacher, pretrain_teacher
from rsd_core.sampling import OneStepSampler, TeacherSampler
from rsd_core.training import Trainer, list_checkpoints


def gaussian_1d_denoiser(var):
    return lambda x, s: x * var / (var + s[:, None] ** 2)


def _generator_grad(theta0, teacher_var, swap=False):
    theta = torch.tensor(theta0, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 1, generator=gen)
    x_g = theta * z
    s = sid_noise_levels(len(z), 800, gen, "cpu")
    y_s = x_g + s[:, None] * torch.randn(x_g.shape, generator=gen)
    teacher, fake = gaussian_1d_denoiser(teacher_var), gaussian_1d_denoiser(theta0**2)
    if swap:
        teacher, fake = fake, teacher
    loss = sid_generator_loss(teacher(y_s, s), fake(y_s, s), x_g, alpha=1.2).mean()
    loss.backward()
    return float(theta.grad)


def test_sid_generator_gradient_moves_toward_the_data_and_flips_when_swapped():
    # data N(0, 1); generator N(0, theta^2). Too narrow -> grow, too wide -> shrink.
    assert _generator_grad(0.5, 1.0) < 0
    assert _generator_grad(2.0, 1.0) > 0
    assert _generator_grad(0.5, 1.0, swap=True) > 0
    assert _generator_grad(2.0, 1.0, swap=True) < 0


def test_noise_levels_follow_the_truncated_rho7_schedule():
    s = sid_noise_levels(100_000, 800, torch.Generator().manual_seed(0), "cpu")
    assert float(s.min()) >= 0.002 - 1e-6 and float(s.max()) <= 24.42
    assert abs(float((s < 0.2).float().mean()) - 0.33) < 0.02  # ALGORITHMS.md 5: ~33% below 0.2


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

    def noise(self, y, generator, state):
        self.calls.append("noise")
        return super().noise(y, generator, state)


TINY = NetworkConfig(img_resolution=8, img_channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=())


def test_fake_step_sees_recorrupted_samples_and_generator_step_adds_no_noise():
    op = RecordingIdentity(build_operator({"kind": "identity", "sigma_n": 0.3}).spec)
    objective = objective_for(op)
    seen = []
    original_loss = objective.loss

    def recording_loss(net, y, state, generator=None):
        seen.append(y.detach().clone())
        return original_loss(net, y, state, generator)

    objective.loss = recording_loss
    torch.manual_seed(0)
    teacher = build_teacher(TINY, objective)
    generator = OneStepGenerator(build_teacher(TINY, objective), objective, (1, 8, 8))
    cfg = TrainConfig(steps=1, batch_size=8, precision="fp32", channels_last=False)
    phase = DistillPhase(teacher, objective, generator, build_teacher(TINY, objective), cfg, DistillConfig(), {})

    from rsd_core.training import StepContext

    ctx = StepContext(torch.Generator().manual_seed(0), torch.device("cpu"), False, False)
    gen_before = ctx.generator.get_state()
    phase._fake_step(ctx)
    assert op.calls == ["sample_state", "forward", "noise"]  # fresh state, A, fresh measurement noise
    ctx.generator.set_state(gen_before)
    with torch.no_grad():
        x_g = generator.eval().sample(8, ctx.generator)
    assert len(seen) == 1 and not torch.allclose(seen[0], x_g)  # the fake saw A(x_g) + noise, not x_g
    residual = seen[0] - x_g
    assert abs(float(residual.std()) - 0.3) < 0.05
    op.calls.clear()
    phase._generator_step(ctx)
    assert "noise" not in op.calls and "forward" in op.calls


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
    cfg = TrainConfig(steps=12, batch_size=16, checkpoint_every=4, precision="fp32", ema_halflife_nimg=100)
    dcfg = DistillConfig(lr_fake=1e-4, lr_generator=1e-4)
    straight, result = distill(teacher, objective, (1, 8, 8), cfg, dcfg, tmp_path / "a", progress=False)
    assert result.steps == 12 and result.nonfinite_skipped == 0
    assert {"loss_fake", "loss_generator"} <= set(result.metrics)

    short = cfg.model_copy(update={"steps": 8})
    distill(teacher, objective, (1, 8, 8), short, dcfg, tmp_path / "b", progress=False)
    resumed, result = distill(teacher, objective, (1, 8, 8), cfg, dcfg, tmp_path / "b", progress=False)
    assert result.steps == 12
    assert len(list_checkpoints(tmp_path / "b" / "checkpoints")) == 3
    for a, b in zip(straight.generator_ema.parameters(), resumed.generator_ema.parameters(), strict=True):
        assert torch.equal(a, b)

    student = OneStepSampler(straight.generator_ema.net, objective, (1, 8, 8))
    samples = student.sample(10, seed=1)
    assert samples.shape == (10, 1, 8, 8) and torch.isfinite(samples).all() and student.nfe == 1
    assert torch.equal(samples, student.sample(10, seed=1))
    teacher_sampler = TeacherSampler(teacher, objective, (1, 8, 8), sigma_stop=0.05)  # returns at the grid level 0.0599
    assert teacher_sampler.nfe == 29 and torch.isfinite(teacher_sampler.sample(4, seed=0)).all()
    assert Trainer  # the distillation ran through the shared loop
