"""Streaming a corrupted dataset into training with bounded memory.

The dataset is read row group by row group into a fixed-size shuffle buffer, so memory is
set by ``shuffle_buffer`` and the read batch size, not by the dataset size. Row groups
(the unit of work) are dealt round-robin over every (DDP rank, DataLoader worker) pair, so
each row is read by exactly one reader per epoch, and the order depends only on
``seed``, the epoch and the number of readers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from rsd_core.data import CorruptedDataset, open_dataset

Sample = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]


class StreamingDataset(IterableDataset):
    """Yields ``(observation (C, H, W), state {key: tensor}, label)`` per row.

    ``label`` is a 0-d int64 tensor, -1 when the dataset has no labels, so the default
    collate works either way. Call :meth:`set_epoch` before each epoch for a new order (with
    ``persistent_workers`` the workers keep the epoch they were started with).
    ``rank``/``world_size`` default to torch.distributed's when it is initialised.
    """

    def __init__(
        self,
        dataset: CorruptedDataset | str,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 2048,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        read_batch_rows: int = 256,
        storage_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if isinstance(dataset, str):
            dataset = open_dataset(dataset, storage_options)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if shuffle_buffer < 1 or read_batch_rows < 1:
            raise ValueError("shuffle_buffer and read_batch_rows must be >= 1")
        self.dataset = dataset
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.read_batch_rows = read_batch_rows
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        """(this reader's id, number of readers) over DDP ranks x DataLoader workers."""
        if self.world_size is not None:
            rank, world = self.rank, self.world_size
        elif dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def units_for(self, reader: int, readers: int) -> list[tuple[int, int]]:
        """The (shard, row group) pairs one reader handles this epoch; the readers partition them."""
        units = self.dataset.units()
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        return units[reader::readers]

    def _rows(self, units: list[tuple[int, int]]) -> Iterator[Sample]:
        has_labels = self.dataset.manifest.has_labels
        for batch in self.dataset.iter_batches(self.read_batch_rows, units):
            for i in range(len(batch.index)):
                # clone() so a buffered row does not keep its whole read batch alive
                label = batch.label[i].clone() if has_labels else torch.tensor(-1, dtype=torch.int64)
                state = {k: v[i].clone() for k, v in batch.state.items()}
                yield batch.observation[i].clone(), state, label

    def __iter__(self) -> Iterator[Sample]:
        reader, readers = self._reader()
        rows = self._rows(self.units_for(reader, readers))
        if not self.shuffle:
            yield from rows
            return
        rng = np.random.default_rng([self.seed, self.epoch, reader])
        buffer: list[Sample] = []
        for row in rows:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(row)
                continue
            slot = int(rng.integers(len(buffer)))
            yield buffer[slot]
            buffer[slot] = row
        for slot in rng.permutation(len(buffer)):
            yield buffer[slot]
