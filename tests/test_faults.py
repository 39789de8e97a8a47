"""Fault injection, the fast subset of ``python -m benchmarks.faults`` (which prints the full table).

The scenarios and malformed inputs are defined once, in tests/faults.py, so the table and
these tests cannot drift apart. CLI cases run in-process (one ``rsd`` process per case would
cost ~3 s each); one case also runs as a real process to prove no traceback reaches stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from rsd_cli.main import main
from tests import faults

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow  # three training processes (~20 s on 2 cores)
def test_kill_9_mid_run_resumes_from_last_checkpoint(tmp_path):
    r = faults.kill_and_resume(tmp_path)
    assert r["returncode"] == -9
    assert 0 <= r["lost"] <= faults.KILL_EVERY, r  # at most one checkpoint interval lost
    assert r["resumed_from"] < faults.KILL_STEPS  # it really was killed mid-run
    assert r["resumed_steps"] == r["straight_steps"] == faults.KILL_STEPS
    assert r["identical"], "resumed teacher differs from the uninterrupted one"


def test_nan_batches_are_skipped_and_persistent_nans_stop_cleanly(tmp_path):
    rows = list(faults.nan_scenarios(tmp_path))
    assert [r.outcome for r in rows] == [faults.RECOVERED, faults.CLEAR], rows


# --------------------------------------------------------------------------- malformed inputs through the CLI


@pytest.mark.parametrize("case", faults.CLI_CASES, ids=[c.name for c in faults.CLI_CASES])
def test_malformed_input_is_one_line_error_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = faults.cli_argv(case, tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert faults.check_cli_output(case, code, err, tmp_path / "out") is None, err


def test_cli_errors_carry_no_traceback_in_a_real_process(tmp_path):
    case = next(c for c in faults.CLI_CASES if "NaN" in c.name)
    argv = faults.cli_argv(case, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "rsd_cli.main", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert faults.check_cli_output(case, proc.returncode, proc.stderr, None) is None, proc.stderr


def test_there_are_at_least_12_cli_cases():
    assert len(faults.CLI_CASES) >= 12


# --------------------------------------------------------------------------- S3 on the real server


@pytest.fixture
def s3(s3_server):
    """(good storage options, URI of a freshly written tiny dataset)."""
    good = {"key": s3_server.access_key, "secret": s3_server.secret_key,
            "client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    uri = f"s3://{s3_server.bucket}/faults-{uuid.uuid4().hex[:8]}"
    faults.write_tiny_dataset(uri, storage_options=good)
    return good, uri


def test_s3_wrong_credentials_name_the_uri(s3):
    good, uri = s3
    row = faults.s3_wrong_credentials(uri, {**good, "secret": "not-the-secret"})
    assert row.outcome == faults.CLEAR, row.detail


def test_s3_wrong_credentials_fail_without_traceback(s3, monkeypatch, capsys, tmp_path):
    """Whatever the message, the CLI must answer a rejected secret with one line and exit 2."""
    good, uri = s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", good["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", good["client_kwargs"]["endpoint_url"])
    code = main(["data", "inspect", uri, "--grid", str(tmp_path / "g.png")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines


def test_s3_missing_bucket_names_the_uri(s3):
    from rsd_core.data.manifest import DatasetError
    from rsd_core.data.reader import open_dataset

    good, _ = s3
    missing = f"s3://rsd-missing-{uuid.uuid4().hex[:8]}/data"
    with pytest.raises(DatasetError, match=missing):
        open_dataset(missing, good)


def test_s3_interrupted_write_leaves_no_manifest(s3):
    import fsspec

    good, uri = s3
    row = faults.s3_interrupted_write(uri + "-partial", good, fsspec.filesystem("s3", **good))
    assert row.outcome == faults.CLEAR, row.detail


# --------------------------------------------------------------------------- MLflow registration


def test_mlflow_down_is_a_bounded_clear_error_that_keeps_the_export(tmp_path):
    pytest.importorskip("mlflow")
    row = faults.mlflow_down_scenario(tmp_path)
    assert row.outcome == faults.CLEAR, row.detail


@pytest.mark.slow
def test_racing_registrations_leave_the_better_champion(tmp_path):
    pytest.importorskip("mlflow")
    row = faults.mlflow_race_scenario(tmp_path)
    assert row.outcome == faults.RECOVERED, row.detail
