"""The corrupted-dataset format, its validation, streaming, sources and the `rsd data` CLI.

S3 tests run against a real seaweedfs server (the ``s3_server`` fixture), not a mock, so
credentials, endpoints and listing behave as they would against a real bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from rsd_cli.main import main
from rsd_core.data.importer import import_corrupted
from rsd_core.data.manifest import DatasetError
from rsd_core.data.reader import open_dataset
from rsd_core.data.sources import brain_mri, corrupt, fashion_mnist, image_folder
from rsd_core.data.streaming import StreamingDataset
from rsd_core.data.writer import write_dataset
from rsd_core.kinds import build_operator
from rsd_core.viz import save_grid

SPECS = {
    "identity": ({"kind": "identity", "sigma_n": 0.1}, (1, 8, 8)),
    "inpaint": ({"kind": "inpaint", "p": 0.5, "sigma_n": 0.05}, (1, 8, 8)),
    "blur": ({"kind": "blur", "kernel_size": 3, "std": 1.0}, (3, 8, 8)),
    "superres": ({"kind": "superres", "factor": 2, "sigma_n": 0.02}, (1, 8, 8)),
    "mri": ({"kind": "mri", "R": 2.0, "n_coils": 2}, (2, 8, 8)),
}


def _corrupted(kind: str, n: int = 40, seed: int = 0):
    spec, shape = SPECS[kind]
    op = build_operator(spec)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g) * 2 - 1
    state = op.sample_state(n, shape, g)
    return spec, shape, op.observe(x, state, g), state


def _write(uri, kind="inpaint", n=40, storage_options=None, **kwargs):
    spec, shape, y, state = _corrupted(kind, n)
    kwargs.setdefault("rows_per_shard", 16)
    kwargs.setdefault("rows_per_group", 8)
    write_dataset(
        uri,
        y,
        state,
        torch.arange(n),
        name="t",
        image_shape=shape,
        operator=spec,
        storage_options=storage_options,
        **kwargs,
    )
    return y, state


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint only through the environment, as in production."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_round_trip_keeps_observations_and_state_exactly(kind, backend, tmp_path, request):
    uri = str(tmp_path / "ds") if backend == "local" else request.getfixturevalue("s3_env")
    y, state = _write(uri, kind)
    ds = open_dataset(uri, verify=True)
    obs, got_state, labels = ds.read_all()
    assert torch.equal(obs, y.float())
    assert got_state.keys() == state.keys()
    for key in state:
        assert got_state[key].dtype == state[key].dtype and torch.equal(got_state[key], state[key])
    assert torch.equal(labels, torch.arange(len(y)))
    assert len(ds) == 40 and len(ds.manifest.shards) == 3
    assert ds.manifest.operator.kind == kind and ds.operator.state_keys == tuple(state)


def test_fingerprint_is_stable_and_tracks_content(tmp_path):
    _write(str(tmp_path / "a"))
    _write(str(tmp_path / "b"))
    _write(str(tmp_path / "c"), n=39)
    fa, fb, fc = (open_dataset(str(tmp_path / d)).fingerprint for d in "abc")
    assert fa == fb != fc


# --------------------------------------------------------------------------- validation


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _save_manifest(root: Path, data: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(data))


def _replace_shard(root: Path, content: bytes, shard: int = 0) -> None:
    """Put ``content`` in a shard and make the manifest agree, so only the content is wrong."""
    data = _manifest(root)
    entry = data["shards"][shard]
    (root / entry["file"]).write_bytes(content)
    entry.update(bytes=len(content), sha256=hashlib.sha256(content).hexdigest())
    _save_manifest(root, data)


def _shard_with(root: Path, change) -> bytes:
    table = change(pq.read_table(root / "part-00000.parquet"))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=8)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def ds_dir(tmp_path) -> Path:
    _write(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_missing_column(ds_dir):
    _replace_shard(ds_dir, _shard_with(ds_dir, lambda t: t.drop_columns(["mask"])))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: missing column\(s\) \['mask'\]"):
        open_dataset(str(ds_dir)).read_all()


def test_extra_column(ds_dir):
    _replace_shard(ds_dir, _shard_with(ds_dir, lambda t: t.append_column("extra", pa.array([1] * len(t)))))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: unexpected column\(s\) \['extra'\]"):
        open_dataset(str(ds_dir)).read_all()


def test_shape_mismatch_on_read(ds_dir):
    def shorten(table):
        short = pa.array([v.as_py()[:-4] for v in table.column("observation")], pa.binary())
        return table.set_column(table.schema.get_field_index("observation"), "observation", short)

    _replace_shard(ds_dir, _shard_with(ds_dir, shorten))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: observation: row with index 0 .*shape mismatch"):
        open_dataset(str(ds_dir)).read_all()


def test_shape_mismatch_on_write(tmp_path):
    spec, shape, y, state = _corrupted("inpaint")
    with pytest.raises(DatasetError, match=r"per-sample shape \(1, 8, 7\), expected \(1, 8, 8\)"):
        write_dataset(
            str(tmp_path), y[..., :7], {"mask": state["mask"][..., :7]}, name="t", image_shape=shape, operator=spec
        )


def test_nan_names_the_row(tmp_path):
    spec, shape, y, state = _corrupted("inpaint")
    y[3, 0, 1, 1] = float("nan")
    with pytest.raises(DatasetError, match="observation: row with index 3 contains NaN or Inf"):
        write_dataset(str(tmp_path), y, state, name="t", image_shape=shape, operator=spec)


def test_values_outside_declared_range(tmp_path):
    spec, shape, y, state = _corrupted("inpaint")
    y[5] += 10.0
    with pytest.raises(DatasetError, match="row with index 5 .*outside the declared range"):
        write_dataset(str(tmp_path), y, state, name="t", image_shape=shape, operator=spec)


def test_checksum_mismatch(ds_dir):
    shard = ds_dir / "part-00001.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="part-00001.parquet: checksum mismatch"):
        open_dataset(str(ds_dir)).read_all()


def test_truncated_shard(ds_dir):
    shard = ds_dir / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DatasetError, match="part-00002.parquet: truncated"):
        open_dataset(str(ds_dir))


def test_non_parquet_shard(ds_dir):
    _replace_shard(ds_dir, b"this is not parquet" * 10)
    with pytest.raises(DatasetError, match="part-00000.parquet: not a valid parquet file"):
        open_dataset(str(ds_dir)).read_all()


def test_empty_dataset(tmp_path):
    spec, shape, _, _ = _corrupted("identity")
    with pytest.raises(DatasetError, match="empty dataset"):
        write_dataset(str(tmp_path), torch.zeros((0, *shape)), name="t", image_shape=shape, operator=spec)


def test_unknown_operator_kind(ds_dir):
    data = _manifest(ds_dir)
    data["operator"]["kind"] = "warp"
    _save_manifest(ds_dir, data)
    with pytest.raises(DatasetError, match="manifest.json: unknown operator kind 'warp'"):
        open_dataset(str(ds_dir))


def test_invalid_operator_parameters(ds_dir):
    data = _manifest(ds_dir)
    data["operator"]["p"] = 1.5
    _save_manifest(ds_dir, data)
    with pytest.raises(DatasetError, match=r"manifest.json: field 'operator.p'.*\[0, 1\).*1.5"):
        open_dataset(str(ds_dir))


def test_state_missing_where_operator_needs_it(tmp_path, ds_dir):
    spec, shape, y, _ = _corrupted("inpaint")
    with pytest.raises(DatasetError, match=r"per-sample state \['mask'\] missing: operator 'inpaint'"):
        write_dataset(str(tmp_path / "new"), y, name="t", image_shape=shape, operator=spec)
    data = _manifest(ds_dir)
    del data["state_keys"]["mask"]
    _save_manifest(ds_dir, data)
    with pytest.raises(DatasetError, match=r"field 'state_keys' lacks per-sample state \['mask'\]"):
        open_dataset(str(ds_dir))


def test_missing_manifest_field(ds_dir):
    data = _manifest(ds_dir)
    del data["image_shape"]
    data["count"] = "many"
    _save_manifest(ds_dir, data)
    with pytest.raises(DatasetError, match="manifest.json: field 'image_shape': Field required.*field 'count'"):
        open_dataset(str(ds_dir))


def test_no_manifest(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json"):
        open_dataset(str(tmp_path))


# --------------------------------------------------------------------------- atomic writes


def test_interrupted_write_leaves_no_manifest_and_rerun_completes(tmp_path):
    uri = str(tmp_path / "ds")
    _write(uri, n=64)  # a complete dataset is there first: the rewrite must not look complete
    spec, shape, y, state = _corrupted("inpaint", 40)

    def batches(fail: bool):
        for start in range(0, 40, 8):
            if fail and start == 24:
                raise RuntimeError("disk full")
            yield y[start : start + 8], {"mask": state["mask"][start : start + 8]}, None

    kwargs = dict(name="t", image_shape=shape, operator=spec, rows_per_shard=16, rows_per_group=8)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(uri, batches(fail=True), **kwargs)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    with pytest.raises(DatasetError, match="no manifest.json"):
        open_dataset(uri)
    write_dataset(uri, batches(fail=False), **kwargs)
    ds = open_dataset(uri, verify=True)
    assert len(ds) == 40 and torch.equal(ds.read_all()[0], y)
    assert sorted(p.name for p in (tmp_path / "ds").glob("part-*")) == [s.file for s in ds.manifest.shards]


# --------------------------------------------------------------------------- streaming


def _labels(loader) -> list[int]:
    return [int(v) for _, _, label in loader for v in label.reshape(-1)]


def test_streaming_two_workers_cover_every_index_once(tmp_path):
    _write(str(tmp_path), n=100)
    stream = StreamingDataset(str(tmp_path), shuffle_buffer=16, seed=1)
    labels = _labels(DataLoader(stream, batch_size=10, num_workers=2))
    assert sorted(labels) == list(range(100))
    batch = next(iter(DataLoader(stream, batch_size=4)))
    assert batch[0].shape == (4, 1, 8, 8) and batch[1]["mask"].shape == (4, 1, 8, 8)


def test_streaming_two_ranks_partition_and_shuffle_per_epoch(tmp_path):
    _write(str(tmp_path), n=100)
    ranks = [StreamingDataset(str(tmp_path), shuffle_buffer=16, seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = [_labels(DataLoader(s, batch_size=7)) for s in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(100)) and not set(seen[0]) & set(seen[1])
    assert _labels(DataLoader(ranks[0], batch_size=7)) == seen[0]  # deterministic
    ranks[0].set_epoch(1)
    assert _labels(DataLoader(ranks[0], batch_size=7)) != seen[0]


def test_streaming_without_labels_or_shuffle(tmp_path):
    spec, shape, y, _ = _corrupted("blur", 20)
    write_dataset(str(tmp_path), y, name="t", image_shape=shape, operator=spec, rows_per_group=8)
    rows = list(StreamingDataset(str(tmp_path), shuffle=False))
    assert torch.equal(torch.stack([r[0] for r in rows]), y) and all(int(r[2]) == -1 for r in rows)


# --------------------------------------------------------------------------- sources


def test_fashion_mnist_is_padded_scaled_and_split():
    train, test = fashion_mnist("train"), fashion_mnist("test")
    assert (train.count, test.count) == (60000, 10000)
    x, labels = train.load(0, 16)
    assert x.shape == (16, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, :, :2] == -1) and labels.dtype == torch.int64
    assert not torch.equal(test.load(0, 16)[0], x)


def test_missing_fashion_mnist_names_path_and_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist") as err:
        fashion_mnist("train", root=tmp_path)
    assert str(tmp_path) in str(err.value)


def test_brain_mri_test_split_is_complex_in_range():
    src = brain_mri("test", 32)
    x, labels = src.load(0, src.count)
    assert src.image_shape == (2, 32, 32) and labels is None and src.count > 100
    magnitude = x.pow(2).sum(1).sqrt()
    assert magnitude.max() <= 1.0 + 1e-5 and x[:, 1].abs().mean() > 0.05  # a real phase


def test_image_folder_resizes_and_crops(tmp_path):
    Image.new("RGB", (60, 40), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (20, 50), 0).save(tmp_path / "b.jpg")
    x, _ = image_folder(tmp_path, size=16, channels=3).load(0, 2)
    assert x.shape == (2, 3, 16, 16) and torch.allclose(x[0, 0], torch.ones(16, 16))
    assert torch.allclose(x[1], -torch.ones(3, 16, 16))


def test_corrupt_is_deterministic_with_clean_eval(tmp_path):
    spec = {"kind": "inpaint", "p": 0.5}
    corrupt("fashion-mnist", spec, 7, str(tmp_path / "a"), limit=300, clean_eval_count=4)
    corrupt("fashion-mnist", spec, 7, str(tmp_path / "b"), limit=300)
    a, b = open_dataset(str(tmp_path / "a")), open_dataset(str(tmp_path / "b"))
    assert a.fingerprint == b.fingerprint and len(a) == 300
    clean = a.clean_eval()
    assert len(clean) == 4 and clean.manifest.operator.kind == "identity" and b.clean_eval() is None
    obs, state, _ = a.read_all()
    assert torch.equal(obs[:4], clean.read_all()[0] * state["mask"][:4])


def test_import_npy_casts_uint8_masks(tmp_path):
    _, shape, y, state = _corrupted("inpaint", 20)
    np.save(tmp_path / "obs.npy", y.numpy())
    np.save(tmp_path / "mask.npy", state["mask"].numpy().astype(np.uint8))
    manifest = import_corrupted(
        tmp_path / "obs.npy", SPECS["inpaint"][0], str(tmp_path / "ds"), state={"mask": tmp_path / "mask.npy"}
    )
    obs, got, _ = open_dataset(str(tmp_path / "ds")).read_all()
    assert manifest.count == 20 and torch.equal(obs, y) and torch.equal(got["mask"], state["mask"])


def test_import_refuses_a_state_of_the_wrong_shape_in_one_line_naming_the_file(tmp_path):
    _, shape, y, state = _corrupted("inpaint", 20)
    np.save(tmp_path / "obs.npy", y.numpy())
    np.save(tmp_path / "mask.npy", state["mask"][..., :4, :4].numpy())
    with pytest.raises(DatasetError) as err:
        import_corrupted(tmp_path / "obs.npy", SPECS["inpaint"][0], str(tmp_path / "ds"),
                         state={"mask": tmp_path / "mask.npy"})
    message = str(err.value)
    assert "mask.npy" in message and "(1, 4, 4)" in message and "(1, 8, 8)" in message and "\n" not in message
    assert not (tmp_path / "ds" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("kind", "spoil", "message"),
    [
        ("inpaint", lambda y, st: st["mask"].__setitem__((3, 0, 0, 0), 0.5), "row 3: state 'mask' is not binary"),
        ("inpaint", lambda y, st: y.__setitem__((5,), torch.where(st["mask"][5] > 0, y[5], 0.7)),
         "row 5: observation is non-zero where its mask says the pixel is erased"),
        ("mri", lambda y, st: y.__setitem__((2,), y[2] + 0.1),
         "row 2: observation is non-zero where its mask says the k-space line is not sampled"),
        ("superres", lambda y, st: y.__setitem__((4, 0, 0, 0), y[4, 0, 0, 0] + 0.5),
         "row 4: observation is not constant on 2x2 blocks"),
    ],
)
def test_import_refuses_observations_the_operator_could_not_have_produced(tmp_path, kind, spoil, message,
                                                                          monkeypatch):
    """Per-sample state must be valid for its operator and the observations consistent with it."""
    if kind == "superres":  # block constancy is checkable only without measurement noise
        monkeypatch.setitem(SPECS, kind, ({"kind": "superres", "factor": 2}, SPECS[kind][1]))
    _, _, y, state = _corrupted(kind, 20)
    np.save(tmp_path / "ok.npy", y.numpy())
    paths = {}
    for key, value in state.items():
        np.save(tmp_path / f"{key}.npy", value.numpy())
        paths[key] = tmp_path / f"{key}.npy"
    import_corrupted(tmp_path / "ok.npy", SPECS[kind][0], str(tmp_path / "ok"), state=paths)  # consistent as made

    spoil(y, state)
    np.save(tmp_path / "obs.npy", y.numpy())
    for key, value in state.items():
        np.save(tmp_path / f"{key}.npy", value.numpy())
    with pytest.raises(DatasetError, match=f"obs.npy: {message}") as err:
        import_corrupted(tmp_path / "obs.npy", SPECS[kind][0], str(tmp_path / "bad"), state=paths)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- CLI and viz


def test_save_grid_handles_grey_rgb_and_complex(tmp_path):
    for channels in (1, 2, 3):
        save_grid(torch.rand(5, channels, 8, 8) * 2 - 1, str(tmp_path / f"{channels}.png"), nrow=3)
        assert Image.open(tmp_path / f"{channels}.png").size == (3 * 10 + 2, 2 * 10 + 2)


def test_cli_corrupt_inspect_round_trip(tmp_path, capsys):
    out, grid = str(tmp_path / "ds"), tmp_path / "grid.png"
    args = ["data", "corrupt", "--source", "fashion-mnist", "--operator", "inpaint", "--p", "0.6"]
    assert main([*args, "--seed", "0", "--limit", "50", "--out", out, "--clean-eval", "6"]) == 0
    assert main(["data", "inspect", out, "--grid", str(grid), "--n", "6"]) == 0
    printed = capsys.readouterr().out
    assert "count        50" in printed and '"kind": "inpaint"' in printed and "checksums    ok" in printed
    assert Image.open(grid).size == (6 * 34 + 2, 2 * 34 + 2)  # observations over their clean images


def test_cli_corrupt_inspect_on_s3_with_env_credentials(s3_env, tmp_path, capsys):
    grid = tmp_path / "mri.png"
    args = ["data", "corrupt", "--source", "brain-mri", "--split", "test", "--operator", "mri", "--R", "4"]
    assert main([*args, "--limit", "20", "--out", s3_env, "--clean-eval", "4"]) == 0
    assert main(["data", "inspect", s3_env, "--grid", str(grid)]) == 0
    assert f"clean eval   {s3_env}/clean_eval (4 images" in capsys.readouterr().out and grid.exists()


def test_cli_import_png_folder(tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (16, 16), 40 * i).save(folder / f"{i}.png")
    assert (
        main(["data", "import", "--observations", str(folder), "--operator", "blur", "--out", str(tmp_path / "ds")])
        == 0
    )
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.manifest.image_shape == (1, 16, 16) and len(ds) == 3


def test_cli_error_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rsd_cli.main",
        "data",
        "corrupt",
        "--source",
        "fashion-mnist",
        "--operator",
        "blur",
        "--p",
        "0.5",
        "--out",
        str(tmp_path / "x"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: operator 'blur': field 'p'")
    assert "Traceback" not in result.stderr


def test_cli_help_shows_defaults():
    with pytest.raises(SystemExit) as done:
        main(["data", "corrupt", "--help"])
    assert done.value.code == 0
