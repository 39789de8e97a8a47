"""The whole Flyte DAG on the cpu-smoke preset, through the `rsd` CLI in a subprocess, in a scratch
HOME/TMPDIR/outputs; then the local cache on a second run, and serialization for a cluster."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("flytekit")

REPO = Path(__file__).resolve().parents[1]


from rsd_core.presets import PRESETS, ConfigError, build_config  # noqa: E402
from rsd_core.train.ema import ema_beta  # noqa: E402
from tests.cli import BIN, rsd, rsd_streams  # noqa: E402


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips_through_yaml(tmp_path, name):
    from rsd_core.presets import config_yaml

    config = build_config(name)
    (tmp_path / "c.yaml").write_text(config_yaml(config))
    assert build_config(None, tmp_path / "c.yaml") == config


def test_cpu_demo_follows_the_cpu_scale_notes():
    demo = build_config("cpu-demo")
    assert demo.data.operator.kind == "inpaint" and demo.data.operator.p == 0.6
    assert demo.distill.lr_generator == demo.distill.lr_fake == 5e-5
    assert demo.distill.betas_generator == demo.distill.betas_fake == [0.0, 0.999]
    assert demo.distill_train.batch_size == 32
    assert demo.teacher_train.time_budget_s + demo.distill_train.time_budget_s <= 11 * 60
    # The generator EMA averages over >= 50 iterations by ~300 (6 CPU minutes): EDM's 5% ramp-up gave ~15.
    d = demo.distill_train
    seen = 300 * d.batch_size
    assert 0.5 ** (1 / 50) <= ema_beta(d.batch_size, seen, d.ema_halflife_nimg, d.ema_rampup_ratio) < 1


def test_yaml_then_set_overrides_in_order(tmp_path):
    (tmp_path / "c.yaml").write_text("teacher_train: {steps: 7, lr: 0.002}\ndata: {operator: {kind: blur}}\n")
    config = build_config("cpu-smoke", tmp_path / "c.yaml", ["teacher_train.steps=9", "tracking.model_name=m"])
    assert (config.teacher_train.steps, config.teacher_train.lr) == (9, 0.002)
    assert config.teacher_train.batch_size == 16  # untouched preset value
    assert config.data.operator.kind == "blur" and config.tracking.model_name == "m"
    switched = build_config("cpu-smoke", overrides=["data.operator={kind: superres, factor: 4}"])
    assert switched.data.operator.factor == 4


def test_a_run_on_an_existing_dataset_is_named_after_it_unless_told_otherwise():
    """The preset's model name and description describe the preset's own data (cpu-demo: Fashion-MNIST):
    on another dataset they give way, the model to one named after that dataset's manifest."""
    from rsd_core.presets import for_existing_dataset
    from tasks.registry import dataset_model_name

    rerun = for_existing_dataset(build_config("cpu-demo"), "cpu-demo")
    assert rerun.tracking.model_name is None and rerun.description == ""
    assert rerun.selection.extractor == "self-supervised"  # features learnt from that dataset, not Fashion-MNIST
    named = for_existing_dataset(build_config("cpu-demo", overrides=["tracking.model_name=scans",
                                                                     "description=our scans"]), "cpu-demo")
    assert (named.tracking.model_name, named.description) == ("scans", "our scans")
    # a preset changed by --set says so in its description, and still gives way on another dataset
    changed = build_config("cpu-demo", overrides=["data.operator.p=0.8", "distill_train.time_budget_s=60"])
    assert changed.description == (build_config("cpu-demo").description
                                   + " (changed: data.operator.p=0.8; distill_train.time_budget_s=60)")
    assert for_existing_dataset(changed, "cpu-demo").description == ""
    assert build_config("cpu-demo", overrides=["data.operator.p=0.8", "description=p 0.8"]).description == "p 0.8"
    assert dataset_model_name("Team Scans/2024 (v2)") == "rsd-team-scans-2024-v2"
    with pytest.raises(ValueError, match="tracking.model_name"):
        dataset_model_name("???")


@pytest.mark.parametrize(("override", "message"), [
    ("teacher_train.lr=-1", "teacher_train.lr: lr must be > 0"),
    ("teacher_train.lrr=1", "teacher_train.lrr: Extra inputs are not permitted"),
    ("data.operator.p=1.5", "data.operator.p: p (erasure probability) must be in [0, 1)"),
    ("selection.extractor=vgg", "selection.extractor"),
    ("network.channel_mult.x=1", "'network.channel_mult' is not a section"),
    ("steps", "--set expects KEY.SUB=VALUE"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config("cpu-smoke", overrides=[override])


def test_params_are_flattened_and_truncated_to_mlflow_limits():
    from tasks.tracking import PARAM_VALUE_LIMIT, flatten

    flat = flatten({"data": {"operator": {"kind": "inpaint", "p": 0.6}}, "description": "x" * 10_000})
    assert flat["data.operator.kind"] == "inpaint" and flat["data.operator.p"] == "0.6"
    assert len(flat["description"]) == PARAM_VALUE_LIMIT


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Environment for subprocesses: HOME (Flyte's local cache), TMPDIR, no inherited tracking server."""
    from rsd_core.select.frechet import default_cache_dir

    root = tmp_path_factory.mktemp("pipeline")
    for sub in ("home", "tmp"):
        (root / sub).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYTE_", "RSD_"))}
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), OMP_NUM_THREADS="1",
               RSD_CACHE_DIR=str(default_cache_dir()))  # keep the trained feature classifier across HOMEs
    return root, env


@pytest.fixture(scope="module")
def first_run_streams(scratch):
    root, env = scratch
    return root / "out", *rsd_streams(env, "run", "--preset", "cpu-smoke", "--out", str(root / "out"))


@pytest.fixture(scope="module")
def first_run(first_run_streams):
    return first_run_streams[:2]


def test_run_prints_no_flytekit_type_warnings(first_run_streams):
    """The configs the tasks pass are typed by Flyte field by field: no "cannot be converted" warnings
    (a tuple field brings back one per task that takes the config)."""
    _, stdout, stderr = first_run_streams
    output = stdout + stderr
    assert "Transformer for type" not in output and "cannot be converted to a literal type" not in output


def client_for(out: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{out / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_by_name(client, name: str):
    exp = client.get_experiment_by_name("rsd-smoke")
    return [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]


def test_run_with_stdout_in_a_file_reports_each_stage_and_training_progress(first_run):
    """Piped stdout (pod logs, CI): one start and one end line per stage with its key figures, and plain
    training lines (the first step, every RSD_PROGRESS_INTERVAL seconds, the last step)."""
    lines = first_run[1].splitlines()
    for stage in ("corrupt_dataset", "pretrain_teacher", "distill", "select_checkpoint", "export_model",
                  "register_model"):
        assert f"[{stage}] started" in lines, stage
        assert any(line.startswith(f"[{stage}] done in ") for line in lines), stage
    assert any(line.startswith("[pretrain_teacher] done in ") and "loss " in line for line in lines)
    assert any(line.startswith("[select_checkpoint] done in ") and "chosen_proximal_fd" in line for line in lines)
    assert any(line.startswith("[select] teacher@0.0: proximal FD ") for line in lines)  # selection's candidates
    for phase, total in (("pretrain", 30), ("distill", 12)):
        steps = [line.split()[2] for line in lines if line.startswith(f"[{phase}] step ")]
        assert steps[0] == f"1/{total}" and steps[-1] == f"{total}/{total}", steps
    assert "\r" not in first_run[1]


def test_smoke_pipeline_registers_a_champion_with_metrics_grid_and_onnx(first_run, scratch):
    import onnxruntime as ort

    out, stdout = first_run
    assert "registered model  rsd-smoke version 1 alias @champion" in stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in stdout
    assert not (Path(scratch[1]["TMPDIR"]) / "mlruns").exists()  # nothing written to the cwd
    client = client_for(out)
    champion = client.get_model_version_by_alias("rsd-smoke", "champion")
    assert int(champion.version) == 1 and float(champion.tags["rsd.proximal_fd"]) > 0

    (parent,) = [r for r in runs_by_name(client, "rsd_pipeline-local")]
    assert parent.info.status == "FINISHED"
    assert {"proximal_fd", "teacher_proximal_fd", "chosen_step"} <= set(parent.data.metrics)
    assert parent.data.params["teacher_train.steps"] == "30"
    assert parent.data.tags["rsd.operator_kind"] == "inpaint" and len(parent.data.tags["rsd.dataset_fingerprint"]) == 64
    assert parent.data.tags["rsd.code_version"]
    assert "selection_grid.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    (pretrain,) = runs_by_name(client, "pretrain_teacher")
    assert pretrain.data.tags["mlflow.parentRunId"] == parent.info.run_id
    losses = client.get_metric_history(pretrain.info.run_id, "loss")
    assert [m.step for m in losses][:3] == [1, 2, 4]  # every log_every = 2 steps, plus the first
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"teacher_samples.png", "teacher_losses.png"} <= artifacts

    onnx_path = Path(re.search(r"exported model\s+(\S+)", stdout).group(1)) / "generator.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"eps": rng.standard_normal((3, 1, 32, 32), dtype=np.float32),
             "u": rng.random((3, 1, 32, 32), dtype=np.float32)}
    (images,) = session.run(None, feeds)
    assert images.shape == (3, 1, 32, 32) and np.isfinite(images).all()

    grid = Path(scratch[0]) / "registered.png"
    rsd(scratch[1], "sample", "--model", "models:/rsd-smoke@champion", "-n", "8", "--out", str(grid),
        "--out-dir", str(out))
    assert grid.stat().st_size > 0
    listing = rsd(scratch[1], "models", "--out-dir", str(out))
    version = client_for(out).get_model_version("rsd-smoke", 1)
    lo, hi = map(float, version.tags["rsd.proximal_fd_interval"].split(","))
    assert lo <= float(version.tags["rsd.proximal_fd"]) <= hi  # the interval holds the estimate it qualifies
    assert re.search(r"\n\s+1\s+champion\s+\S+\s+\[[-0-9.e]+, [-0-9.e]+\]", listing)
    from tasks import registry

    model_id = registry.logged_model_id(version)  # MLflow 3: the LoggedModel behind the version
    assert model_id.startswith("m-") and model_id in listing
    parent = client_for(out).get_run(version.tags["rsd.execution_run_id"])
    assert parent.data.tags["rsd.logged_model_id"] == model_id


def test_second_run_hits_the_flyte_cache_and_stays_challenger(first_run, scratch):
    out, _ = first_run
    stdout = rsd(scratch[1], "run", "--preset", "cpu-smoke", "--out", str(out))
    # Same data, same model: version 2 scores the same Proximal FD, which does not beat the champion.
    assert "registered model  rsd-smoke version 2 alias @challenger" in stdout
    client = client_for(out)
    assert len(runs_by_name(client, "rsd_pipeline-local")) == 2
    for cached in ("corrupt_dataset", "pretrain_teacher", "distill", "select_checkpoint"):
        assert len(runs_by_name(client, cached)) == 1, f"{cached} ran again instead of hitting the cache"
    assert len(runs_by_name(client, "register_model")) == 2
    assert int(client.get_model_version_by_alias("rsd-smoke", "champion").version) == 1


def test_rerun_on_an_existing_dataset_reruns_only_the_stage_whose_config_changed(first_run, scratch):
    """The data team's path (an already-corrupted dataset) with a new selection setting: training
    comes from the cache, selection runs again."""
    out, _ = first_run
    (dataset,) = out.glob("flyte-sandbox/*/corrupt-*/dataset/manifest.json")
    stdout = rsd(scratch[1], "run", "--preset", "cpu-smoke", "--out", str(out), "--dataset", str(dataset.parent),
                 "--set", "selection.n_samples=48")
    # named after the dataset, not registered under (nor described as) the preset's model
    name = json.loads(dataset.read_text())["name"]
    assert f"dataset {name}: " in stdout and "cpu-smoke: every stage" not in stdout
    assert re.search(rf"registered model  rsd-{name} version 1 alias @champion", stdout)
    assert f"scored on         self-supervised encoder trained on the corrupted observations of '{name}'" in stdout
    client = client_for(out)
    (parent,) = runs_by_name(client, "rsd_rerun-local")
    assert parent.data.tags["rsd.dataset_name"] == name and name in parent.data.tags["mlflow.note.content"]
    assert not any(key.startswith("data.") for key in parent.data.params)  # the preset's unused data section
    assert len(runs_by_name(client, "corrupt_dataset")) == 1
    assert len(runs_by_name(client, "pretrain_teacher")) == len(runs_by_name(client, "distill")) == 1
    reselected = [r for r in runs_by_name(client, "select_checkpoint") if r.data.params["n_samples"] == "48"]
    assert len(reselected) == 1


def test_another_tracking_store_does_not_reuse_cached_training(first_run, scratch):
    """Cached task outputs carry MLflow runs of one store: a run tracked elsewhere trains again."""
    out, _ = first_run
    env = {**scratch[1], "MLFLOW_TRACKING_URI": f"sqlite:///{Path(scratch[0]) / 'other-store.db'}"}
    lines = rsd(env, "run", "--preset", "cpu-smoke", "--out", str(out)).splitlines()
    assert "[pretrain_teacher] started" in lines and "[distill] started" in lines
    assert "registered model  rsd-smoke version 1 alias @champion" in "\n".join(lines)


def test_a_task_cache_whose_outputs_were_deleted_is_cleared(tmp_path, capsys):
    from rsd_cli.local import scope_task_cache

    cache = tmp_path / "flyte-cache" / "abc"
    cache.mkdir(parents=True)
    (cache / "entry").write_text("points at deleted outputs")
    scope_task_cache(cache, outputs_exist=False)
    assert not (cache / "entry").exists() and "cleared the task cache" in capsys.readouterr().out
    (cache / "entry").write_text("points at existing outputs")
    scope_task_cache(cache, outputs_exist=True)
    assert (cache / "entry").exists()


def test_sweep_maps_over_operators(scratch):
    """Two corruption levels through corrupt, pretrain, distil and select as map tasks."""
    root, env = scratch
    script = textwrap.dedent("""
        import json
        from rsd_core.presets import build_config
        from workflows.pipeline import rsd_sweep
        config = build_config("cpu-smoke", overrides=["teacher_train.steps=4", "teacher_train.checkpoint_every=4",
                                                      "distill_train.steps=4", "data.limit=128"])
        operators = [{"kind": "inpaint", "p": 0.5}, {"kind": "inpaint", "p": 0.8}]
        selected = rsd_sweep(config=config, operators=operators)
        print(json.dumps([[s.operator_kind, s.chosen_step, s.proximal_fd] for s in selected]))
    """)
    sweep_env = {**env, "RSD_OUTPUTS": str(root / "sweep"), "FLYTE_LOCAL_CACHE_ENABLED": "false",
                 "FLYTE_SDK_LOCAL_SANDBOX": str(root / "sweep-sandbox")}
    proc = subprocess.run([sys.executable, "-c", script], env=sweep_env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(kind, step) for kind, step, _ in results] == [("inpaint", 4), ("inpaint", 4)]
    assert all(fd > 0 for _, _, fd in results)
    datasets = sorted((root / "sweep-sandbox").glob("*/corrupt-*/dataset/manifest.json"))
    assert len(datasets) == 2


def _package(env: dict, pkg: Path) -> dict[str, bytes]:
    """`pyflyte package` of every workflow with ``env``; the archive's files by name."""
    proc = subprocess.run([str(BIN / "pyflyte"), "--pkgs", "workflows", "package", "--image",
                           "ghcr.io/example/rsd:test", "-f", "-o", str(pkg)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with tarfile.open(pkg) as tar:
        return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_package_every_workflow_and_launch_plan_for_a_gpu_cluster(scratch):
    from flyteidl.admin import launch_plan_pb2, task_pb2
    from flyteidl.core import tasks_pb2

    root, env = scratch
    env = {**env, "RSD_PRESET": "celeba64-inpaint-gpu", "RSD_GPU_IMAGE": "ghcr.io/example/rsd-gpu:test"}
    entries = _package(env, root / "flyte-package.tgz")
    names = " ".join(entries)
    for entity in ("workflows.pipeline.rsd_pipeline", "workflows.pipeline.rsd_rerun", "workflows.pipeline.rsd_sweep",
                   "rsd_pipeline_nightly", "rsd_rerun_data_team", "tasks.pipeline_tasks.pretrain_teacher"):
        assert entity in names, f"{entity} not serialized: {sorted(entries)}"

    (task_file,) = [k for k in entries if k.endswith("tasks.pipeline_tasks.pretrain_teacher_1.pb")]
    template = task_pb2.TaskSpec.FromString(entries[task_file]).template
    requests = {r.name: r.value for r in template.container.resources.requests}
    assert requests[tasks_pb2.Resources.GPU] == "1"
    assert template.container.image == "ghcr.io/example/rsd-gpu:test"
    (nightly_file,) = [k for k in entries if "rsd_pipeline_nightly" in k]
    nightly = launch_plan_pb2.LaunchPlan.FromString(entries[nightly_file])
    assert nightly.spec.entity_metadata.schedule.cron_schedule.schedule == "0 3 * * *"


def test_multi_node_training_serializes_as_an_elastic_pytorch_job(scratch, tmp_path):
    from flyteidl.admin import task_pb2

    root, env = scratch
    config = tmp_path / "elastic.yaml"
    config.write_text("resources:\n  pretrain: {gpu: 8, nproc_per_node: 8, nnodes: 2}\n")
    env = {**env, "RSD_PRESET": "celeba64-inpaint-gpu", "RSD_CONFIG": str(config)}
    entries = _package(env, root / "elastic-package.tgz")
    (pretrain,) = [k for k in entries if k.endswith("tasks.pipeline_tasks.pretrain_teacher_1.pb")]
    (distill,) = [k for k in entries if k.endswith("tasks.pipeline_tasks.distill_1.pb")]
    assert task_pb2.TaskSpec.FromString(entries[pretrain]).template.type == "pytorch"
    assert task_pb2.TaskSpec.FromString(entries[distill]).template.type == "python-task"  # 1 process: plain


def test_deleting_the_outputs_and_running_again_works(first_run, scratch):
    """``rm -rf outputs`` then the same command: everything is recomputed (this test runs last in the
    module: it deletes the first run's outputs)."""
    out, _ = first_run
    shutil.rmtree(out)
    stdout = rsd(scratch[1], "run", "--preset", "cpu-smoke", "--out", str(out))
    assert "[pretrain_teacher] started" in stdout.splitlines()
    assert "registered model  rsd-smoke version 1 alias @champion" in stdout
