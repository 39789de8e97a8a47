"""Running the installed ``rsd`` console script as a user would, for the pipeline tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def scratch_env(root: Path) -> dict[str, str]:
    """A subprocess environment in ``root``: scratch HOME/TMPDIR, one thread, no inherited tracking or Flyte
    settings, no Flyte task cache, this venv's ``rsd`` first on PATH."""
    for sub in ("home", "tmp"):
        (root / sub).mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYTE_", "RSD_"))}
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), OMP_NUM_THREADS="1",
               FLYTE_LOCAL_CACHE_ENABLED="false", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def rsd_streams(env: dict[str, str], *args: str, timeout: float = 300) -> tuple[str, str]:
    """Run ``rsd *args`` in ``env`` (cwd = its TMPDIR); (stdout, stderr), or a failure showing both."""
    proc = subprocess.run([str(BIN / "rsd"), *args], env=env, cwd=env["TMPDIR"], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout, proc.stderr


def rsd(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run ``rsd *args`` in ``env`` (cwd = its TMPDIR); its stdout, or a failure showing both streams."""
    return rsd_streams(env, *args, timeout=timeout)[0]
