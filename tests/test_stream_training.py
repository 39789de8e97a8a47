"""Training streams its data: bounded reads split by rank and worker, across epochs, resumable exactly."""

from __future__ import annotations

import pytest
import torch

from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.data.streaming import StreamSource
from rsd_core.data.writer import write_dataset
from rsd_core.kinds import build_operator
from rsd_core.stages import load_model, pretrain_stage

N, SHAPE = 44, (1, 8, 8)  # 44 rows in groups of 4 (the last group of a shard shorter): epochs end mid-batch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("stream") / "ds")
    spec = {"kind": "inpaint", "p": 0.5}
    op = build_operator(spec)
    rng = torch.Generator().manual_seed(0)
    x = torch.rand((N, *SHAPE), generator=rng) * 2 - 1
    state = op.sample_state(N, SHAPE, rng)
    # the row index is written into the first pixel's observation, so a batch says which rows it holds
    y = op.forward(x, state)
    state["mask"][:, :, 0, 0] = 1.0
    y[:, 0, 0, 0] = torch.arange(N) / N
    write_dataset(uri, y, state, name="stream-test", image_shape=SHAPE, operator=spec, rows_per_shard=12,
                  rows_per_group=4)
    return uri


def _rows(batch: torch.Tensor) -> list[int]:
    return [round(float(v) * N) for v in batch[:, 0, 0, 0]]


def _batches(source: StreamSource, n: int, batch_size: int = 8) -> list[list[int]]:
    return [_rows(source.next_batch(batch_size)[0]) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_epoch_reads_each_row_once_and_a_seek_continues_exactly(dataset, workers):
    straight = _batches(StreamSource(dataset, seed=3, shuffle_buffer=6, workers=workers), 17)
    rows = [r for batch in straight for r in batch]
    # one reader (workers 0) or two: each epoch of each reader is a permutation of its rows
    per_epoch = N if workers == 0 else None
    if per_epoch:
        for start in range(0, len(rows) - N + 1, N):
            assert sorted(rows[start:start + N]) == list(range(N))
    assert sorted(set(rows)) == list(range(N))
    assert straight[:5] != _batches(StreamSource(dataset, seed=4, shuffle_buffer=6, workers=workers), 5)

    resumed = StreamSource(dataset, seed=3, shuffle_buffer=6, workers=workers)
    resumed.seek(11)
    assert _batches(resumed, 6) == straight[11:]


def test_ranks_read_disjoint_rows(dataset):
    first_epoch = []
    for rank in (0, 1):
        source = StreamSource(dataset, seed=1, shuffle_buffer=4, workers=0, rank=rank, world_size=2)
        rows = [r for batch in _batches(source, 3, batch_size=4) for r in batch]  # 12 <= each rank's 20+ rows
        first_epoch.append(set(rows))
    assert not first_epoch[0] & first_epoch[1]


def test_too_many_readers_for_the_row_groups_is_a_clear_error(dataset):
    source = StreamSource(dataset, workers=4, rank=0, world_size=4)
    with pytest.raises(ValueError, match="row groups for 16 readers"):
        source.next_batch(4)


def test_a_resumed_pretraining_equals_an_uninterrupted_one(dataset, tmp_path):
    net = NetworkConfig(img_resolution=8, model_channels=8, channel_mult=(1,), attn_resolutions=())
    cfg = TrainConfig(steps=8, batch_size=8, checkpoint_every=4, precision="fp32", data_workers=1,
                      shuffle_buffer=6, lr_rampup_steps=0)
    straight, _ = pretrain_stage(dataset, net, cfg, tmp_path / "a", progress=False)
    pretrain_stage(dataset, net, cfg.model_copy(update={"steps": 4}), tmp_path / "b", progress=False)
    resumed, result = pretrain_stage(dataset, net, cfg, tmp_path / "b", progress=False)
    assert result.steps == 8
    a, b = load_model(straight)[0], load_model(resumed)[0]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
