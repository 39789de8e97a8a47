"""The restoration benchmark end to end at a toy budget: the result schema of issue 5, the lr drop,
phase reuse on a second run, and that ``--no-publish`` leaves the committed results alone."""

import json

import pytest
import torch

from benchmarks import distill_ab, extractors, posthoc_ema, restoration, teacher_ab
from benchmarks.report import RESULTS_DIR

ISSUE_KEYS = {"task", "teacher_fd", "teacher_sampler", "teacher_fd_full", "teacher_fd_truncated", "student_fd",
              "proximal_fid", "selection_spearman", "chosen_true_fd", "best_true_fd"}


def _published() -> dict:
    files = [restoration.DOC, RESULTS_DIR / "restoration.json", RESULTS_DIR / "distill_ab.json",
             *restoration.FIGURES.glob("restoration_*.png")]
    return {f: f.read_bytes() for f in files if f.exists()}


def test_restoration_benchmark_at_a_toy_budget(tmp_path, monkeypatch):
    before = _published()
    argv = ["--budget", "0.05", "--distill-budget", "0.2", "--distill-lr-drop-at", "0.5", "--n-eval", "64",
            "--limit", "256", "--tasks", "inpaint-0.6", "--checkpoint-every", "2", "--quiet", "--no-publish",
            "--out", str(tmp_path)]
    result = restoration.main(argv)

    assert result["budget_minutes"] == 0.05 and result["distill_budget_minutes"] == 0.2
    assert result["distill_lr_drop_at"] == 0.5 and "not Inception FID" in result["extractor"]
    assert result["proximal_extractor"] == "self-supervised"
    (row,) = result["rows"]
    assert row.keys() >= ISSUE_KEYS and row["task"] == "inpaint-0.6"
    assert row["teacher_fd"] == min(row["teacher_fd_full"], row["teacher_fd_truncated"])
    assert row["best_true_fd"] <= row["chosen_true_fd"] == row["student_fd"]
    assert "no labels, no clean images" in row["proximal_extractor"]
    assert all(row[k] > 0 for k in ("corrupt_s", "teacher_s", "distill_s", "select_s"))
    # references beside the row: the clean model (same budget, identity operator) and the clean-vs-clean floor
    refs = json.loads((tmp_path / "clean-reference" / "references.json").read_text())
    assert row["clean_fd"] == refs["clean"]["fd"] > 0 and row["floor_fd"] == refs["floor"]["fd"] > 0
    assert row["student_over_clean"] == row["student_fd"] / row["clean_fd"] and row["clean_kid_std"] > 0
    clean_data = json.loads((tmp_path / "clean-reference" / "data" / "manifest.json").read_text())
    assert clean_data["operator"] == {"kind": "identity", "sigma_n": 0.0}
    assert not (tmp_path / "clean-reference" / "generator").exists()  # a teacher only
    checkpoints = sorted((tmp_path / "inpaint-0.6" / "distill" / "checkpoints").iterdir())
    scales = [json.loads((c / "meta.json").read_text())["lr_scale"] for c in checkpoints]
    # dropped once, half way through the time budget: never raised again, 0.25 at the end (under load the
    # first checkpoint can land after the drop, so 1.0 need not be seen)
    assert scales == sorted(scales, reverse=True) and set(scales) <= {1.0, 0.25} and scales[-1] == 0.25, scales
    assert json.loads((tmp_path / "restoration.json").read_text()) == json.loads(json.dumps(result))

    again = restoration.main(argv)  # every phase is reused: same figures, same recorded wall times
    assert again["rows"] == result["rows"]
    assert _published() == before

    # --replace-rows: this call's rows in place of the same tasks' published rows; the others and the references
    # stay; refused before any training where the published table was made otherwise
    results = tmp_path / "published"
    results.mkdir()
    other = {**result["rows"][0], "task": "blur-noise-0.2", "student_fd": 1.0}
    (results / "restoration.json").write_text(json.dumps({**result, "rows": [other, result["rows"][0]]}))
    monkeypatch.setattr(restoration, "RESULTS_DIR", results)
    merged = restoration.main([*argv, "--replace-rows"])
    assert [r["task"] for r in merged["rows"]] == ["blur-noise-0.2", "inpaint-0.6"]
    assert merged["rows"][0]["student_fd"] == 1.0 and "rerun" not in merged["rows"][0]
    assert merged["rows"][1]["rerun"]["command"].endswith("--replace-rows")
    assert merged["rows"][1]["student_fd"] == result["rows"][0]["student_fd"]
    assert merged["references"] == result["references"] and merged["command"] == result["command"]
    with monkeypatch.context() as patched:
        patched.setattr(restoration, "DOC", tmp_path / "results.md")
        restoration.write_doc(merged, merged["command"])
        rerun = merged["rows"][1]["rerun"]
        assert f"Rows inpaint-0.6 rerun {rerun['date']} (the others and the references as above): " \
               f"`{rerun['command']}`" in restoration.DOC.read_text()
    monkeypatch.setattr(restoration, "run_task", lambda *a: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit, match="n_eval 64, this call 32: pass --n-eval 64"):
        restoration.main([*argv[:-2], "--out", str(tmp_path / "other"), "--replace-rows", "--n-eval", "32"])
    with pytest.raises(SystemExit, match=r"no rows for \['superres-x2'\]"):
        restoration.main([*argv, "--replace-rows", "--tasks", "superres-x2"])
    assert _published() == before

    # every extractor scores the same candidates of that work folder: the checkpoints, then the teacher's levels
    scored = extractors.main(["--work", str(tmp_path), "--tasks", "inpaint-0.6,blur-noise-0.2", "--extractors",
                              "self-supervised,classifier", "--n-eval", "64", "--n-teacher", "16", "--no-publish"])
    (task,) = scored["tasks"]
    assert scored["pending"] == ["blur-noise-0.2"] and task["task"] == "inpaint-0.6"
    assert [r["candidate"] for r in task["rows"]] == [c.name for c in checkpoints] + [
        f"teacher@{level}" for level in (0.58, 0.29, 0.13, 0.05, 0.02, 0.0)]
    ssl = task["by_extractor"]["self-supervised"]
    assert ssl["checkpoint"]["best_true_fd"] <= ssl["checkpoint"]["chosen_true_fd"]
    assert -1 <= ssl["spearman_all"] <= 1 and task["features"]["self-supervised"]["id"].startswith("ssl-")
    assert scored["summary"]["classifier"]["checkpoint"]["tasks"] == 1
    assert _published() == before

    # the distillation A/B distils that teacher once per variant at equal steps, and scores each
    ab = distill_ab.main(["--models", str(tmp_path), "--tasks", "inpaint-0.6", "--variants",
                          "observed,further,lr:distill.lr_generator=1e-4", "--steps", "2", "--n-eval", "64",
                          "--out", str(tmp_path / "ab"), "--quiet", "--no-publish"])
    assert [(r["variant"], r["fake_loss_mask"], r["steps"], r["seed"]) for r in ab["rows"]] == [
        ("observed", "observed", 2, 0), ("further", "further", 2, 0), ("lr", None, 2, 0)]
    generator_lr = json.loads((tmp_path / "ab" / "inpaint-0.6" / "lr" / "seed-0" / "timing.json").read_text())
    assert generator_lr["distill"]["lr_generator"] == 1e-4 and ab["rows"][2]["changes"] == {
        "distill": {"lr_generator": 1e-4}}
    assert [(s["variant"], s["over_base"]) for s in ab["summary"]][0] == ("observed", 1.0)
    assert all(r["true_fd"] > 0 for r in ab["rows"]) and len(ab["rows"][0]["true_fd_other_samples"]) == 1
    assert "evaluation only" in ab["extractor"] and (tmp_path / "ab" / "distill_ab.json").exists()
    assert _published() == before


def test_rewriting_results_md_keeps_the_analysis_below_the_marker(tmp_path, monkeypatch):
    doc = tmp_path / "results.md"
    monkeypatch.setattr(restoration, "DOC", doc)
    result = json.loads((RESULTS_DIR / "restoration.json").read_text())
    restoration.write_doc(result, "cmd one")
    first = doc.read_text()
    assert "cmd one" in first and first.rstrip().endswith(restoration.KEEP_BELOW)
    doc.write_text(first + "\n## Notes by hand\n\nkept.\n")
    restoration.write_doc(result, "cmd two")
    second = doc.read_text()
    assert "cmd two" in second and "cmd one" not in second
    assert second.endswith(restoration.KEEP_BELOW + "\n\n## Notes by hand\n\nkept.\n")


def test_extractor_benchmark_names_ssl_recipe_variants():
    recipe_variant = extractors.recipe_variant
    assert recipe_variant("self-supervised") is None
    variant = recipe_variant("self-supervised@erase=0.5;seed=1")
    assert (variant.erase, variant.seed, variant.shift) == (0.5, 1, 3)  # the other fields: the default's
    with pytest.raises(ValueError, match="no numeric field 'noise'"):
        recipe_variant("self-supervised@noise=0.4")
    with pytest.raises(ValueError, match="no numeric field 'channels'"):
        recipe_variant("self-supervised@channels=8")
    with pytest.raises(ValueError, match="'' is not a value for SSLRecipe.erase"):
        recipe_variant("self-supervised@erase")
    with pytest.raises(ValueError, match="only 'self-supervised'"):
        recipe_variant("classifier@seed=1")


def test_teacher_ab_trains_each_variant_for_the_budget_and_scores_it(tmp_path):
    before = _published()
    result = teacher_ab.main(["--task", "inpaint-0.8", "--minutes", "0.05", "--limit", "256", "--n-eval", "48",
                              "--variants", "base,small:network.channel_mult=[1, 2, 2];train.batch_size=16",
                              "--quiet", "--no-publish", "--out", str(tmp_path)])
    base, small = result["rows"]
    assert small["changes"] == {"train": {"batch_size": 16}, "network": {"channel_mult": [1, 2, 2]}}
    card = json.loads((tmp_path / "inpaint-0.8" / "small" / "teacher" / "model.json").read_text())
    assert card["network"]["channel_mult"] == [1, 2, 2]
    for row in (base, small):
        assert row["fd"] == min(row["fd_full"], row["fd_truncated"]) and row["kid_std"] > 0
        assert row["images_per_s"] > 0 and row["teacher_s"] >= 0.05 * 60
    assert _published() == before
    with pytest.raises(SystemExit, match="variant bad"):
        teacher_ab.main(["--variants", "bad:train.batch_size=0", "--limit", "256", "--n-eval", "48", "--no-publish",
                         "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="variant bad.*delta"):
        teacher_ab.main(["--variants", "bad:operator.delta=1.5", "--limit", "256", "--n-eval", "48", "--no-publish",
                         "--out", str(tmp_path)])


def test_a_teacher_ab_operator_variant_trains_on_its_own_corruption_of_the_same_images(tmp_path):
    """An ``operator.`` change must reach the teacher (its card's operator), while the observations stay the
    base's (the same seed), so the arms differ in the operator alone."""
    from rsd_core.data.reader import open_dataset

    result = teacher_ab.main(["--task", "inpaint-0.8", "--minutes", "0.02", "--limit", "64", "--n-eval", "32",
                              "--variants", "base,d3:operator.delta=0.3", "--quiet", "--no-publish",
                              "--out", str(tmp_path)])
    root = tmp_path / "inpaint-0.8"
    assert result["rows"][1]["changes"]["operator"] == {"delta": 0.3}
    card = json.loads((root / "d3" / "teacher" / "model.json").read_text())
    assert card["operator"]["delta"] == 0.3
    base_card = json.loads((root / "base" / "teacher" / "model.json").read_text())
    assert base_card["operator"]["delta"] == 0.1
    base_obs, base_state, _ = open_dataset(str(root / "data")).read_all()
    obs, state, _ = open_dataset(str(root / "d3" / "data")).read_all()
    assert torch.equal(obs, base_obs) and torch.equal(state["mask"], base_state["mask"])
    # only the base dataset carries the clean evaluation split the scores use
    assert json.loads((root / "data" / "manifest.json").read_text()).get("clean_eval_uri")
    assert not json.loads((root / "d3" / "data" / "manifest.json").read_text()).get("clean_eval_uri")


def test_posthoc_ema_benchmark_scores_each_reconstructed_length(tmp_path):
    """Each length is a model of its own, made from the run's snapshots (not the ordinary EMA copied), scored, and
    the choice is the lowest Proximal FD, for the teacher and for the generator distilled from it; nothing
    published moves."""
    from safetensors.torch import load_file

    before = _published()
    # 24 s: the first step alone takes seconds (the data readers start), and one step makes every average the same
    result = posthoc_ema.main(["--task", "inpaint-0.8", "--minutes", "0.4", "--limit", "64", "--n-eval", "32",
                               "--sigma-rels", "0.05,0.2", "--snapshot-every", "2", "--distill-minutes", "0.3",
                               "--quiet", "--no-publish", "--out", str(tmp_path)])
    run = tmp_path / "inpaint-0.8" / "run"
    assert "no labels, no clean images" in result["proximal_extractor"]
    for kind, part, proximal in (("teacher", result, "proximal_fd_truncated"),
                                 ("generator", result["distill"], "proximal_fd")):
        folders = ["posthoc-0.05", "posthoc-0.2"] if kind == "teacher" else ["generator-posthoc-0.05",
                                                                           "generator-posthoc-0.2"]
        assert part["steps"] >= 4, f"{kind}: too few steps for the averages to differ"
        assert [r["candidate"] for r in part["rows"]] == ["ema", "post-hoc 0.05", "post-hoc 0.2"]
        chosen = min(part["rows"][1:], key=lambda r: r[proximal])
        assert part["chosen"] == chosen["candidate"] and part["chosen_fd"] == chosen["fd"]
        card = json.loads((run / folders[0] / "model.json").read_text())
        assert card["kind"] == kind
        assert card["metrics"]["posthoc_sigma_rel"] == 0.05 and card["metrics"]["posthoc_step"] == part["steps"]
        weights = [load_file(str(run / name / "model.safetensors")) for name in (kind, *folders)]
        key = max(weights[0], key=lambda k: weights[0][k].numel())
        assert not torch.equal(weights[0][key], weights[1][key]) and not torch.equal(weights[1][key], weights[2][key])
    assert _published() == before


def test_the_data_teams_down_sampling_made_in_numpy_is_the_superres_operator():
    """The selection-domains benchmark simulates a data team outside the project; what it imports must be
    exactly what the operator it declares would have measured, or selection is scored on a wrong model."""
    import numpy as np
    import torch

    from benchmarks.selection_domains import downsample_outside, skimage_patches
    from rsd_core.kinds import build_operator
    from rsd_core.operators import SuperResSpec

    patches = skimage_patches(6, seed=0)
    assert patches.shape == (6, 1, 32, 32) and patches.min() >= -1 and patches.max() <= 1 and patches.std() > 0.05
    operator = build_operator(SuperResSpec(factor=2))
    expected = operator.forward(torch.from_numpy(patches), {}).numpy()
    np.testing.assert_allclose(downsample_outside(patches, 2), expected, atol=1e-6)


def test_the_floor_compares_as_many_clean_images_as_the_rows_score(tmp_path):
    """With ~100 samples FD is mostly bias: a floor at another count than the rows' would not be their floor."""
    from benchmarks.scoring import floor_distances
    from rsd_core.data.sources import corrupt
    from rsd_core.operators import IdentitySpec

    corrupt("fashion-mnist", IdentitySpec(), seed=0, out_uri=str(tmp_path / "data"), limit=64, clean_eval_count=48)
    floor = floor_distances(str(tmp_path / "data"), "fashion-mnist", "test", 0, tmp_path, n=16)
    assert floor["n"] == 16 and floor["against"] == "fashion-mnist test split, first 16 images"
    every = floor_distances(str(tmp_path / "data"), "fashion-mnist", "test", 0, tmp_path)
    assert every["n"] == 48 and every["fd"] != floor["fd"]
