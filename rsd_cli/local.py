"""What every `rsd` subcommand that runs tasks locally shares: one outputs folder for the MLflow store,
Flyte's sandbox, its task cache and temporary files; where task outputs go; the help layout."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where the help already says its default or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default:" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "outputs"


def prepare_outputs(out: Path, cache: bool) -> None:
    """Point MLflow, Flyte's sandbox, Flyte's local task cache and TMPDIR into ``out``
    (MLFLOW_TRACKING_URI, if set, wins for tracking)."""
    from tasks import tracking  # no flytekit import: TMPDIR must be set first

    out = out.resolve()
    sandbox_existed = (out / "flyte-sandbox").is_dir()
    for sub in ("tmp", "flyte-sandbox"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    os.environ[tracking.OUTPUTS_ENV] = str(out)
    os.environ["TMPDIR"] = str(out / "tmp")
    os.environ["FLYTE_SDK_LOCAL_SANDBOX"] = str(out / "flyte-sandbox")
    os.environ["FLYTE_LOCAL_CACHE_ENABLED"] = "true" if cache else "false"
    tempfile.tempdir = None
    if cache:
        scope_task_cache(task_cache_dir(out, tracking.tracking_uri()), outputs_exist=sandbox_existed)


def task_cache_dir(out: Path, tracking_uri: str) -> Path:
    """Flyte's local task cache for this outputs folder *and* tracking store.

    flytekit keeps one cache in the home folder for every run; its entries point at task outputs
    under some ``--out`` and at MLflow runs in some store, so a run with another ``--out``, a deleted
    one or another tracking store got outputs that no longer exist or live elsewhere."""
    import hashlib

    return out / "flyte-cache" / hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]


@contextlib.contextmanager
def stale_cache_explained(out: Path) -> Iterator[None]:
    """A cached task output that points at a deleted path under ``out`` becomes one line saying how to
    clear the cache, instead of flytekit's type-conversion traceback."""
    try:
        yield
    except Exception as err:
        import re

        missing = [p for p in re.findall(rf"{re.escape(str(out))}[^'\"\s,}}]*", str(err)) if not Path(p).exists()]
        if not missing:
            raise
        raise ValueError(f"a cached task output no longer exists ({missing[0]}): run again with --no-cache, or "
                         f"delete {out / 'flyte-cache'}") from err


def scope_task_cache(cache_dir: Path, outputs_exist: bool) -> None:
    """Use ``cache_dir`` as flytekit's local cache; drop it when the outputs it points at were deleted."""
    import shutil

    from flytekit.core import local_cache

    if cache_dir.exists() and not outputs_exist:
        print(f"cleared the task cache {cache_dir}: the task outputs it pointed at were deleted")
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    local_cache.CACHE_LOCATION = str(cache_dir)
    local_cache.LocalTaskCache._initialized = False  # re-open at the new location on first use


@contextlib.contextmanager
def raw_outputs(prefix: str | None) -> Iterator[None]:
    """Send the tasks' outputs (FlyteDirectory/FlyteFile) to ``prefix`` instead of the local sandbox.

    On a cluster Flyte sets this per execution (``--raw-output-data-prefix``); locally it makes a run
    exercise the same upload-then-download path between tasks, e.g. on S3. S3 credentials and the
    endpoint come from the same environment variables as the datasets'.
    """
    if not prefix:
        yield
        return
    from flytekit.configuration import DataConfig, S3Config
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.data_persistence import FileAccessProvider

    from rsd_core.data.storage import storage_options_from_env

    options = storage_options_from_env(prefix)
    s3 = S3Config(endpoint=options.get("client_kwargs", {}).get("endpoint_url"), access_key_id=options.get("key"),
                  secret_access_key=options.get("secret"))
    ctx = FlyteContextManager.current_context()
    access = FileAccessProvider(ctx.file_access.local_sandbox_dir, prefix, DataConfig(s3=s3))
    with FlyteContextManager.with_context(ctx.with_file_access(access)):
        yield
