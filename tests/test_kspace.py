"""Per-scan coil sensitivities: ESPIRiT against the maps that simulated the scans, the operator's adjoint
with per-sample maps, the k-space import's refusals, fresh states drawn from observed scans (and kept with
the models), and a team's own k-space through `rsd data import`, `rsd run --preset cpu-mri`, `rsd sample`
and `rsd restore`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsd_cli.main import main
from rsd_core.data.kspace_import import import_kspace
from rsd_core.data.manifest import DatasetError
from rsd_core.data.reader import open_dataset
from rsd_core.kinds import objective_for
from rsd_core.operators.coil_maps import espirit_maps, pack_maps, smooth_random_maps, unpack_maps
from rsd_core.operators.mri import MRI, MRISpec
from rsd_core.restore.baselines import compressed_sensing_mri
from rsd_core.restore.least_squares import lambda_by_held_out, solve_normal
from rsd_core.stages import POOL_FILE, ModelCard, build_network, load_model, save_model
from tests.cli import rsd, scratch_env
from tests.kspace_files import phantom_scans, write_scans
from tests.servers import post_json, served


def _coil_agreement(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per pixel |<S_est, S>| / (|S_est| |S|) over the coils: 1 where the maps agree up to a phase."""
    inner = (estimate.conj() * truth).sum(-3).abs()
    norms = estimate.abs().pow(2).sum(-3).sqrt() * truth.abs().pow(2).sum(-3).sqrt()
    return inner / norms.clamp_min(1e-12)


def test_espirit_maps_reproduce_the_simulating_maps_up_to_a_phase_on_the_object():
    kspace, _, maps, images = phantom_scans(3, coils=4, size=32, acs=8, extra_lines=4)
    estimate = espirit_maps(torch.from_numpy(kspace), calibration_lines=8)
    truth = torch.from_numpy(maps)
    on_object = torch.from_numpy(np.abs(images) > 0)
    agreement = _coil_agreement(estimate, truth)[on_object]
    assert agreement.min() > 0.98 and agreement.median() > 0.995
    assert torch.allclose(estimate.abs().pow(2).sum(1), torch.ones(3, 32, 32), atol=1e-3)  # sum_c |S_c|^2 = 1
    # the check tells maps apart: another scan's maps do not pass it
    assert _coil_agreement(estimate[[1, 2, 0]], truth)[on_object].min() < 0.9


def test_espirit_refuses_a_calibration_region_narrower_than_its_kernel_allows():
    kspace, *_ = phantom_scans(1, size=16, acs=4, extra_lines=2)
    with pytest.raises(ValueError, match="at least 6 fully sampled centre lines"):
        espirit_maps(torch.from_numpy(kspace), calibration_lines=4)


@pytest.mark.parametrize("maps_size", [None, 8])
def test_the_adjoint_with_per_sample_maps_is_the_adjoint_and_each_scan_sees_its_own(maps_size):
    gen = torch.Generator().manual_seed(0)
    op = MRI(MRISpec(R=2.0, acs_fraction=0.25, n_coils=3, coil_maps="observed", maps_size=maps_size))
    maps = smooth_random_maps(4, 3, 16, 16, gen)
    state = {"mask": op.column_masks(4, 16, 2.0, gen), "maps": pack_maps(maps, maps_size)}
    x, y = torch.randn(4, 2, 16, 16, generator=gen), torch.randn(4, 6, 16, 16, generator=gen)
    forward = op.forward(x, state)
    lhs, rhs = (forward.double() * y.double()).sum(), (x.double() * op.adjoint(y, state).double()).sum()
    assert abs(lhs - rhs) < 1e-5 * abs(lhs)
    one_by_one = torch.cat([op.forward(x[i:i + 1], {k: v[i:i + 1] for k, v in state.items()}) for i in range(4)])
    assert torch.allclose(forward, one_by_one)
    assert not torch.allclose(forward, op.forward(x, {**state, "maps": state["maps"].roll(1, 0)}), atol=1e-3)
    if maps_size is None:  # stored at full size, the maps are the scan's maps exactly
        assert torch.equal(unpack_maps(state["maps"], 16, 16), maps)


def test_fresh_states_pair_observed_masks_and_maps_and_models_keep_them(tmp_path):
    kspace, mask = write_scans(tmp_path / "scans", n=12)
    import_kspace(kspace, mask, str(tmp_path / "ds"), spec={"acs_fraction": 0.375})
    op = open_dataset(str(tmp_path / "ds")).operator
    _, observed, _ = open_dataset(str(tmp_path / "ds")).read_all()
    drawn = op.sample_state(64, (2, 16, 16), torch.Generator().manual_seed(1))

    def rows(drawn_values, observed_values):
        return [int(torch.nonzero((observed_values == v).flatten(1).all(1))[0]) for v in drawn_values]

    mask_rows, maps_rows = rows(drawn["mask"], observed["mask"]), rows(drawn["maps"], observed["maps"])
    paired = sum(a == b for a, b in zip(mask_rows, maps_rows, strict=True)) / len(maps_rows)
    assert len(set(maps_rows)) > 6 and paired < 0.5  # many scans; masks and maps drawn independently

    with pytest.raises(RuntimeError, match="attach_pool"):
        MRI(op.spec).sample_state(2, (2, 16, 16))
    objective = objective_for(op)
    card = ModelCard(kind="teacher", network={"img_resolution": 16, "img_channels": 2, "model_channels": 8,
                                              "channel_mult": [1, 2], "attn_resolutions": []},
                     operator=op.spec, image_shape=(2, 16, 16), objective=objective.name)
    net, _ = build_network(card)
    folder = save_model(tmp_path / "model", net, card, op)
    _, loaded, _ = load_model(folder)
    assert all(torch.equal(loaded.operator.pool[k], op.pool[k]) for k in ("mask", "maps"))
    (folder / POOL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=POOL_FILE):
        load_model(folder)


def _spoil(name: str, kspace: np.ndarray, mask: np.ndarray, maps: np.ndarray):
    """One bad row (row 3) of the kind ``name``, in the arrays it belongs to."""
    free = int(np.flatnonzero(mask[3] == 0)[0])
    if name == "non-binary mask":
        mask[3, 0] = 0.5
    elif name == "mask along read-out":
        mask = np.repeat(mask[:, None, :], kspace.shape[-2], 1)
        mask[3, 0, 7] = 0
    elif name == "value on an unsampled line":
        kspace[3, 1, 2, free] = 1
    elif name == "nan k-space":
        kspace[3, 1, 2, 7] = np.nan
    elif name == "no ACS":
        mask[3, 7] = 0
        kspace[3, :, :, 7] = 0
    elif name == "zero maps":
        maps[3] = 0
    elif name == "nan maps":
        maps[3, 0, 0, 0] = np.nan
    elif name == "maps of another coil count":
        maps = maps[:, :3]
    elif name == "real k-space":
        kspace = kspace.real.copy()
    return kspace, mask, maps


@pytest.mark.parametrize("name, message", [
    ("non-binary mask", "mask.npy: row 3: mask values must be 0 or 1"),
    ("mask along read-out", "mask.npy: row 3: the mask varies along the read-out axis"),
    ("value on an unsampled line", "kspace.npy: row 3: values on line"),
    ("nan k-space", "kspace.npy: row 3: k-space is not finite"),
    ("no ACS", "mask.npy: row 3: the 6 central ACS lines (columns 5-10"),
    ("zero maps", "maps.npy: row 3: the coil maps are all zero or not finite"),
    ("nan maps", "maps.npy: row 3: the coil maps are all zero or not finite"),
    ("maps of another coil count", "maps.npy: coil maps must be (N, coils, m, m) = (8, 4, m, m)"),
    ("real k-space", "kspace.npy: k-space must be complex (N, coils, H, W) or real/imag pairs"),
])
def test_import_refuses_what_the_operator_could_not_have_produced_naming_file_and_row(tmp_path, name, message):
    kspace, mask, maps, _ = phantom_scans(8)
    kspace, mask, maps = _spoil(name, kspace, mask, maps)
    for file, array in (("kspace", kspace), ("mask", mask), ("maps", maps)):
        np.save(tmp_path / f"{file}.npy", array)
    with pytest.raises(DatasetError) as refused:
        import_kspace(tmp_path / "kspace.npy", tmp_path / "mask.npy", str(tmp_path / "ds"),
                      spec={"acs_fraction": 0.375}, maps=tmp_path / "maps.npy")
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_given_maps_at_reduced_size_are_stored_compactly_and_interpolated(tmp_path):
    kspace, mask, maps, _ = phantom_scans(8)
    small = torch.nn.functional.interpolate(torch.view_as_real(torch.from_numpy(maps)).permute(0, 1, 4, 2, 3)
                                            .reshape(8, 8, 16, 16), size=(8, 8), mode="area")
    small = torch.view_as_complex(small.reshape(8, 4, 2, 8, 8).permute(0, 1, 3, 4, 2).contiguous()).numpy()
    for file, array in (("kspace", kspace), ("mask", mask), ("maps", small)):
        np.save(tmp_path / f"{file}.npy", array)
    manifest = import_kspace(tmp_path / "kspace.npy", tmp_path / "mask.npy", str(tmp_path / "ds"),
                             spec={"acs_fraction": 0.375}, maps=tmp_path / "maps.npy")
    assert manifest.operator.maps_size == 8 and manifest.state_keys["maps"].shape == (8, 8, 8)
    assert manifest.provenance["coil_maps"].startswith("given")
    ds = open_dataset(str(tmp_path / "ds"))
    y, state, _ = ds.read_all()
    agreement = _coil_agreement(unpack_maps(state["maps"], 16, 16), torch.from_numpy(maps))
    assert agreement.median() > 0.99


def test_cli_import_of_kspace_refuses_in_one_line(tmp_path, capsys):
    kspace, mask = write_scans(tmp_path, n=4)
    np.save(mask, np.load(mask) * 0.5)
    assert main(["data", "import", "--kspace", str(kspace), "--mask", str(mask), "--operator", "mri",
                 "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mask.npy: row 0: mask values must be 0 or 1" in err


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("kspace")
    return root, scratch_env(root)


TINY_RUN = ["--set", "teacher_train.steps=20", "--set", "teacher_train.time_budget_s=null",
            "--set", "teacher_train.batch_size=8", "--set", "teacher_train.checkpoint_every=10",
            "--set", "distill_train.steps=8", "--set", "distill_train.time_budget_s=null",
            "--set", "distill_train.batch_size=4", "--set", "distill_train.checkpoint_every=4",
            "--set", "selection.n_samples=32"]


def test_a_teams_own_kspace_runs_through_the_pipeline_sampling_and_restore(scratch):
    """k-space made with numpy alone, imported (maps estimated by ESPIRiT), trained and distilled with the
    cpu-mri preset at a toy budget, exported and registered, sampled, and restored through its own maps."""
    root, env = scratch
    kspace, mask = write_scans(root / "scans", n=48)
    out = rsd(env, "data", "import", "--kspace", str(kspace), "--mask", str(mask), "--operator", "mri",
              "--acs-fraction", "0.375", "--out", str(root / "ds"))
    assert "coil maps estimated per scan by ESPIRiT" in out
    stdout = rsd(env, "run", "--preset", "cpu-mri", "--dataset", str(root / "ds"), "--out", str(root / "out"),
                 *TINY_RUN, timeout=600)
    assert "registered model  rsd-kspace version 1" in stdout
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'out' / 'mlflow.db'}"}
    rsd(env, "sample", "--model", "models:/rsd-kspace@champion", "-n", "4", "--out", str(root / "s.png"))
    assert (root / "s.png").stat().st_size > 0
    restore_out = rsd(env, "restore", "--model", "models:/rsd-kspace@champion", "--dataset", str(root / "ds"),
                      "--out", str(root / "restored"), "--out-dir", str(root / "rout"), "--encoder", "{steps: 40}",
                      timeout=600)
    assert "registered as models:/rsd-kspace.restorer.kspace/1" in restore_out
    restored = open_dataset(str(root / "restored"))
    images, _, _ = restored.read_all()
    assert len(images) == 48 and torch.isfinite(images).all()
    # restored through each scan's own maps: re-measured, the images reproduce their scans (up to the clamp to
    # the image range), and not through another scan's maps
    ds = open_dataset(str(root / "ds"))
    y, state, _ = ds.read_all()

    def misfit(state):
        return float((ds.operator.forward(images, state) - y).pow(2).mean() / y.pow(2).mean())

    assert misfit(state) < 0.05 and misfit({**state, "maps": state["maps"].roll(1, 0)}) > 10 * misfit(state)

    # served over HTTP, the registered restorer takes each scan's mask and maps and answers as rsd restore wrote
    with served("models:/rsd-kspace.restorer.kspace/1", root / "out", (root, env)) as url:
        body = {"inputs": {"observations": y[:4].tolist(), "mask": state["mask"][:4].tolist(),
                           "maps": state["maps"][:4].tolist()}}
        answer = post_json(url, body)["predictions"]
    np.testing.assert_allclose(np.asarray(answer["mean"], np.float32), images[:4].numpy(), atol=1e-4)


def test_held_out_lines_choose_the_regularisation_that_estimated_maps_need():
    """SENSE with ESPIRiT's maps of scans made through other coils: exact inversion amplifies the maps' error
    (an inverse crime hides this); the held-out k-space lines pick a weight that reconstructs far better than
    none, without a clean image. With the maps that made the scans the weight chosen leans high (the split
    keeps only the ACS lines here): it costs there, bounded below."""
    kspace, masks, maps, images = phantom_scans(8, coils=4, size=32, acs=6, extra_lines=2, seed=3)
    op = MRI(MRISpec(R=4.0, acs_fraction=6 / 32, n_coils=4, coil_maps="observed"))
    k = torch.from_numpy(kspace)
    y = torch.view_as_real(k).permute(0, 1, 4, 2, 3).reshape(8, 8, 32, 32)
    mask = torch.from_numpy(masks).view(8, 1, 1, 32)
    truth = torch.from_numpy(np.abs(images)).float()

    def error(state, lam):
        x = solve_normal(op, y, state, lam, 400)
        return float((torch.view_as_complex(x.permute(0, 2, 3, 1).contiguous()).abs() - truth).norm() / truth.norm())

    estimated = {"mask": mask, "maps": pack_maps(espirit_maps(k, 6))}
    chosen = lambda_by_held_out(op, y, estimated, 400)
    assert (chosen > 0).all() and error(estimated, chosen) < 0.7 * error(estimated, 0.0)
    # each scan's weight is its own: the same in any batch
    assert torch.equal(lambda_by_held_out(op, y[2:4], {k: v[2:4] for k, v in estimated.items()}, 400), chosen[2:4])
    exact = {"mask": mask, "maps": pack_maps(torch.from_numpy(maps))}
    assert error(exact, lambda_by_held_out(op, y, exact, 400)) < 2 * error(exact, 0.0)


def test_compressed_sensing_reconstructs_better_than_zero_filling_with_its_own_weight():
    """The L1-wavelet baseline (sigpy) with each scan's maps, its weight chosen by held-out lines."""
    kspace, masks, maps, images = phantom_scans(4, coils=4, size=32, acs=6, extra_lines=4, seed=5)
    op = MRI(MRISpec(R=3.2, acs_fraction=6 / 32, n_coils=4, coil_maps="observed"))
    y = torch.view_as_real(torch.from_numpy(kspace)).permute(0, 1, 4, 2, 3).reshape(4, 8, 32, 32)
    state = {"mask": torch.from_numpy(masks).view(4, 1, 1, 32), "maps": pack_maps(torch.from_numpy(maps))}
    truth = torch.from_numpy(np.abs(images)).float()

    def error(x):
        return float((torch.view_as_complex(x.permute(0, 2, 3, 1).contiguous()).abs() - truth).norm() / truth.norm())

    assert error(compressed_sensing_mri(op, y, state)) < 0.8 * error(op.adjoint(y, state))
