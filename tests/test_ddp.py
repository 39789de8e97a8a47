"""Data-parallel training with 2 CPU processes (gloo) against one process at the same global batch."""

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rsd_core.config import NetworkConfig, TrainConfig
from rsd_core.kinds import build_operator, objective_for
from rsd_core.train.loop import list_checkpoints
from rsd_core.train.pretrain import TensorSource, build_teacher, pretrain_teacher

TINY = NetworkConfig(img_resolution=8, img_channels=1, model_channels=8, channel_mult=(1, 2), attn_resolutions=())
STEPS = 80


def _train(rank: int, world_size: int, rendezvous: str, out: str, result_file: str) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype("float32") / 8 - 1)[:, None]
    op = build_operator({"kind": "identity", "sigma_n": 0.1})
    gen = torch.Generator().manual_seed(0)
    y = op.observe(images, {}, gen)
    objective = objective_for(op)
    torch.manual_seed(0)
    net = build_teacher(TINY, objective)
    losses = []
    cfg = TrainConfig(steps=STEPS, batch_size=64, lr=2e-3, lr_rampup_steps=10, checkpoint_every=40, precision="fp32",
                      ema_halflife_nimg=1000)
    phase, result = pretrain_teacher(net, objective, TensorSource(y, {}), cfg, out,
                                     callback=lambda s, m: losses.append(m["loss"]), progress=False)
    params = torch.cat([p.detach().flatten() for p in phase.net.parameters()])
    if world_size > 1:
        gathered = [torch.zeros_like(params) for _ in range(world_size)]
        dist.all_gather(gathered, params)
        in_sync = all(torch.equal(gathered[0], g) for g in gathered)
        # Both ranks past every transfer before either tears gloo down: one CI run aborted rank 0 at exit
        # ("terminate called without an active exception") without this; 3 reruns passed.
        dist.barrier()
        dist.destroy_process_group()
    else:
        in_sync = True
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump({"losses": losses, "in_sync": in_sync, "steps": result.steps}, f)
    if world_size > 1:
        # Leave without running the interpreter's exit (C++ static destructors): gloo's teardown there still
        # aborted rank 0 now and then under load ("terminate called without an active exception"), after every
        # result was written (2026-11-27 and 2026-12-04).
        sys.stdout.flush()
        os._exit(0)


def _window_means(losses, width=20):
    return [sum(losses[i : i + width]) / width for i in range(0, len(losses), width)]


@pytest.mark.skipif(sys.platform != "linux", reason="fork-free spawn with a file rendezvous is tested on Linux")
def test_two_ranks_match_one_process_at_the_same_global_batch(tmp_path):
    _train(0, 1, "", str(tmp_path / "single"), str(tmp_path / "single.json"))
    mp.spawn(_train, args=(2, str(tmp_path / "rdzv"), str(tmp_path / "ddp"), str(tmp_path / "ddp.json")), nprocs=2)
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["in_sync"] and ddp["steps"] == single["steps"] == STEPS
    # one set of checkpoints, written by rank 0
    assert [p.name for p in list_checkpoints(tmp_path / "ddp" / "checkpoints")] == [
        "step-0000040", "step-0000080"]
    # Same global batch, different random draws per rank: the curves agree statistically. Tolerance:
    # each 20-step window mean within 10% of the single-process one (measured: within 4%), and both
    # fall by more than 1.5x.
    a, b = _window_means(single["losses"]), _window_means(ddp["losses"])
    for x, y in zip(a[1:], b[1:], strict=True):
        assert abs(x - y) / x < 0.10, (a, b)
    assert a[-1] < a[0] / 1.5 and b[-1] < b[0] / 1.5, (a, b)
