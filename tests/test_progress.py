"""Training shows its progress: a bar on a terminal, plain timed lines when stdout is a file or pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from rsd_core.train.progress import format_duration

# A 30-step teacher on random 8x8 data, through the shared Trainer (what every training task runs).
SCRIPT = """
import torch
from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.kinds import build_operator, objective_for
from rsd_core.train.pretrain import TensorSource, build_teacher, pretrain_teacher
objective = objective_for(build_operator({"kind": "identity"}))
net = build_teacher(NetworkConfig(img_resolution=8, model_channels=8, channel_mult=(1,), attn_resolutions=()),
                    objective)
cfg = TrainConfig(steps=30, batch_size=4, checkpoint_every=30, precision="fp32")
pretrain_teacher(net, objective, TensorSource(torch.rand(64, 1, 8, 8) * 2 - 1, {}), cfg, None)
"""


def _env(interval: str) -> dict[str, str]:
    return {**os.environ, "RSD_PROGRESS_INTERVAL": interval, "OMP_NUM_THREADS": "1"}


def _run_piped(interval: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(interval), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("[pretrain]")]


def test_piped_output_gets_plain_lines_at_the_interval_with_rate_loss_and_eta():
    every = _run_piped("0")
    assert [line.split()[2] for line in every] == [f"{k}/30" for k in range(1, 31)]
    assert all("img/s" in line and "loss " in line and "ETA" in line for line in every)
    assert "\r" not in "".join(every)
    sparse = _run_piped("1e9")  # the first and the last step only
    assert [line.split()[2] for line in sparse] == ["1/30", "30/30"]


def test_a_terminal_gets_a_live_bar_instead():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 rows, 120 columns
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=_env("0"), stdout=follower,
                            stderr=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    out = b"".join(chunks).decode(errors="replace")
    assert "pretrain:" in out and "img/s" in out and "30/30" in out and "ETA" in out
    assert "[pretrain] step" not in out


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (0, 59.4, 95, 3600, 4000)] == ["0s", "59s", "1m35s", "1h00m", "1h06m"]
