"""Training progress a person can follow: a live bar on a terminal, plain lines everywhere else.

On a terminal, a tqdm bar shows step/total, images/s, the losses and an ETA that accounts for
the time budget. When stdout is not a terminal (Flyte pod logs, CI, ``rsd run > log``), a bar
would be a stream of carriage returns, so one plain line is printed for the first step, then at
most every ``RSD_PROGRESS_INTERVAL`` seconds (default 30), and for the last step:

    [pretrain] step 1200/100000  84.1 img/s  loss 0.8123  elapsed 3m10s  ETA 6m50s
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

DEFAULT_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """``95`` -> ``1m35s``; ``4000`` -> ``1h06m``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _live_terminal(stream: TextIO) -> bool:
    """A terminal a bar can be drawn on (a pty of zero columns, as some CI runners give, is not one)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return False


class TrainingProgress:
    """Reports a training phase's progress; ``enabled=False`` makes every call a no-op (other ranks)."""

    def __init__(self, name: str, start: int, total: int, batch_size: int, time_budget_s: float | None,
                 enabled: bool = True, stream: TextIO | None = None, interval_s: float | None = None):
        self.name, self.start, self.total, self.batch_size = name, start, total, batch_size
        self.time_budget_s = time_budget_s
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        env = os.environ.get("RSD_PROGRESS_INTERVAL")
        self.interval_s = interval_s if interval_s is not None else float(env) if env else DEFAULT_INTERVAL_S
        self.t0 = time.perf_counter()
        self.last_line = -float("inf")
        self.bar = None
        if enabled and _live_terminal(self.stream):
            self.bar = tqdm(total=total, initial=start, desc=name, file=self.stream, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def _figures(self, done: int, metrics: dict[str, float]) -> tuple[float, str, str]:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) * self.batch_size / elapsed if elapsed > 0 else 0.0
        steps_per_s = (done - self.start) / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - done) / steps_per_s if steps_per_s > 0 else float("inf")
        if self.time_budget_s is not None:
            remaining = min(remaining, max(0.0, self.time_budget_s - elapsed))
        losses = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("loss"))
        eta = format_duration(remaining) if remaining != float("inf") else "?"
        return rate, losses, f"elapsed {format_duration(elapsed)}  ETA {eta}"

    def update(self, done: int, metrics: dict[str, float], last: bool = False) -> None:
        """Call after every step with the number of steps done; ``last`` for the final one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if done % 10 == 0 or last:
                rate, losses, times = self._figures(done, metrics)
                self.bar.set_postfix_str(f"{rate:.1f} img/s  {losses}  {times}", refresh=True)
            return
        now = time.perf_counter()
        if done == self.start + 1 or last or now - self.last_line >= self.interval_s:
            rate, losses, times = self._figures(done, metrics)
            print(f"[{self.name}] step {done}/{self.total}  {rate:.1f} img/s  {losses}  {times}",
                  file=self.stream, flush=True)
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
