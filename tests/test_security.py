"""Security rules enforced by scanning the code, not by review:

* no ``torch.load`` without ``weights_only=True`` (a pickle in a checkpoint runs arbitrary code);
* no hard-coded AWS credentials in anything tracked (or about to be: untracked, not ignored);
* credentials reach storage only through the environment and never land in what we write
  (dataset manifests, MLflow params and tags).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from rsd_core.data.reader import open_dataset
from rsd_core.data.storage import storage_options_from_env
from tests.ci import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", ".flyte-tmp", "outputs", "build", "dist", "node_modules", "__pycache__"}

# Built from parts so this file does not match its own patterns.
AWS_KEY_ID = re.compile("AKIA" + "[0-9A-Z]{16}")
AWS_SECRET_ASSIGNMENT = re.compile(r"aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])",
                                   re.IGNORECASE)
FAKE_KEY_ID = "AKIA" + "TESTONLYNOTREAL1"
FAKE_SECRET = "rsd-fake-secret-" + "x" * 24


def python_files() -> list[Path]:
    """Every .py file of the repository (virtualenvs, scratch and output folders excluded)."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found)


def unsafe_torch_loads(source: str) -> list[int]:
    """Line numbers of ``torch.load(...)`` (or a bare ``load`` imported from torch) without
    ``weights_only=True`` given as a literal."""
    tree = ast.parse(source)
    bare = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module == "torch" for alias in node.names if alias.name == "load"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_torch_load = (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                         and func.value.id == "torch") or (isinstance(func, ast.Name) and func.id in bare)
        if not is_torch_load:
            continue
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in node.keywords)
        if not safe:
            lines.append(node.lineno)
    return lines


def test_the_scan_sees_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p in python_files()}
    assert {"rsd_core/train/loop.py", "rsd_core/stages.py", "tests/test_security.py"} <= files
    assert not any(f.startswith(".venv/") for f in files)


def test_unsafe_torch_load_detector():
    assert unsafe_torch_loads("import torch\ntorch.load('x')\n") == [2]
    assert unsafe_torch_loads("import torch\ntorch.load('x', weights_only=False)\n") == [2]
    assert unsafe_torch_loads("from torch import load as L\nL('x')\n") == [2]
    assert unsafe_torch_loads("import torch\ntorch.load('x', map_location='cpu', weights_only=True)\n") == []


def test_no_torch_load_without_weights_only():
    offenders = []
    for path in python_files():
        for line in unsafe_torch_loads(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def source_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (what the next commit may contain)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        skip_unless_ci("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def test_credential_patterns_catch_examples():
    assert AWS_KEY_ID.search(f"key = '{FAKE_KEY_ID}'")
    assert AWS_SECRET_ASSIGNMENT.search("aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY")
    assert not AWS_SECRET_ASSIGNMENT.search("AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY}")


def test_no_hard_coded_credentials_in_source():
    offenders = []
    for path in source_files():
        if path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (PNG, parquet): not source
        for pattern in (AWS_KEY_ID, AWS_SECRET_ASSIGNMENT):
            for match in pattern.finditer(text):
                if match.group(0) == FAKE_KEY_ID:
                    continue
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, f"hard-coded AWS credentials: {offenders}"


@pytest.fixture
def fake_aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("RSD_S3_ENDPOINT_URL", raising=False)


def test_storage_options_come_from_the_environment(fake_aws_env, monkeypatch):
    assert storage_options_from_env("s3://bucket/data") == {
        "key": FAKE_KEY_ID, "secret": FAKE_SECRET, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    monkeypatch.setenv("RSD_S3_ENDPOINT_URL", "http://127.0.0.1:10")
    assert storage_options_from_env("s3://bucket/data")["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:10"}
    assert storage_options_from_env("/local/path") == {}  # never sent anywhere but S3


def _tiny(path_or_uri: str, storage_options=None):
    from tests.faults import write_tiny_dataset

    return write_tiny_dataset(path_or_uri, storage_options=storage_options)


def test_local_manifest_holds_no_credentials(fake_aws_env, tmp_path):
    _tiny(str(tmp_path / "ds"))
    text = (tmp_path / "ds" / "manifest.json").read_text()
    assert FAKE_KEY_ID not in text and FAKE_SECRET not in text


def test_s3_dataset_written_with_env_credentials_stores_none_of_them(s3_server, monkeypatch):
    """The real path: credentials in the environment, dataset on S3, manifest scanned for them."""
    import fsspec

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3_server.bucket}/security-{os.getpid()}"
    _tiny(uri)  # storage options from the environment
    ds = open_dataset(uri)
    fs = fsspec.filesystem("s3", **storage_options_from_env(uri))
    text = fs.cat_file(f"{uri.removeprefix('s3://')}/manifest.json").decode()
    assert s3_server.secret_key not in text and s3_server.access_key not in text
    assert s3_server.secret_key not in json.dumps(ds.manifest.model_dump(mode="json"))


def test_mlflow_params_and_tags_hold_no_credentials(fake_aws_env, tmp_path, monkeypatch):
    """The execution's run logs the whole config as params: no environment secret may ride along."""
    pytest.importorskip("mlflow")
    from rsd_core.presets import build_config
    from tasks import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = build_config("cpu-smoke")
    run_id = tracking.start_parent_run("security", "scan", config.model_dump(mode="json"),
                                       {"rsd.code_version": tracking.code_version()})
    run = tracking.client().get_run(run_id)
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert run.data.params, "nothing was logged: the scan would be vacuous"
    assert FAKE_KEY_ID not in logged and FAKE_SECRET not in logged

