"""Where a task writes: a fresh working folder, outputs uploaded under the raw-output prefix, the execution's name.

Shared by the pipeline's and the restoration's tasks; everything here needs a running Flyte task context.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flytekit import current_context
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.data_persistence import FileAccessProvider
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile


def workdir(name: str) -> Path:
    """A fresh folder in the task's working directory (local map-task elements share that directory)."""
    root = Path(current_context().working_directory)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))


def _remote_outputs() -> FileAccessProvider | None:
    """The file access of a run whose raw-output prefix is remote (a cluster, or ``rsd run --raw-output-prefix``).

    flytekit uploads a local path returned by a task only outside local execution; a local run with
    a remote prefix uploads explicitly, so tasks exchange their outputs through the object store as
    they do on a cluster.
    """
    access = FlyteContextManager.current_context().file_access
    return access if access.is_remote(access.raw_output_prefix) else None


def out_dir(path: str | Path) -> FlyteDirectory:
    """A task's output folder, uploaded under the raw-output prefix when that is remote."""
    access = _remote_outputs()
    return FlyteDirectory(str(path), remote_directory=access.get_random_remote_directory() if access else None)


def out_file(path: str | Path) -> FlyteFile:
    """A task's output file, uploaded under the raw-output prefix when that is remote."""
    access = _remote_outputs()
    return FlyteFile(str(path), remote_path=access.get_random_remote_path(Path(path).name) if access else None)


def execution_name() -> str:
    """The Flyte execution's name ("local" for local runs)."""
    return current_context().execution_id.name
