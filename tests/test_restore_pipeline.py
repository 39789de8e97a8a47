"""`rsd restore` end to end on a tiny registered generator, its one-line refusals of a model that does
not fit the data, and the registered model served the MLflow way (pyfunc in-process and over HTTP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("flytekit")

from rsd_core.config import DistillConfig, DistillTrainConfig, NetworkConfig, TrainConfig  # noqa: E402
from rsd_core.data.manifest import MANIFEST_NAME  # noqa: E402
from rsd_core.data.reader import open_dataset  # noqa: E402
from rsd_core.data.writer import write_dataset  # noqa: E402
from rsd_core.restore.encoder import EncoderConfig  # noqa: E402
from tests.cli import BIN, scratch_env  # noqa: E402
from tests.servers import post_json, served  # noqa: E402

MODEL = "restore-smoke"
CHAMPION = f"models:/{MODEL}@champion"
ROWS = 80  # three shards of 32, 32 and 16 rows, 16 rows per row group
CLEAN_ROWS = 24


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The subprocess environment: scratch HOME/TMPDIR, one thread, no inherited tracking settings."""
    root = tmp_path_factory.mktemp("restore")
    return root, scratch_env(root)


def _sharded_copy(source: str, out: Path) -> str:
    """The dataset at ``source`` rewritten in shards of 32 rows (16 per row group), so the workflow maps
    over several shards."""
    ds = open_dataset(source)
    obs, state, labels = ds.read_all()
    m = ds.manifest
    fields = {"name": m.name, "image_shape": m.image_shape, "operator": m.operator, "seed": m.seed,
              "clean_eval_uri": str(Path(source) / m.clean_eval_uri)}
    write_dataset(str(out), obs, state, labels, rows_per_shard=32, rows_per_group=16, **fields)
    return str(out)


@pytest.fixture(scope="module")
def trained(scratch):
    """A generator trained for a few steps on corrupted Fashion-MNIST (inpainting p = 0.6), exported
    and registered as champion of ``restore-smoke`` exactly as the pipeline's register_model does."""
    from rsd_core.data.sources import corrupt
    from rsd_core.export.onestep import export_generator
    from rsd_core.stages import distill_stage, pretrain_stage
    from tasks import registry, tracking
    from tasks.pipeline_tasks import _log_generator_model

    root, _ = scratch
    out = root / "outputs"
    corrupt("fashion-mnist", {"kind": "inpaint", "p": 0.6}, 0, str(root / "raw"), limit=ROWS,
            clean_eval_count=CLEAN_ROWS)
    dataset = _sharded_copy(str(root / "raw"), root / "data")
    network = NetworkConfig(model_channels=8, channel_mult=(1, 2), attn_resolutions=())
    teacher_train = TrainConfig(steps=6, batch_size=8, lr=1e-3, lr_rampup_steps=2, checkpoint_every=6,
                                ema_halflife_nimg=100.0, precision="fp32")
    distill_train = DistillTrainConfig(steps=2, batch_size=4, lr_rampup_steps=0,
                                checkpoint_every=2, ema_halflife_nimg=50.0, precision="fp32")
    teacher, _ = pretrain_stage(dataset, network, teacher_train, root / "work", progress=False)
    generator, _, _ = distill_stage(teacher, distill_train, DistillConfig(), root / "work", progress=False)
    export = export_generator(generator, root / "export", formats=("pt2",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracking.OUTPUTS_ENV, str(out))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = tracking.client()
        run = client.create_run(tracking.experiment_id(client, "restore-test")).info.run_id
        registration = registry.register_generator(
            client, name=MODEL, execution_run_id=run, fingerprint=open_dataset(dataset).fingerprint,
            scoring="test/n1", operator_kind="inpaint", proximal_fd=1.0,
            log_model=lambda: _log_generator_model(export, run))
    assert registration.alias == "champion"
    return out, dataset


def _rsd(env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "rsd"), *args], env=env, cwd=env["TMPDIR"], capture_output=True, text=True,
                          timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _client(out: Path):
    uri = f"sqlite:///{out / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


ENCODER = "{steps: 3, width: 8}"  # the posterior-mean network, fitted for a few steps


@pytest.fixture(scope="module")
def restored(trained, scratch) -> tuple[Path, str]:
    """`rsd restore` of the dataset with the champion: the restored dataset and its stdout."""
    out, dataset = trained
    root, env = scratch
    started = time.perf_counter()
    stdout = _rsd(env, "restore", "--model", CHAMPION, "--dataset", dataset, "--out", str(root / "restored"),
                  "--out-dir", str(out), "--encoder", ENCODER).stdout
    print(f"rsd restore: {time.perf_counter() - started:.1f} s")
    return root / "restored", stdout


def _restorer_uri(dataset: str) -> str:
    from tasks.restorer import restorer_name

    return f"models:/{restorer_name(MODEL, open_dataset(dataset).manifest.name)}/1"


def test_rsd_restore_writes_the_restored_dataset_with_provenance_metrics_and_grid(trained, scratch, restored):
    out, dataset = trained
    restored, stdout = restored
    assert f"model    {CHAMPION} (version 1): 'inpaint' generator" in stdout
    assert "80 'inpaint' observations in 3 shard(s)" in stdout
    assert "encoder fitted on 80 observations (pairs: observations)" in stdout  # inpainting: Ambient self-supervision
    assert "shard 3/3: 16 observations restored" in stdout
    assert f"restored dataset  {restored}" in stdout
    assert f"on the {CLEAN_ROWS} rows of the dataset's clean split" in stdout

    source, result = open_dataset(dataset), open_dataset(str(restored), verify=True)
    assert result.manifest.operator.kind == "identity" and len(result) == len(source) == ROWS
    prov = result.manifest.provenance
    assert (prov["model"]["name"], prov["model"]["version"]) == (MODEL, 1)
    assert prov["source"]["fingerprint"] == source.fingerprint and prov["settings"]["steps"] == 0
    assert prov["settings"]["encoder"] == {**EncoderConfig().model_dump(), "steps": 3, "width": 8, "target": "image"}
    y, state, labels = source.read_all()
    mean, _, restored_labels = result.read_all()
    assert torch.equal(labels, restored_labels)
    # Noiseless inpainting with data consistency keeps every measured pixel: rows stayed in order across shards.
    mask = state["mask"].expand_as(y).bool()
    torch.testing.assert_close(mean[mask], y[mask], atol=1e-5, rtol=0)
    spread, _, _ = open_dataset(str(restored / "spread")).read_all()
    assert spread.shape == mean.shape and (spread >= 0).all() and spread[~mask].max() > 0
    assert result.manifest.clean_eval_uri and result.clean_eval() is not None

    client = _client(out)
    (run,) = client.search_runs([client.get_experiment_by_name("rsd-restore").experiment_id],
                                "tags.`rsd.workflow` = 'rsd_restore'")
    assert run.info.status == "FINISHED" and run.data.tags["rsd.model_version"] == "1"
    metrics = run.data.metrics
    assert metrics["images"] == ROWS and metrics["seconds"] > 0 and metrics["eval/images"] == CLEAN_ROWS
    assert {"misfit", "spread", "seconds_per_image", "eval/psnr", "eval/ssim", "encoder_seconds"} <= set(metrics)
    assert metrics["misfit"] < 0.05 and 0 < metrics["eval/ssim"] <= 1 and 0 < metrics["eval/coverage_2sd"] <= 1
    assert "of the clean pixels inside mean +- 2 spread" in stdout
    assert "restoration.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    shards = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert sorted(r.info.run_name for r in shards if r.info.run_name.startswith("restore_shard")) == [
        "restore_shard-00000", "restore_shard-00001", "restore_shard-00002"]
    (fit,) = [r for r in shards if r.info.run_name == "fit_encoder"]
    assert fit.data.metrics["encoder/observations"] == ROWS
    assert run.data.tags["rsd.restorer"] == _restorer_uri(dataset)
    assert f"registered as {_restorer_uri(dataset)}" in stdout


def test_the_registered_restorer_restores_as_rsd_restore_did(trained, restored):
    """Loaded from the registry (python_function flavour), the restorer gives the restored dataset's rows."""
    from mlflow.exceptions import MlflowException

    from tasks.restorer import TAG_FINGERPRINT, TAG_GENERATOR

    out, dataset = trained
    source = open_dataset(dataset)
    version = _client(out).get_model_version(*_restorer_uri(dataset).removeprefix("models:/").split("/"))
    assert version.tags[TAG_GENERATOR] == f"{MODEL}/1" and version.tags[TAG_FINGERPRINT] == source.fingerprint
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        model = mlflow.pyfunc.load_model(_restorer_uri(dataset))
    assert model.metadata.get_input_schema().input_names() == ["observations", "mask"]
    y, state, _ = source.read_all()
    answer = model.predict({"observations": y.numpy(), "mask": state["mask"].numpy()})
    mean, _, _ = open_dataset(str(restored[0])).read_all()
    spread, _, _ = open_dataset(str(restored[0] / "spread")).read_all()
    np.testing.assert_allclose(answer["mean"], mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(answer["spread"], spread.numpy(), atol=1e-5, rtol=1e-4)
    with pytest.raises(MlflowException, match=r"Shape of input \(2, 1, 16, 16\) does not match expected shape"):
        model.predict({"observations": y[:2].numpy(), "mask": np.ones((2, 1, 16, 16), np.float32)})


def test_a_failed_write_loses_no_fit_and_a_named_restorer_restores_without_one(trained, scratch, restored):
    """The write step fails (its output sits under a file); the rerun reuses the registered fit, as does
    --restorer, whose settings are its own."""
    out, dataset = trained
    root, env = scratch
    (root / "a-file").write_text("")
    failed = _rsd(env, "restore", "--model", CHAMPION, "--dataset", dataset, "--out", str(root / "a-file" / "r"),
                  "--out-dir", str(out), "--encoder", ENCODER, "--refit", ok=False)
    assert "registered as" in failed.stdout and "/2" in failed.stdout.split("registered as")[-1].split()[0]
    rerun = _rsd(env, "restore", "--model", CHAMPION, "--dataset", dataset, "--out", str(root / "rerun"),
                 "--out-dir", str(out), "--encoder", ENCODER).stdout
    uri = _restorer_uri(dataset)[:-2] + "/2"
    assert f"restorer {uri} reused" in rerun and "encoder fitted" not in rerun
    named = _rsd(env, "restore", "--model", CHAMPION, "--dataset", dataset, "--out", str(root / "named"),
                 "--out-dir", str(out), "--restorer", _restorer_uri(dataset)).stdout
    assert f"restorer {_restorer_uri(dataset)} reused" in named
    mean, _, _ = open_dataset(str(root / "named")).read_all()
    torch.testing.assert_close(mean, open_dataset(str(restored[0])).read_all()[0], atol=1e-5, rtol=0)
    refused = _rsd(env, "restore", "--model", CHAMPION, "--dataset", dataset, "--out", str(root / "x"),
                   "--out-dir", str(out), "--restorer", _restorer_uri(dataset), "--batch-size", "4", ok=False)
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --restorer restores with the settings it was fitted with; drop --batch-size")


def _blur_dataset(path: Path, trained_on: str) -> str:
    images = torch.rand(8, 1, 32, 32) * 2 - 1
    write_dataset(str(path), images, name="blurred", image_shape=(1, 32, 32), operator={"kind": "blur", "std": 1.0})
    return str(path)


def _small_inpaint_dataset(path: Path, trained_on: str) -> str:
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    write_dataset(str(path), images, {"mask": torch.ones(8, 1, 16, 16)}, name="small", image_shape=(1, 16, 16),
                  operator={"kind": "inpaint", "p": 0.6})
    return str(path)


def _stateless_copy(path: Path, trained_on: str) -> str:
    """The trained-on dataset with the inpainting masks dropped from its manifest."""
    shutil.copytree(trained_on, path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["state_keys"] = {}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return str(path)


def _rsd_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``rsd *args`` through the console script's entry point, in this process (the refusals happen
    before Flyte starts, so a subprocess would only add its imports); the environment it sets is undone."""
    import tempfile as tempfile_module

    from rsd_cli.main import main

    for key in ("RSD_OUTPUTS", "TMPDIR", "FLYTE_SDK_LOCAL_SANDBOX", "FLYTE_LOCAL_CACHE_ENABLED",
                "FLYTE_SDK_LOGGING_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        original = os.environ.get(key)
        monkeypatch.setenv(key, original or "-")  # recorded, so whatever `rsd` sets is undone
        if original is None:
            monkeypatch.delenv(key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tempfile_module, "tempdir", tempfile_module.tempdir)
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("make", "message"), [
    (_blur_dataset, "the model was trained on 'inpaint' observations, the dataset holds 'blur' ones; "
                    "use a model trained on 'blur' data"),
    (_small_inpaint_dataset, "the model makes images of shape (1, 32, 32), the dataset's images are (1, 16, 16)"),
    (_stateless_copy, "field 'state_keys' lacks per-sample state ['mask'] that operator 'inpaint' needs"),
], ids=["wrong-kind", "wrong-shape", "missing-state"])
def test_a_model_that_does_not_fit_the_data_is_refused_in_one_line_before_any_work(trained, scratch, make, message,
                                                                                  monkeypatch, capsys):
    out, dataset = trained
    root, _ = scratch
    bad = make(root / f"bad{make.__name__}", dataset)
    target = root / f"never{make.__name__}"
    code, stderr = _rsd_in_process(monkeypatch, capsys, "restore", "--model", CHAMPION, "--dataset", bad,
                                   "--out", str(target), "--out-dir", str(out))
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert not target.exists()
    experiment = _client(out).get_experiment_by_name("rsd-restore")
    runs = _client(out).search_runs([experiment.experiment_id]) if experiment else []
    assert all(r.data.params.get("dataset") != bad for r in runs)


def test_a_bad_setting_names_its_flag(monkeypatch, capsys, tmp_path):
    def refusal(*flags: str) -> str:
        code, stderr = _rsd_in_process(monkeypatch, capsys, "restore", "--model", CHAMPION, "--dataset",
                                       str(tmp_path), "--out", str(tmp_path / "o"), "--out-dir", str(tmp_path), *flags)
        assert code == 2
        return stderr

    assert refusal("--steps", "-1") == "error: --steps: Input should be greater than or equal to 0\n"
    assert refusal("--encoder", "none") == ("error: --steps 0 restores nothing without an encoder: drop "
                                            "'--encoder none' (or --steps >= 1)\n")
    assert refusal("--encoder", "{stepz: 3}") == "error: --encoder-stepz: Extra inputs are not permitted\n"
    assert refusal("--method", "classical", "--encoder", "{steps: 3}") == (
        "error: --method 'classical' fits no network for the dataset: drop encoder\n")
    assert refusal("--method", "dps").startswith("error: method 'dps' restores with the teacher, and registered "
                                                 "models are one-step generators")
    with pytest.raises(SystemExit):
        refusal("--method", "wiener")
    assert "invalid choice: 'wiener'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["classical", "projection"])
def test_rsd_restore_runs_the_method_it_is_given(trained, scratch, method):
    """No network is fitted, no spread is written (none claimed), and the rows are the method's: for inpainting
    the projection is the zero-filled observation, the classical estimate fills the holes and keeps the rest."""
    out, dataset = trained
    root, env = scratch
    target = root / f"restored-{method}"
    stdout = _rsd(env, "restore", "--model", CHAMPION, "--dataset", dataset, "--out", str(target), "--out-dir",
                  str(out), "--method", method).stdout
    assert f"method={method} " in stdout and "encoder fitted" not in stdout
    assert f"spread            none (method {method} gives none)" in stdout
    restored = open_dataset(str(target))
    assert restored.manifest.provenance["settings"]["method"] == method and not (target / "spread").exists()
    mean, y, mask = restored.read_all()[0], *open_dataset(dataset).read_all()[:2]
    filled = (y * mask["mask"]).clamp(-1, 1)
    torch.testing.assert_close(mean * mask["mask"], filled)
    if method == "projection":
        torch.testing.assert_close(mean, filled)
    else:
        assert (mean - filled).abs()[mask["mask"].expand_as(mean) == 0].mean() > 1e-3


def test_the_dataset_default_is_the_encoder_and_latent_optimisation_is_one_flag_away(tmp_path):
    from rsd_cli.main import build_parser
    from rsd_cli.restore_cmd import _config
    from rsd_core.restore.encoder import EncoderConfig
    from rsd_core.restore.estimate import LATENT_OPTIMISATION, RestoreConfig

    def config(*flags: str) -> RestoreConfig:
        return _config(build_parser().parse_args(["restore", "--model", CHAMPION, "--dataset", str(tmp_path),
                                                  "--out", str(tmp_path / "o"), *flags]))

    assert config() == RestoreConfig() and RestoreConfig().encoder == EncoderConfig() and RestoreConfig().steps == 0
    assert RestoreConfig().encoder.target == "image"  # the posterior-mean network
    from_noise = config("--encoder", "none", "--steps", "30")  # restarts unset: LATENT_RESTARTS
    assert from_noise.updated(restarts=from_noise.latent_restarts) == LATENT_OPTIMISATION
    tuned = config("--encoder", "{steps: 500, target: latent}", "--restarts", "1")
    assert tuned.encoder == EncoderConfig(steps=500, target="latent") and (tuned.steps, tuned.restarts) == (0, 1)


def test_a_forward_model_other_than_the_datasets_is_refused():
    """A blur of another width passes the kind and shape checks but would fit the wrong A."""
    from rsd_core.restore.dataset import RestoreInputError, check_restorable
    from rsd_core.stages import ModelCard

    with tempfile.TemporaryDirectory() as tmp:
        ds = open_dataset(_blur_dataset(Path(tmp) / "d", ""))
        card = ModelCard(kind="generator", network=NetworkConfig(), operator={"kind": "blur", "std": 2.0},
                         image_shape=(1, 32, 32), objective="blur")
        with pytest.raises(RestoreInputError, match="forward model .* differs from the dataset's"):
            check_restorable(card, "m", ds)
        check_restorable(card.model_copy(update={"operator": ds.manifest.operator}), "m", ds)


def _pyfunc(out: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        return mlflow.pyfunc.load_model(CHAMPION)


def test_registered_model_has_a_pyfunc_flavour_that_samples_and_restores(trained):
    from mlflow.exceptions import MlflowException

    from rsd_cli.pipeline_cmd import _sample_registered
    from rsd_core.restore.estimate import LATENT_OPTIMISATION

    out, dataset = trained
    model = _pyfunc(out)
    assert {"pytorch", "python_function"} <= set(model.metadata.flavors)
    with pytest.MonkeyPatch.context() as mp:  # MLflow 3: every logged model carries its request's example
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        local = mlflow.artifacts.download_artifacts(artifact_uri=CHAMPION)
    assert list(model.metadata.load_input_example(local)) == ["count"]
    assert model.metadata.load_input_example_params(local) == {"seed": 0}
    images = model.predict({"count": np.array([3])}, params={"seed": 5})["images"]
    assert images.shape == (3, 1, 32, 32) and np.isfinite(images).all()
    with pytest.MonkeyPatch.context() as mp:  # `rsd sample`'s path through the pytorch flavour: same draws
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
        np.testing.assert_allclose(images, _sample_registered(CHAMPION, 3, 5).numpy(), atol=1e-6)
    eps, u = np.random.default_rng(0).standard_normal((2, 1, 32, 32), dtype=np.float32), np.zeros((2, 1, 32, 32))
    given = model.predict({"eps": eps, "u": u.astype(np.float32)})["images"]
    assert given.shape == (2, 1, 32, 32)

    # A request has no dataset to fit the amortised encoder on: its restorations are latent optimisation.
    defaults = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert defaults["steps"] == LATENT_OPTIMISATION.steps and "encoder" not in defaults
    y, state, _ = open_dataset(dataset).read_all()
    restored = model.predict({"observations": y[:4].numpy(), "mask": state["mask"][:4].numpy()},
                             params={"steps": 3, "restarts": 2})
    assert restored["mean"].shape == restored["spread"].shape == (4, 1, 32, 32)
    observed = np.broadcast_to(state["mask"][:4].numpy(), restored["mean"].shape) > 0
    np.testing.assert_allclose(restored["mean"][observed], y[:4].numpy()[observed], atol=1e-5)
    with pytest.raises(MlflowException, match=r"need their per-sample state \['mask'\]"):
        model.predict({"observations": y[:2].numpy()})


def _refused(url: str, body: dict) -> tuple[int, str]:
    """The status and body of a request the server refuses."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        post_json(url, body)
    return refused.value.code, refused.value.text


def test_rsd_serve_answers_sampling_and_restoration_requests_within_its_limits(trained, scratch):
    out, dataset = trained
    y, state, _ = open_dataset(dataset).read_all()
    with served(CHAMPION, out, scratch, "--max-rows", "8", "--max-batch", "2") as url:
        sampled = post_json(url, {"inputs": {"count": [5]}, "params": {"seed": 5}})["predictions"]
        expected = _pyfunc(out).predict({"count": np.array([5])}, params={"seed": 5})["images"]
        np.testing.assert_allclose(np.asarray(sampled["images"], dtype=np.float32), expected, atol=1e-5)
        body = {"inputs": {"observations": y[:2].tolist(), "mask": state["mask"][:2].tolist()},
                "params": {"steps": 2, "batch_size": 2}}
        restored = post_json(url, body)["predictions"]
        assert np.asarray(restored["mean"]).shape == np.asarray(restored["spread"]).shape == (2, 1, 32, 32)
        refusals = [
            ({"inputs": {"observations": y[:1].tolist()}}, "['mask']"),
            ({"inputs": {"count": [9]}}, "9 samples exceed this server's limit of 8 per request"),
            ({"inputs": {"observations": y[:1].tolist(), "mask": state["mask"][:1, :, :16, :16].tolist()}},
             "input 'mask' has shape [1, 1, 16, 16]; expected [rows, 1, 32, 32]"),
        ]
        for request, message in refusals:
            code, text = _refused(url, request)
            assert code == 400 and message in text and "Traceback" not in text, text


def test_rsd_serve_serves_the_registered_restorer_as_rsd_restore_restored(trained, scratch, restored):
    out, dataset = trained
    y, state, _ = open_dataset(dataset).read_all()
    mean, _, _ = open_dataset(str(restored[0])).read_all()
    with served(_restorer_uri(dataset), out, scratch, "--max-rows", "16") as url:
        answer = post_json(url, {"inputs": {"observations": y[:16].tolist(), "mask": state["mask"][:16].tolist()}})
        np.testing.assert_allclose(np.asarray(answer["predictions"]["mean"], np.float32), mean[:16].numpy(),
                                   atol=1e-5)
        code, text = _refused(url, {"inputs": {"observations": y[:17].tolist(), "mask": state["mask"][:17].tolist()}})
        assert code == 400 and "17 observations exceed this server's limit of 16" in text and "Traceback" not in text


def test_shard_results_are_written_only_in_row_order(tmp_path):
    """The map task's results are zipped back by position: a part out of order is refused, not misfiled."""
    from safetensors.torch import save_file

    from rsd_core.restore.dataset import _batches

    parts = []
    for start in (0, 4):
        parts.append(tmp_path / f"{start}.safetensors")
        save_file({"index": torch.arange(start, start + 4), "mean": torch.zeros(4, 1, 2, 2)}, str(parts[-1]))
    assert [len(images) for images, _, _ in _batches(parts, "mean")] == [4, 4]
    with pytest.raises(ValueError, match="out of row order"):
        list(_batches(parts[::-1], "mean"))


def test_the_spreads_calibration_is_measured_on_the_clean_split(tmp_path):
    """Means that miss the clean images by Gaussian errors of std s, reported with spread s: 95.4% of the clean
    pixels lie within 2 spreads; reported with spread s / 2, 68.3%. Pixels of zero spread (measured, put
    back) do not count."""
    from safetensors.torch import save_file

    from rsd_core.restore.dataset import write_restored

    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(64, 1, 32, 32, generator=gen) - 0.5  # errors of 0.1 keep the means inside [-1, 1]
    write_dataset(str(tmp_path / "clean"), clean, name="clean", image_shape=(1, 32, 32),
                  operator={"kind": "identity"})
    write_dataset(str(tmp_path / "obs"), clean, name="obs", image_shape=(1, 32, 32), operator={"kind": "identity"},
                  clean_eval_uri=str(tmp_path / "clean"))
    source = open_dataset(str(tmp_path / "obs"))
    spread = torch.full_like(clean, 0.1)
    spread[..., :16, :] = 0.0  # "measured" rows: exact, no spread
    mean = clean + spread * torch.randn(clean.shape, generator=gen)
    for name, reported in (("right", spread), ("half", spread / 2)):
        part = tmp_path / f"{name}.safetensors"
        save_file({"index": torch.arange(64), "mean": mean, "spread": reported, "misfit": torch.zeros(64)},
                  str(part), metadata={"seconds": "1.0"})
        metrics = write_restored(str(tmp_path / f"restored-{name}"), [part], source, {}).metrics
        expected = 0.954 if name == "right" else 0.683
        assert abs(metrics["eval/coverage_2sd"] - expected) < 0.01, (name, metrics)


@pytest.mark.slow
def test_rsd_restore_reads_and_writes_s3(trained, scratch, s3_server, monkeypatch):
    """The dataset, its clean split and the restoration on a real S3 server (seaweedfs)."""
    out, dataset = trained
    root, env = scratch
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    obs = f"s3://{s3_server.bucket}/restore/obs"
    source = open_dataset(dataset)
    clean = source.clean_eval()
    write_dataset(f"{obs}/clean_eval", *clean.read_all(), name=clean.manifest.name, image_shape=(1, 32, 32),
                  operator={"kind": "identity"})
    y, state, labels = source.read_all()
    write_dataset(obs, y, state, labels, name=source.manifest.name, image_shape=(1, 32, 32),
                  operator=source.manifest.operator, clean_eval_uri="clean_eval", rows_per_shard=32,
                  rows_per_group=16)
    restored = f"s3://{s3_server.bucket}/restore/restored"
    stdout = _rsd({**env, **s3_server.env()}, "restore", "--model", CHAMPION, "--dataset", obs, "--out", restored,
                  "--out-dir", str(out), "--encoder", "{steps: 3, width: 8, target: latent}", "--steps", "2",
                  "--experiment", "rsd-restore-s3").stdout  # the latent encoder, refined: the other path
    assert f"restored dataset  {restored}" in stdout and f"the {CLEAN_ROWS} rows" in stdout
    result = open_dataset(restored, verify=True)
    assert len(result) == ROWS and len(open_dataset(f"{restored}/spread")) == ROWS
    assert result.manifest.provenance["source"]["uri"] == obs
    refused = _rsd({**env, **s3_server.env()}, "restore", "--model", CHAMPION, "--dataset", obs, "--out", restored,
                   "--out-dir", str(out), ok=False)
    assert "already holds a dataset" in refused.stderr
