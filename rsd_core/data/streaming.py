"""Streaming a corrupted dataset into training with bounded memory.

The dataset is read row group by row group into a fixed-size shuffle buffer, so memory is
set by ``shuffle_buffer`` and the read batch size, not by the dataset size. Row groups
(the unit of work) are dealt round-robin over every (DDP rank, DataLoader worker) pair, so
each row is read by exactly one reader per epoch, and the order depends only on
``seed``, the epoch and the number of readers.

:class:`StreamSource` is what training reads: epochs chained without end, batches prefetched
by DataLoader workers, and positioned by the number of batches already drawn, so a resumed run
sees exactly the batches an uninterrupted one would (replaying at most one epoch per reader).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from rsd_core.data.reader import CorruptedDataset, open_dataset

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
        return self.epoch_rows(*self._reader())

    def epoch_rows(self, reader: int, readers: int) -> Iterator[Sample]:
        """One epoch of one reader's rows, shuffled through the buffer."""
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


class _EndlessReader(IterableDataset):
    """Every DataLoader worker streams its own rows epoch after epoch, starting ``start_rows[worker]``
    rows into its stream (rows of its earlier epochs are skipped by epoch, not read).

    A DataLoader takes batch ``i`` from its worker ``i mod workers``; a loader restarted after ``n``
    batches must begin with stream ``n mod workers``, so its worker ``j`` plays stream
    ``(j + first) mod workers``."""

    def __init__(self, stream: StreamingDataset, rank: int, world_size: int, workers: int, start_rows: list[int],
                 unit_rows: dict[tuple[int, int], int], first: int = 0):
        super().__init__()
        self.stream, self.rank, self.world_size, self.workers = stream, rank, world_size, workers
        self.start_rows, self.unit_rows, self.first = start_rows, unit_rows, first

    def rows_per_epoch(self, reader: int, readers: int) -> int:
        """Rows this reader streams in the current epoch (its units change with the epoch's shuffle)."""
        return sum(self.unit_rows[unit] for unit in self.stream.units_for(reader, readers))

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % self.workers
        reader, readers = self.rank * self.workers + worker, self.world_size * self.workers
        epoch, skip = 0, self.start_rows[worker]
        while True:  # which epoch the start falls in: row counts from the footers, nothing is read
            self.stream.set_epoch(epoch)
            per_epoch = self.rows_per_epoch(reader, readers)
            if skip < per_epoch:
                break
            epoch, skip = epoch + 1, skip - per_epoch
        while True:
            self.stream.set_epoch(epoch)
            for i, row in enumerate(self.stream.epoch_rows(reader, readers)):
                if i >= skip:
                    yield row
            epoch, skip = epoch + 1, 0


class StreamSource:
    """Training batches streamed from a dataset's shards (a ``BatchSource`` for the pretraining phase).

    Memory is bounded by the shuffle buffers and the prefetch queue, not the dataset size. Each DDP
    rank (``rank``/``world_size``, default torch.distributed's) and each of its ``workers`` DataLoader
    processes read disjoint row groups; batch ``i`` comes from worker ``i mod workers``. ``seek(n)``
    positions the stream after ``n`` batches, which the trainer calls on resume.
    """

    def __init__(self, dataset: CorruptedDataset | str, *, seed: int = 0, shuffle_buffer: int = 4096,
                 workers: int = 1, prefetch_batches: int = 4, rank: int | None = None,
                 world_size: int | None = None, storage_options: Mapping[str, Any] | None = None):
        if isinstance(dataset, str):
            dataset = open_dataset(dataset, storage_options)
        self.stream = StreamingDataset(dataset, shuffle=True, shuffle_buffer=shuffle_buffer, seed=seed)
        # None: torch.distributed's, read on the first batch (the trainer joins the process group first)
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.prefetch_batches = prefetch_batches
        self.batches_done = 0
        self._batch_size: int | None = None
        self._iter: Iterator | None = None
        self._unit_rows: dict[tuple[int, int], int] | None = None

    def seek(self, batches_done: int) -> None:
        """Continue after ``batches_done`` batches (of the batch size of the next call)."""
        self.batches_done = batches_done
        self._iter = None

    def _start(self, batch_size: int) -> None:
        from torch.utils.data import DataLoader

        if self.rank is None:
            initialised = dist.is_available() and dist.is_initialized()
            self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
        workers = max(1, self.workers)
        dataset = self.stream.dataset
        if len(dataset.units()) < self.world_size * workers:
            raise ValueError(
                f"{dataset.uri}: {len(dataset.units())} row groups for {self.world_size * workers} readers "
                "(ranks x data workers): write the dataset with smaller row groups or use fewer workers"
            )
        per_worker = [len(range(w, self.batches_done, workers)) * batch_size for w in range(workers)]
        if self._unit_rows is None:
            self._unit_rows = self.stream.dataset.units_rows()
        reader = _EndlessReader(self.stream, self.rank, self.world_size, workers, per_worker, self._unit_rows,
                                first=self.batches_done % workers)
        kwargs = {"num_workers": self.workers, "prefetch_factor": self.prefetch_batches, "persistent_workers": True} \
            if self.workers > 0 else {}
        self._iter = iter(DataLoader(reader, batch_size=batch_size, **kwargs))
        self._batch_size = batch_size

    def next_batch(self, batch_size: int, rng: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next batch (``rng`` is unused: the order is fixed by the seed and the position)."""
        if self._iter is None or batch_size != self._batch_size:
            self._start(batch_size)
        obs, state, _ = next(self._iter)
        self.batches_done += 1
        return obs, state
