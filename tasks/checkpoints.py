"""Training checkpoints that survive a Flyte retry on a new pod.

A task's working directory dies with its pod, so a retry would start training from step 0.
Flyte gives every attempt a checkpoint location (``current_context().checkpoint``) and hands the
previous attempt's location to the next one. :class:`AttemptCheckpoints` keeps that location a
mirror of the local checkpoints folder while training runs, and at start-up restores the previous
attempt's checkpoints, so the shared training loop resumes from the last one it finds.

Why a mirror and not ``Checkpoint.save(folder)``: ``save`` uploads the whole folder each time
(quadratic in the number of checkpoints that distillation keeps for selection) and never
deletes the ones the teacher's loop pruned. Each checkpoint's ``meta.json`` is uploaded after its
weights, so a pod killed mid-upload leaves a folder that :func:`rsd_core.train.loop.list_checkpoints`
skips as incomplete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from flytekit.core.checkpointer import Checkpoint
from flytekit.core.context_manager import FlyteContextManager

from rsd_core.train.loop import list_checkpoints

_FILES = ("weights.safetensors", "meta.json")  # upload order: meta.json last marks a folder complete


def _rank() -> int:
    """The launcher's rank (the process group may not be initialised yet when restoring)."""
    return int(os.environ.get("RANK", "0"))


class AttemptCheckpoints:
    """Restore from the previous attempt and mirror new checkpoints to this attempt's location."""

    def __init__(self, checkpoint: Checkpoint | None, local_dir: Path):
        self.local_dir = Path(local_dir)
        # flytekit has no public accessor for these; SyncCheckpoint is the one implementation.
        self.dest: str | None = getattr(checkpoint, "_checkpoint_dest", None) if checkpoint else None
        self.checkpoint = checkpoint
        self._published: set[str] = set()

    def _fs(self) -> Any:
        return FlyteContextManager.current_context().file_access.get_filesystem_for_path(self.dest)

    def restore(self) -> list[str]:
        """Download the previous attempt's complete checkpoints into ``local_dir``; their names.

        Every rank restores (each loads the latest); rank 0 alone publishes them to this attempt's
        location at once, so a third attempt still finds them.
        """
        if self.checkpoint is None or not self.checkpoint.prev_exists():
            return []
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint.restore(self.local_dir)
        for partial in {p for p in self.local_dir.glob("step-*")} - set(list_checkpoints(self.local_dir)):
            shutil.rmtree(partial, ignore_errors=True)  # killed mid-upload: not a checkpoint
        if _rank() == 0:
            self(self.local_dir)
        return [p.name for p in list_checkpoints(self.local_dir)]

    def __call__(self, checkpoints_dir: Path) -> None:
        """Make this attempt's location hold exactly the complete checkpoints of ``checkpoints_dir``."""
        if self.dest is None:
            return
        fs, dest = self._fs(), self.dest.rstrip("/")
        local = {p.name: p for p in list_checkpoints(Path(checkpoints_dir))}
        for name in sorted(self._published - local.keys()):  # pruned by the training loop
            fs.rm(f"{dest}/{name}", recursive=True)
            self._published.discard(name)
        for name, folder in local.items():
            if name in self._published:
                continue
            for file in _FILES:
                fs.put_file(str(folder / file), f"{dest}/{name}/{file}")
            self._published.add(name)
