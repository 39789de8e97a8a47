"""Power-function EMA and its post-hoc reconstruction (EDM2) against closed forms, and through the training loop."""

import numpy as np
import pytest
import torch
from torch import nn

from rsd_core.config import TrainConfig
from rsd_core.train.ema import ema_update
from rsd_core.train.loop import list_checkpoints
from rsd_core.train.posthoc_ema import (
    SNAPSHOT_DIR,
    gamma_of_sigma_rel,
    list_snapshots,
    posthoc_weights,
    power_ema_beta,
    power_ema_name,
    reconstruct_ema,
    sigma_rel_of_gamma,
)
from tests.test_training import _cfg, _setup


def test_gamma_and_sigma_rel_match_edm2_and_invert_each_other():
    # EDM2 (Sec. 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.07, 0.2, 0.28):
        assert sigma_rel_of_gamma(gamma_of_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        gamma_of_sigma_rel(0.3)


def _scalar_power_ema(trajectory: np.ndarray, gamma: float) -> list[float]:
    """The loop's update on a one-parameter 'network' whose weight follows ``trajectory``; the average after
    every step."""
    net, ema = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    out = []
    for t, value in enumerate(trajectory, start=1):
        net.weight.data.fill_(float(value))
        ema_update(ema, net, power_ema_beta(t, gamma))
        out.append(float(ema.weight.detach().double()))
    return out


def test_the_update_is_the_power_profile_integrated_over_each_step():
    """After T steps the update has averaged theta_k with the weight of tau^gamma's profile on [k - 1, k]:
    (k^(g+1) - (k-1)^(g+1)) / T^(g+1), exactly."""
    T, gamma = 300, 6.94
    k = np.arange(1, T + 1, dtype=np.float64)
    theta = np.cos(k / 40.0) + k / 100.0
    weights = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / T ** (gamma + 1)
    assert _scalar_power_ema(theta, gamma)[-1] == pytest.approx(float(weights @ theta), rel=1e-5)


def test_a_stored_profile_is_reconstructed_by_itself():
    t, g = [100.0, 200.0, 200.0], [16.97, 16.97, 6.94]
    for i in range(3):
        np.testing.assert_allclose(posthoc_weights(t, g, t[i], g[i]), np.eye(3)[i], atol=1e-6)


def test_reconstruction_from_two_lengths_matches_a_third_run_directly():
    """Snapshots of sigma_rel 0.05 and 0.10 every 100 steps reconstruct sigma_rel 0.07 and 0.15 at the end to a
    small fraction of the gap between the two stored averages (the trajectory: a drift with an oscillation)."""
    T, every = 2000, 100
    k = np.arange(1, T + 1, dtype=np.float64)
    theta = np.cos(k / 250.0) + k / 1000.0
    stored = {s: _scalar_power_ema(theta, gamma_of_sigma_rel(s)) for s in (0.05, 0.10)}
    steps = list(range(every, T + 1, every))
    snap_t = [t for t in steps for _ in stored]
    snap_g = [gamma_of_sigma_rel(s) for _ in steps for s in stored]
    snap_v = np.array([stored[s][t - 1] for t in steps for s in stored])
    gap = abs(stored[0.05][-1] - stored[0.10][-1])
    for target in (0.07, 0.15):
        direct = _scalar_power_ema(theta, gamma_of_sigma_rel(target))[-1]
        rebuilt = float(posthoc_weights(snap_t, snap_g, T, gamma_of_sigma_rel(target)) @ snap_v)
        assert abs(rebuilt - direct) < 0.02 * gap, (target, rebuilt, direct, gap)


def test_training_saves_power_emas_that_resume_exactly_and_reconstruct(digits8, tmp_path):
    """The loop's power EMAs survive a resume to the bit, every snapshot is kept whatever the checkpoints kept,
    and a length between the stored ones comes out close to the power EMA trained with that length directly
    (training does not depend on its EMAs, so the three runs share one trajectory)."""
    from rsd_core.train.pretrain import pretrain_teacher

    cfg = _cfg(power_ema_sigma_rels=[0.05, 0.10], checkpoint_every=5, keep_checkpoints=1)
    net, objective, source = _setup(digits8)
    straight, _ = pretrain_teacher(net, objective, source, cfg, tmp_path / "a", progress=False)
    net, objective, source = _setup(digits8)
    pretrain_teacher(net, objective, source, cfg.updated(steps=40), tmp_path / "b", progress=False)
    net, objective, source = _setup(digits8)
    resumed, _ = pretrain_teacher(net, objective, source, cfg, tmp_path / "b", progress=False)
    name = power_ema_name("ema", 0.05)
    for a, b in zip(straight.modules[name].parameters(), resumed.modules[name].parameters(), strict=True):
        assert torch.equal(a, b)

    assert [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")] == ["step-0000060"]
    snapshots = list_snapshots(tmp_path / "a" / SNAPSHOT_DIR)
    assert [p.name for p in snapshots] == [f"step-{s:07d}.safetensors" for s in range(5, 61, 5)]
    # a stored length at the last step comes back as itself
    state, made_from = reconstruct_ema(snapshots, "ema", 0.05)
    assert made_from["step"] == 60 and len(made_from["snapshots"]) == 24
    for key, value in straight.modules[name].state_dict().items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-4)
    # another length: against the run that kept it
    net, objective, source = _setup(digits8)
    direct, _ = pretrain_teacher(net, objective, source, cfg.updated(power_ema_sigma_rels=[0.07]), tmp_path / "c",
                                 progress=False)
    rebuilt, _ = reconstruct_ema(snapshots, "ema", 0.07)
    target = dict(direct.modules[power_ema_name("ema", 0.07)].named_parameters())
    stored = dict(straight.modules[name].named_parameters())
    for key in (k for k in target if target[k].numel() > 100):
        error, gap = (rebuilt[key] - target[key]).norm(), (stored[key] - target[key]).norm()
        assert error < 0.2 * gap, (key, float(error), float(gap))
    # at an earlier step only the snapshots up to it count
    _, early = reconstruct_ema(snapshots, "ema", 0.07, at_step=40)
    assert early["step"] == 40 and max(s["step"] for s in early["snapshots"]) == 40


def test_reconstruction_without_power_emas_says_how_to_get_them(tmp_path):
    with pytest.raises(ValueError, match="power_ema_sigma_rels"):
        reconstruct_ema(list_snapshots(tmp_path), "ema", 0.07)


@pytest.mark.parametrize("value", [[0.0], [0.3], [0.05, 0.05]])
def test_power_ema_lengths_are_validated(value):
    with pytest.raises(ValueError, match="power_ema_sigma_rels"):
        TrainConfig(power_ema_sigma_rels=value)
