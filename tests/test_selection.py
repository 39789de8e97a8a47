"""Proximal FID and checkpoint selection on real (small) Fashion-MNIST data."""

import json

import pytest
import torch

from rsd_core.config import DistillConfig, DistillTrainConfig, NetworkConfig, TrainConfig
from rsd_core.data.sources import corrupt, fashion_mnist
from rsd_core.kinds import build_operator
from rsd_core.select.classifier import ClassifierExtractor
from rsd_core.select.frechet import compute_stats, frechet_distance
from rsd_core.select.selection import (
    CandidateScore,
    _report_choice,
    choose_checkpoint,
    corrupted_view,
    make_extractors,
    proximal_reference,
    quantise,
    select_stage,
)
from rsd_core.stages import distill_stage, pretrain_stage, sampler_for
from rsd_core.train.sampling import truncation_nfe


def test_quantise_maps_to_the_uint8_grid():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.3, 1.0, 2.0])
    q = quantise(x)
    assert q.min() == -1 and q.max() == 1
    assert torch.allclose((q + 1) * 127.5, ((q + 1) * 127.5).round(), atol=1e-4)


def test_truncation_nfe_matches_the_grid():
    assert truncation_nfe(0.0) == 35 and truncation_nfe(0.05) == 29 and truncation_nfe(0.58) == 23


def test_proximal_fd_prefers_clean_looking_images_without_seeing_clean_data(tmp_path):
    """Pushed through the operator, held-out clean images score far better than blurred or noise images."""
    spec = {"kind": "inpaint", "p": 0.6}
    corrupt(fashion_mnist("train"), spec, seed=0, out_uri=str(tmp_path / "data"), limit=600)
    extractor = ClassifierExtractor()
    ref = proximal_reference(str(tmp_path / "data"), extractor, 600)
    clean, _ = fashion_mnist("test").load(0, 600)
    blurred = build_operator({"kind": "blur", "kernel_size": 9, "std": 2.0}).forward(clean, {})
    noise = torch.rand_like(clean) * 2 - 1
    op = build_operator(spec)

    def score(images):
        view = corrupted_view(images, op, torch.Generator().manual_seed(1))
        return frechet_distance(compute_stats(extractor, view), ref)

    s_clean, s_blur, s_noise = score(clean), score(blurred), score(noise)
    assert s_clean < s_blur < s_noise, (s_clean, s_blur, s_noise)


def test_corruption_trained_extractor_reads_erased_images_and_ranks_severity(tmp_path):
    """Trained on the operator's views, the classifier recognises 60%-erased test images far better than the
    clean one does, is cached under its own key, and its Proximal FD ranks clean < blurred < noise."""
    spec = {"kind": "inpaint", "p": 0.6, "delta": 0.1}  # the benchmark's task: one training per test session
    op = build_operator(spec)
    prox_ext, true_ext = make_extractors("classifier-corrupted", op)
    assert prox_ext.id != true_ext.id and true_ext.label == ClassifierExtractor.label
    assert "inpaint views" in prox_ext.label and "not Inception" in prox_ext.label
    assert prox_ext.recipe.corruption == op.spec.model_dump_json() and prox_ext.recipe.epochs == 2

    clean, labels = fashion_mnist("test").load(0, 2000)
    erased = corrupted_view(clean, op, torch.Generator().manual_seed(5))
    with torch.no_grad():
        acc = [float((ext._net(erased).argmax(1) == labels).float().mean()) for ext in (prox_ext, true_ext)]
    assert acc[0] > 0.8 and acc[0] > acc[1] + 0.1, acc
    assert prox_ext.info["test_accuracy_corrupted"] > 0.8

    corrupt(fashion_mnist("train"), spec, seed=0, out_uri=str(tmp_path / "data"), limit=600)
    ref = proximal_reference(str(tmp_path / "data"), prox_ext, 600)
    blurred = build_operator({"kind": "blur", "kernel_size": 9, "std": 2.0}).forward(clean[:600], {})
    noise = torch.rand_like(clean[:600]) * 2 - 1
    fds = [frechet_distance(compute_stats(prox_ext, corrupted_view(x, op, torch.Generator().manual_seed(1))), ref)
           for x in (clean[:600], blurred, noise)]
    assert fds == sorted(fds), fds


def test_corruption_trained_extractor_refuses_mri_before_training():
    with pytest.raises(ValueError, match="classifier-corrupted.*operator kind 'mri' needs 2-channel images"):
        make_extractors("classifier-corrupted", build_operator({"kind": "mri", "R": 4, "n_coils": 4}))


def test_select_stage_scores_checkpoints_and_teacher_levels(tmp_path):
    data = tmp_path / "data"
    corrupt(fashion_mnist("train"), {"kind": "inpaint", "p": 0.6}, seed=0, out_uri=str(data), limit=256,
            clean_eval_count=128)
    net = NetworkConfig(model_channels=8, channel_mult=(1, 2), attn_resolutions=())
    teacher_dir, _ = pretrain_stage(str(data), net, TrainConfig(steps=20, batch_size=16, checkpoint_every=20,
                                                                precision="fp32"), tmp_path / "run", progress=False)
    distill_stage(teacher_dir, DistillTrainConfig(steps=6, batch_size=8, checkpoint_every=2, precision="fp32"),
                  DistillConfig(), tmp_path / "run", progress=False)
    result = select_stage(str(data), teacher_dir, tmp_path / "run", tmp_path / "sel", n_samples=128, progress=False,
                          n_teacher=64)
    assert [r.step for r in result.rows] == [2, 4, 6]
    assert result.chosen_checkpoint.endswith(choose_checkpoint(result.rows).name)
    assert result.lowest_checkpoint == min(result.rows, key=lambda r: r.proximal_fd).name
    assert result.chosen_true_fd is not None and result.best_true_fd <= result.chosen_true_fd
    assert result.spearman is not None and -1 <= result.spearman <= 1
    assert {r.nfe for r in result.teacher_rows} == {23, 25, 27, 29, 31, 35}
    lo, hi = result.proximal_fd_interval
    assert lo < result.proximal_fd < hi
    runner_up = sorted((r for r in result.rows if not result.chosen_checkpoint.endswith(r.name)),
                       key=lambda r: r.proximal_fd)[0]
    assert result.runner_up_checkpoint == runner_up.name
    d_lo, d_hi = result.runner_up_difference
    assert d_lo <= result.proximal_fd - runner_up.proximal_fd <= d_hi and result.distinguishable == (d_hi < 0)
    saved = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert saved["chosen_checkpoint"] == result.chosen_checkpoint
    # the default features are learnt from the corrupted data alone, and the report names both feature sets
    assert saved["proximal_extractor"] == "self-supervised" and saved["proximal_extractor_id"].startswith("ssl-")
    assert "no labels, no clean images" in saved["proximal_extractor_label"]
    assert saved["extractor_label"] == ClassifierExtractor.label  # the true FD: evaluation only
    samples = sampler_for(result.generator_dir).sample(4, seed=0)
    assert samples.shape == (4, 1, 32, 32) and torch.isfinite(samples).all()


def _row(step: int, fd: float, half_width: float | None) -> CandidateScore:
    interval = None if half_width is None else (fd - half_width, fd + half_width)
    return CandidateScore(name=f"step-{step:07d}", step=step, proximal_fd=fd, proximal_fd_interval=interval)


def test_the_latest_checkpoint_tied_with_the_lowest_is_chosen_and_a_real_lead_is_kept():
    # 100 +- 10 is the lowest; 108 +- 10 overlaps it and was trained longer: chosen. 150 +- 10 is worse.
    assert choose_checkpoint([_row(20, 100, 10), _row(40, 108, 10), _row(60, 150, 10)]).step == 40
    # an earlier checkpoint lower beyond the noise keeps its lead
    assert choose_checkpoint([_row(20, 100, 5), _row(40, 130, 5), _row(60, 150, 5)]).step == 20
    # without intervals (older records): the lowest
    assert choose_checkpoint([_row(20, 100, None), _row(40, 101, None)]).step == 20


@pytest.mark.parametrize(("difference", "verdict"), [((-9.0, -1.0), "better"), ((-3.0, 4.0), "cannot tell them apart"),
                                                     ((8.3, 30.4), "worse, kept by the rule")])
def test_the_printed_choice_says_when_the_paired_difference_puts_it_behind(capsys, difference, verdict):
    # the rule can keep a later checkpoint whose own interval overlaps the lowest one's while the paired
    # difference (chosen - runner-up, shared latents) lies wholly above 0: the line must not call them alike
    chosen, runner_up = _row(223, 289.9, 20), _row(180, 270.6, 20)
    _report_choice(chosen, runner_up, {"proximal_fd_interval": chosen.proximal_fd_interval,
                                       "runner_up_difference": difference, "distinguishable": difference[1] < 0})
    line = capsys.readouterr().out
    assert f"[{difference[0]:.2f}, {difference[1]:.2f}], {verdict}" in line
