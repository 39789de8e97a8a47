"""The shared training loop on a tiny teacher: learning, exact resume, the non-finite guard."""

import pytest
import torch

from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.kinds import build_operator, objective_for
from rsd_core.train.loop import Trainer, TrainingDivergedError, list_checkpoints
from rsd_core.train.pretrain import TensorSource, build_teacher, pretrain_teacher
from tests.faults import NaNBatches

TINY = NetworkConfig(img_resolution=8, img_channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,))


def _setup(digits8, seed=0):
    op = build_operator({"kind": "inpaint", "p": 0.5})
    gen = torch.Generator().manual_seed(seed)
    state = op.sample_state(len(digits8), (1, 8, 8), gen)
    y = op.observe(digits8, state, gen)
    objective = objective_for(op)
    torch.manual_seed(seed)
    return build_teacher(TINY, objective), objective, TensorSource(y, state)


def _cfg(**kw):
    base = dict(steps=60, batch_size=32, lr=2e-3, lr_rampup_steps=10, checkpoint_every=20, precision="fp32",
                ema_halflife_nimg=500)
    return TrainConfig(**{**base, **kw})


def _eval_loss(net, objective, source):
    """Median per-sample loss on a fixed batch with fixed noise (robust to the heavy small-sigma tail)."""
    gen = torch.Generator().manual_seed(123)
    y, state = source.next_batch(512, gen)
    with torch.no_grad():
        return float(objective.loss(net, y, state, gen).median())


def test_teacher_loss_decreases(digits8, tmp_path):
    net, objective, source = _setup(digits8)
    before = _eval_loss(net, objective, source)
    losses = []
    phase, result = pretrain_teacher(net, objective, source, _cfg(steps=300, checkpoint_every=300), tmp_path,
                                     callback=lambda step, m: losses.append(m["loss"]), progress=False)
    assert result.steps == 300 and len(losses) == 300
    after = _eval_loss(phase.ema, objective, source)
    assert after < 0.6 * before, (before, after)
    assert all(torch.isfinite(p).all() for p in phase.ema.parameters())


def test_resume_reproduces_an_uninterrupted_run(digits8, tmp_path):
    net, objective, source = _setup(digits8)
    straight, _ = pretrain_teacher(net, objective, source, _cfg(), tmp_path / "a", progress=False)

    net, objective, source = _setup(digits8)
    pretrain_teacher(net, objective, source, _cfg(steps=40), tmp_path / "b", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-0000020", "step-0000040"]
    net, objective, source = _setup(digits8, seed=0)
    resumed, result = pretrain_teacher(net, objective, source, _cfg(), tmp_path / "b", progress=False)
    assert result.steps == 60
    for a, b in zip(straight.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nonfinite_steps_are_skipped_and_counted(digits8, tmp_path):
    net, objective, source = _setup(digits8)
    phase, result = pretrain_teacher(net, objective, NaNBatches(source, 10, count=3), _cfg(steps=30), tmp_path,
                                     progress=False)
    assert result.nonfinite_skipped == 3 and result.steps == 30
    assert all(torch.isfinite(p).all() for p in phase.net.parameters())


def test_persistent_nonfinite_stops_with_a_clear_error_and_keeps_the_checkpoint(digits8, tmp_path):
    net, objective, source = _setup(digits8)
    with pytest.raises(TrainingDivergedError, match="non-finite steps in a row") as err:
        pretrain_teacher(net, objective, NaNBatches(source, 25), _cfg(max_nonfinite_in_row=5), tmp_path,
                         progress=False)
    assert "step-0000020" in str(err.value)
    (ckpt,) = list_checkpoints(tmp_path / "checkpoints")
    net2, objective, source = _setup(digits8)
    resumed, result = pretrain_teacher(net2, objective, source, _cfg(steps=20), tmp_path, progress=False)
    assert result.steps == 20 and all(torch.isfinite(p).all() for p in resumed.net.parameters())


class _Interrupt(Exception):
    pass


def _interrupt_at(step_to_stop: int):
    def callback(step: int, metrics: dict) -> None:
        if step == step_to_stop:
            raise _Interrupt

    return callback


def test_lr_drop_applies_once_late_in_the_run_and_survives_a_resume(digits8, tmp_path):
    cfg = _cfg(lr_drop_at=0.5, lr_drop_factor=0.25)
    scales = {}
    net, objective, source = _setup(digits8)
    straight, _ = pretrain_teacher(net, objective, source, cfg, tmp_path / "a", progress=False,
                                   callback=lambda step, m: scales.__setitem__(step, m["lr_scale"]))
    assert all(scales[s] == 1.0 for s in range(1, 31)) and all(scales[s] == 0.25 for s in range(31, 61))
    (opt,) = straight.optimizers.values()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.25)

    # Interrupted after the drop (checkpoint at 40, stopped at 45): the resumed run keeps the dropped lr.
    net, objective, source = _setup(digits8)
    with pytest.raises(_Interrupt):
        pretrain_teacher(net, objective, source, cfg, tmp_path / "b", progress=False, callback=_interrupt_at(45))
    net, objective, source = _setup(digits8)
    resumed, result = pretrain_teacher(net, objective, source, cfg, tmp_path / "b", progress=False)
    assert result.steps == 60
    for a, b in zip(straight.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_drop_progress_counts_the_time_budget_when_it_ends_the_run_first(digits8):
    net, objective, source = _setup(digits8)
    phase, _ = pretrain_teacher(net, objective, source, _cfg(steps=1), None, progress=False)
    trainer = Trainer(phase, _cfg(steps=1000, time_budget_s=60.0, lr_drop_at=0.5), progress=False)
    assert trainer._progress(100, 30.0) == pytest.approx(0.5)  # half the budget, a tenth of the steps
    assert trainer._progress(900, 6.0) == pytest.approx(0.9)  # the steps run out first


@pytest.mark.parametrize("field, value", [("lr_drop_at", 1.0), ("lr_drop_at", 0.0), ("lr_drop_factor", 1.0),
                                          ("lr_drop_factor", 0.0)])
def test_lr_drop_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
