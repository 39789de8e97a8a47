"""The long run at a toy budget: points scored with FD and KID, a second call resuming from the checkpoints
of the first instead of starting over, and the wall clock that survives a kill."""

import io
import json
import tarfile

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import long_run
from rsd_core.kinds import build_operator
from rsd_core.stages import DISTILL_DIR, PRETRAIN_DIR


def _run(tmp_path, teacher: str, distill: str, variant: str = "corrupted") -> dict:
    return long_run.main(["--task", "inpaint-0.8", "--variant", variant, "--teacher-minutes", teacher,
                          "--distill-minutes", distill, "--limit", "256", "--n-eval", "48", "--quiet",
                          "--no-publish", "--out", str(tmp_path)])


def test_long_run_scores_points_and_resumes(tmp_path, monkeypatch):
    # --no-publish writes nothing where publishing would: watched on stand-ins for the repository's folders, so a
    # benchmark publishing beside the test cannot fail it
    published = tmp_path / "published"
    for name, sub in (("RESULTS", "results"), ("FIGURES", "figures"), ("DOC", "results.md")):
        monkeypatch.setattr(long_run, name, published / sub)
    (published / "results").mkdir(parents=True)
    (published / "figures").mkdir()
    first = _run(tmp_path, "0.05", "")
    root = tmp_path / "inpaint-0.8" / "corrupted"
    steps_first = json.loads((root / "points.json").read_text())["teacher@0.05"]["steps"]

    # a second call with more points continues the same teacher (its steps grow past the first point's) and
    # distils from the last teacher point
    result = _run(tmp_path, "0.05,0.15", "0.05")
    task = result["tasks"]["inpaint-0.8"]
    rows = {r["minutes"]: r for r in task["rows"]}
    assert rows[0.05]["teacher_steps"] == steps_first == first["tasks"]["inpaint-0.8"]["rows"][0]["teacher_steps"]
    assert rows[0.15]["teacher_steps"] > steps_first
    # the student is distilled from the last teacher point, and compared with it
    assert rows[0.05]["student_over_teacher"] == rows[0.05]["student_fd"] / rows[0.15]["teacher_fd"]
    assert task["distilled_from_teacher_minutes"] == 0.15
    for prefix in ("teacher", "student"):
        assert rows[0.05][f"{prefix}_kid_std"] > 0
    clock = json.loads((root / PRETRAIN_DIR / "clock.json").read_text())
    seconds = [clock[k] for k in sorted(clock, key=int)]
    assert seconds == sorted(seconds) and seconds[-1] >= 0.15 * 60
    assert task["floor_fd"] > 0 and task["n_eval"] == 48 and "evaluation only" in task["extractor"]
    assert (root / "grids" / "student@0.05.png").exists()

    # the clean reference scores into the same rows
    clean = _run(tmp_path, "0.05", "", variant="clean")["tasks"]["inpaint-0.8"]["rows"]
    assert clean[0]["clean_fd"] > 0 and "student_over_clean" in clean[0]
    assert json.loads((tmp_path / "long_run.json").read_text())["tasks"]["inpaint-0.8"]["rows"] == clean
    assembled = long_run.main(["--assemble-only", "--no-publish", "--out", str(tmp_path)])
    assert assembled["tasks"]["inpaint-0.8"]["rows"] == clean
    # where the first minutes have no teacher point of the first variant, the device comes from a later one
    (root / "points" / "teacher-0.05min" / "trained_s.json").unlink()
    again = long_run.main(["--assemble-only", "--no-publish", "--out", str(tmp_path)])
    device = assembled["tasks"]["inpaint-0.8"]["trained_on"]
    assert again["tasks"]["inpaint-0.8"]["trained_on"] == device != "unrecorded"
    assert sorted(p.name for p in published.rglob("*")) == ["figures", "results"]


def _checkpoint(phase, step: int) -> None:
    folder = phase / "checkpoints" / f"step-{step:07d}"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{}")


def test_wall_clock_resumes_from_the_last_checkpoints_seconds(tmp_path):
    phase = tmp_path / "pretrain"
    _checkpoint(phase, 100)
    (phase / "clock.json").write_text(json.dumps({"100": 50.0}))
    clock = long_run.WallClock(phase)
    assert clock.seconds() == 50.0
    clock.start()
    _checkpoint(phase, 200)
    clock(phase / "checkpoints")
    assert json.loads((phase / "clock.json").read_text())["200"] >= 50.0
    # a kill after checkpoint 200 but before its clock entry: the latest recorded time stands in
    _checkpoint(phase, 300)
    assert long_run.WallClock(phase).seconds() >= 50.0


def test_the_generated_table_replaces_its_block_and_keeps_the_reading(tmp_path, monkeypatch):
    doc = tmp_path / "results.md"
    profile = long_run.PROFILES["cpu"]
    begin, end = profile.doc_markers
    doc.write_text(f"# Other section\n\n{begin}\nold table\n{end}\nthe reading\n")
    monkeypatch.setattr(long_run, "DOC", doc)
    row = {"minutes": 10.0, "teacher_fd": 300.0, "teacher_kid": 2.0, "teacher_kid_std": 0.5, "teacher_steps": 700,
           "teacher_images": 44_800, "clean_fd": 80.0, "clean_kid": 1.0, "clean_kid_std": 0.2, "clean_steps": 710,
           "clean_images": 45_440}
    task = {"n_eval": 1000, "extractor": "classifier", "floor_against": "test split", "floor_fd": 1.5,
            "distilled_from_teacher_minutes": 10, "clean_reference_minutes": 10,
            "floor_kid": 0.1, "floor_kid_std": 0.05, "trained_on": "x86_64 CPU", "batch_sizes": {"teacher": 64,
                                                                                             "student": 32},
            "rows": [row]}
    long_run.write_doc({"command": "c", "date": "d", "machine": "m", "minutes": "x", "tasks": {"inpaint-0.8": task}},
                       profile)
    text = doc.read_text()
    assert text.startswith("# Other section") and text.endswith("the reading\n") and "old table" not in text
    cells = "| 10 | 300.0 (2 +- 0.5; 700 steps, 45k images) | - | 80.0 (1 +- 0.2; 710 steps, 45k images) | - | - |"
    assert cells in text
    assert "Trained on x86_64 CPU, batch 64 (teacher) and 32 (distillation)" in text
    # a task with a student distilled from the clean teacher gets its column
    row |= {"clean_student_fd": 90.0, "clean_student_kid": 1.5, "clean_student_kid_std": 0.3,
            "clean_student_steps": 300, "clean_student_images": 9_600}
    long_run.write_doc({"command": "c", "date": "d", "machine": "m", "minutes": "x", "tasks": {"inpaint-0.8": task}},
                       profile)
    text = doc.read_text()
    assert "| clean-data teacher | clean-data student | student / teacher" in text
    assert cells.replace(" | - | - |", " | 90.0 (1.5 +- 0.3; 300 steps, 10k images) | - | - |") in text


def test_the_clean_mri_reference_is_scored_with_the_mri_models_features(tmp_path):
    # the clean reference of MRI has an identity operator; its images are complex like the MRI models' and must
    # be scored with the same features (Inception on magnitudes), not the Fashion-MNIST classifier
    from rsd_core.data.reader import open_dataset
    from rsd_core.data.sources import corrupt
    from rsd_core.operators import IdentitySpec
    from rsd_core.select.selection import evaluation_extractor

    corrupt("brain-mri", IdentitySpec(), seed=0, out_uri=str(tmp_path / "clean"), limit=8, clean_eval_count=4,
            image_size=32, clean_eval_split="test")
    channels = open_dataset(str(tmp_path / "clean")).manifest.image_shape[0]
    assert channels == 2 and evaluation_extractor(channels).label == evaluation_extractor(2).label
    assert "Inception" in evaluation_extractor(channels).label


def test_publishing_one_task_keeps_the_other_published_tasks(tmp_path, monkeypatch):
    # rerunning inpainting alone must replace its rows and keep MRI's published rows with their own date
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    monkeypatch.setattr(long_run, "RESULTS", results)
    monkeypatch.setattr(long_run, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(long_run, "DOC", tmp_path / "results.md")
    (tmp_path / "results.md").write_text("# Results\n")
    # a task as the file held it before its tasks recorded device, batch sizes and images seen
    mri = {"n_eval": 419, "extractor": "Inception", "floor_against": "train", "floor_fd": 50.0, "floor_kid": 0.01,
           "floor_kid_std": 0.001, "distilled_from_teacher_minutes": 60.0, "clean_reference_minutes": 60.0,
           "rows": [{"minutes": 60.0, "teacher_fd": 285.1, "teacher_kid": 0.277, "teacher_kid_std": 0.0046,
                     "teacher_steps": 4263}]}
    (results / "long_run.json").write_text(json.dumps({"date": "2026-12-04", "command": "old", "tasks": {
        "inpaint-0.8": {**mri, "rows": [{"minutes": 5.0}]}, "mri-r4": mri}}))
    root = out / "inpaint-0.8"
    (root / "corrupted").mkdir(parents=True)
    (root / "corrupted" / "points.json").write_text(json.dumps(
        {"teacher@10": {"fd": 200.0, "kid": 0.2, "kid_std": 0.01, "steps": 700, "sampler": "heun"}}))
    (root / "floor.json").write_text(json.dumps({"n": 1000, "fd": 7.5, "kid": 0.004, "kid_std": 0.005,
                                                 "against": "test", "extractor": "classifier"}))
    result = long_run.main(["--assemble-only", "--out", str(out)])
    assert list(result["tasks"]) == ["inpaint-0.8", "mri-r4"]
    assert result["tasks"]["mri-r4"] == {"date": "2026-12-04", "command": "old", **mri}
    fresh = result["tasks"]["inpaint-0.8"]
    assert [r["minutes"] for r in fresh["rows"]] == [10.0] and fresh["rows"][0]["teacher_fd"] == 200.0
    assert fresh["teacher_heldout_sigma_floor"] == long_run.TASKS["inpaint-0.8"].teacher.heldout_sigma_floor
    assert json.loads((results / "long_run.json").read_text())["tasks"] == result["tasks"]
    doc = (tmp_path / "results.md").read_text()
    assert "`old` (2026-12-04" in doc and "| 60 | 285.1 (0.277 +- 0.0046; 4263 steps) |" in doc


def test_a_distillation_variant_is_an_arm_beside_the_student(tmp_path, monkeypatch):
    # the arm distils from the same teacher point with its changes, into its own folder: the variant's own student
    # is kept as it was, and the arm's rows compare with it at equal minutes
    _run(tmp_path, "0.05", "0.05")
    root = tmp_path / "inpaint-0.8" / "corrupted"
    base = json.loads((root / "points.json").read_text())["student@0.05"]
    arm = ["--distill-variant", "fast:distill.lr_generator=2e-4;train.batch_size=16"]
    result = long_run.main(["--task", "inpaint-0.8", "--teacher-minutes", "0.05", "--distill-minutes", "0.05",
                            "--limit", "256", "--n-eval", "48", "--quiet", "--no-publish", "--out", str(tmp_path),
                            *arm])
    task = result["tasks"]["inpaint-0.8"]
    assert json.loads((root / "points.json").read_text())["student@0.05"] == base
    folder = root / long_run.ARMS_DIR / "fast"
    meta = json.loads(next((folder / DISTILL_DIR / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["config"]["distill"]["lr_generator"] == 2e-4 and meta["config"]["train"]["batch_size"] == 16
    assert meta["config"]["teacher"] == str(root / "points" / "teacher-0.05min")
    [variant] = task["distill_variants"]
    assert variant["name"] == "fast" and variant["changes"] == {"distill": {"lr_generator": 2e-4},
                                                                "train": {"batch_size": 16}}
    [row] = variant["rows"]
    assert row["student_over_base"] == row["student_fd"] / base["fd"] and row["student_fd"] != base["fd"]
    assert row["student_images"] == row["student_steps"] * 16
    assert row["student_over_teacher"] == row["student_fd"] / task["points"]["corrupted"]["teacher@0.05"]["fd"]

    # the name is the arm: reusing it for other settings is refused before anything trains
    with pytest.raises(SystemExit, match="distilled with"):
        long_run.main(["--task", "inpaint-0.8", "--teacher-minutes", "0.05", "--distill-minutes", "0.05,0.1",
                       "--limit", "256", "--quiet", "--no-publish", "--out", str(tmp_path),
                       "--distill-variant", "fast:distill.alpha=1.0"])
    # the generated table shows the arm with its changes
    monkeypatch.setattr(long_run, "DOC", tmp_path / "results.md")
    (tmp_path / "results.md").write_text("# Results\n")
    long_run.write_doc(result, long_run.PROFILES["cpu"])
    doc = (tmp_path / "results.md").read_text()
    assert "| fast (corrupted) | `distill.lr_generator=0.0002; train.batch_size=16` | 0.05 |" in doc
    grid = "long_run/inpaint-0.8_corrupted_fast_student-0.05min.png"
    assert f"[grid](figures/{grid})" in doc
    # publishing copies the arm's grid where the table links it
    monkeypatch.setattr(long_run, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(long_run, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    long_run.main(["--assemble-only", "--out", str(tmp_path)])
    assert (tmp_path / "figures" / grid).read_bytes() == (folder / "grids" / "student@0.05.png").read_bytes()

    # --pack / --unpack carry the arm's points and its changes with the variant's own (a GPU run's way back)
    back = tmp_path / "back"
    long_run.main(["--out", str(tmp_path), "--pack", str(tmp_path / "packed")])
    long_run.main(["--out", str(back), "--unpack", str(tmp_path / "packed")])
    kept = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("inpaint-0.8/**/points/*"))
    assert kept == sorted(p.relative_to(back) for p in back.glob("inpaint-0.8/**/points/*"))
    assert any(long_run.ARMS_DIR in str(p) for p in kept)
    assert (back / folder.relative_to(tmp_path) / "changes.json").read_text() == (folder / "changes.json").read_text()
    weights = "points/student-0.05min/model.safetensors"
    original, carried = load_file(folder / weights), load_file(back / folder.relative_to(tmp_path) / weights)
    assert all(torch.allclose(original[k], carried[k], rtol=1e-3, atol=1e-4) for k in original)


@pytest.mark.parametrize("text", ["fast", "a/b:distill.alpha=1.0", "x:distill.alpha=1.0;network.x=1", "x:"])
def test_a_malformed_distillation_variant_is_refused(text):
    with pytest.raises(SystemExit):
        long_run.main(["--task", "inpaint-0.8", "--distill-variant", text, "--no-publish"])


def test_a_distillation_variant_with_an_unknown_field_names_it(capsys):
    with pytest.raises(SystemExit):
        long_run.main(["--task", "inpaint-0.8", "--distill-variant", "x:distill.alhpa=1.0", "--no-publish"])
    assert "alhpa" in capsys.readouterr().err


@pytest.mark.parametrize("task, random_lines", [("mri-r4-estimated", 0), ("mri-r4-estimated-delta0.5", 1)])
def test_the_mri_further_mask_holds_random_lines_only_with_delta_half(task, random_lines):
    """With 6 calibration lines of 8, delta_R = 1 leaves M~ the ACS block alone in every draw (the networks never
    see a frequency above +-3 cycles); delta_R = 0.5 keeps one of the two random lines in every draw."""
    operator = build_operator(long_run.TASKS[task].operator.model_dump())
    rng = torch.Generator().manual_seed(0)
    mask = operator.simulation_state(256, (2, 32, 32), rng)["mask"]
    further = operator.further_mask(mask, rng).reshape(256, 32) > 0
    outside_acs = further & ~operator.acs_block(32)
    assert operator.acs_block(32).sum() == 6
    assert (outside_acs.sum(1) == random_lines).all()
    assert (further & ~(mask.reshape(256, 32) > 0)).sum() == 0  # M~ within M


def test_unpack_refuses_a_member_outside_the_output_folder(tmp_path):
    (tmp_path / "packed").mkdir()
    with tarfile.open(tmp_path / "packed" / "points-0.tar", "w") as tar:
        info = tarfile.TarInfo("../escaped.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match="escaped.json"):
        long_run.unpack(tmp_path / "packed", tmp_path / "out")
    assert not (tmp_path / "escaped.json").exists()
