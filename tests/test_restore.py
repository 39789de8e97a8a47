"""Restoration of observations: latent optimisation against the closed-form MAP of a linear Gaussian
generator, data consistency, the spread over restarts, the classical baselines and DPS."""

import json

import pytest
import torch
from safetensors.torch import save_file

from rsd_core.config import NetworkConfig
from rsd_core.kinds import build_operator
from rsd_core.restore.baselines import bicubic_upsample, biharmonic_inpaint, least_squares_cg, wiener_deblur
from rsd_core.restore.estimate import (
    LATENT_OPTIMISATION,
    RestoreConfig,
    data_consistency,
    restore_observations,
)
from rsd_core.restore.image_metrics import psnr
from rsd_core.restore.methods import restore_with_model
from rsd_core.restore.posterior import DPSConfig, dps_guidance, dps_restore
from rsd_core.stages import ModelCard, save_model
from rsd_core.train.objectives import Objective
from rsd_core.train.pretrain import build_teacher
from rsd_core.train.sampling import OneStepSampler, ancestral_sample
from tests.gaussian import gaussian_denoiser, random_covariance

SHAPE = (1, 4, 4)
D = 16
SIGMA_INIT = 2.5


def one_step(net: torch.nn.Module, operator) -> OneStepSampler:
    """The generator G(eps) = net(SIGMA_INIT * eps; SIGMA_INIT) under the standard objective of ``operator``."""
    return OneStepSampler(net, Objective(operator), SHAPE, SIGMA_INIT)


class LinearGenerator(torch.nn.Module):
    """G(eps) = W eps + b behind the network call signature: net(sigma_init * eps, sigma_init)."""

    def __init__(self, scale: float = 0.3, seed: int = 0):
        super().__init__()
        rng = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(scale * torch.randn(D, D, generator=rng) / D**0.5, requires_grad=False)
        self.b = torch.nn.Parameter(0.1 * torch.randn(D, generator=rng), requires_grad=False)

    def forward(self, x, sigma, cond=None):
        eps = x.flatten(1) / sigma.view(-1, 1)
        return (eps @ self.W.T + self.b).view_as(x)


def matrix_of(operator, state):
    """The dense matrix of a linear operator on one (1, 4, 4) image with one sample's state."""
    basis = torch.eye(D).view(D, *SHAPE)
    rows = operator.forward(basis, {k: v.expand(D, *v.shape[1:]) for k, v in state.items()})
    return rows.flatten(1).T


def observe(spec: dict, n: int = 3, seed: int = 1):
    operator = build_operator(spec)
    rng = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn((n, *SHAPE), generator=rng)
    state = operator.sample_state(n, SHAPE, rng)
    return operator, x, state, operator.observe(x, state, rng)


@pytest.mark.parametrize("spec", [{"kind": "blur", "kernel_size": 3, "std": 1.0, "sigma_n": 0.1},
                                  {"kind": "inpaint", "p": 0.5, "sigma_n": 0.1}])
def test_latent_optimisation_reaches_the_closed_form_map(spec):
    """argmin ||A(W e + b) - y||^2 / (2 s^2) + lam ||e||^2 / 2 is linear algebra; every restart gets there."""
    operator, _, state, y = observe(spec)
    net = LinearGenerator()
    config = RestoreConfig(steps=400, lr=0.2, restarts=3, prior_weight=0.5, sigma_floor=0.05, encoder=None,
                           data_consistency=False)
    got = restore_observations(one_step(net, operator), y, state, config)
    s2 = max(operator.sigma_n, config.sigma_floor) ** 2
    W, b = net.W.double(), net.b.double()
    for i in range(len(y)):
        A = matrix_of(operator, {k: v[i : i + 1] for k, v in state.items()}).double()
        AW = A @ W
        e = torch.linalg.solve(AW.T @ AW / s2 + config.prior_weight * torch.eye(D, dtype=torch.float64),
                               AW.T @ (y[i].flatten().double() - A @ b) / s2)
        want = (W @ e + b).clamp(-1, 1).view(SHAPE)
        assert torch.allclose(got.mean[i].double(), want, atol=2e-3), (got.mean[i] - want).abs().max()
    assert got.spread.max() < 2e-3


def test_data_consistency_keeps_measured_pixels_and_block_means():
    net = LinearGenerator(scale=0.1)  # restarts stay inside [-1, 1], where the final clamp is a no-op
    config = LATENT_OPTIMISATION.model_copy(update={"steps": 5, "restarts": 2})
    operator, _, state, y = observe({"kind": "inpaint", "p": 0.5})
    got = restore_observations(one_step(net, operator), y, state, config).mean
    measured = state["mask"].expand_as(y) > 0
    assert torch.allclose(got[measured], y[measured].clamp(-1, 1), atol=1e-6)
    operator, _, state, y = observe({"kind": "superres", "factor": 2})
    got = restore_observations(one_step(net, operator), y, state, config).mean
    assert torch.allclose(operator.forward(got, state), y.clamp(-1, 1), atol=1e-5)


def test_data_consistency_is_the_minimum_norm_correction_for_multicoil_mri():
    """Coils mix pixels, so one adjoint step x + A^T(y - A(x)) leaves a misfit; the projection must be
    x + A^+(y - A(x)): the measurements where they determine the image, x in the null space of A.
    Two coils at R = 4 leave half the dimensions unmeasured, and A^+ is taken from A's dense matrix."""
    operator = build_operator({"kind": "mri", "R": 4.0, "n_coils": 2})
    shape = (2, 16, 16)
    rng = torch.Generator().manual_seed(0)
    state = operator.sample_state(1, shape, rng)
    x_true, x = torch.randn(2, 1, *shape, generator=rng)
    y = operator.forward(x_true, state)
    d = x.numel()
    A = operator.forward(torch.eye(d).view(d, *shape), {k: v.expand(d, *v.shape[1:]) for k, v in state.items()})
    A = A.flatten(1).T.double()
    assert torch.linalg.matrix_rank(A) < d  # a null space the measurements say nothing about
    residual = (y - operator.forward(x, state)).flatten(1).double()
    want = x.flatten(1).double() + residual @ torch.linalg.pinv(A).T
    got = data_consistency(operator, x, y, state)
    assert torch.allclose(got.flatten(1).double(), want, atol=1e-3), (got.flatten(1).double() - want).abs().max()
    assert (operator.forward(got, state) - y).norm() < 1e-4 * y.norm()


def test_spread_is_zero_for_identical_restarts_and_positive_otherwise():
    """A generator that ignores its latent gives identical restarts (the observations still differ,
    so a spread taken over the wrong axis would show); an under-determined one does not."""
    operator, _, state, y = observe({"kind": "inpaint", "p": 0.5})
    config = LATENT_OPTIMISATION.model_copy(update={"steps": 20, "prior_weight": 0.0})
    constant = LinearGenerator(scale=0.0)
    assert torch.equal(restore_observations(one_step(constant, operator), y, state,
                                            config).spread, torch.zeros_like(y))
    free = restore_observations(one_step(LinearGenerator(), operator), y, state, config)
    missing = state["mask"].expand_as(y) == 0
    assert free.spread[missing].min() > 1e-3
    assert free.spread[~missing].max() < 1e-6  # measured pixels are kept in every restart


@pytest.fixture(scope="module")
def fashion():
    from rsd_core.data.sources import fashion_mnist

    return fashion_mnist("test").load(0, 16)[0]


def to_unit(x):
    return ((x + 1) / 2).clamp(0, 1)


def test_wiener_deconvolution_beats_the_blurred_image_and_inverts_the_reflect_padded_blur(fashion):
    operator = build_operator({"kind": "blur", "kernel_size": 5, "std": 1.0, "sigma_n": 0.05})
    y = operator.observe(fashion, {}, torch.Generator().manual_seed(0))
    restored = wiener_deblur(y, operator.kernel, nsr=0.01)
    assert psnr(to_unit(restored), to_unit(fashion), 1.0).mean > psnr(to_unit(y), to_unit(fashion), 1.0).mean + 1.0
    clean = operator.forward(0.5 * fashion, {})  # half range: the final clamp stays inactive
    refit = operator.forward(wiener_deblur(clean, operator.kernel, nsr=1e-8), {})
    assert (refit - clean).abs().max() < 1e-3  # exact forward model, borders included


def test_biharmonic_beats_zero_filling_and_bicubic_beats_nearest(fashion):
    operator = build_operator({"kind": "inpaint", "p": 0.8})
    state = operator.sample_state(len(fashion), tuple(fashion.shape[1:]), torch.Generator().manual_seed(0))
    y = operator.forward(fashion, state)
    filled = psnr(to_unit(biharmonic_inpaint(y, state["mask"])), to_unit(fashion), 1.0).mean
    assert filled > psnr(to_unit(y), to_unit(fashion), 1.0).mean + 5.0
    operator = build_operator({"kind": "superres", "factor": 2})
    y = operator.forward(fashion, {})
    assert psnr(to_unit(bicubic_upsample(y, 2)), to_unit(fashion), 1.0).mean > psnr(to_unit(y), to_unit(fashion),
                                                                                     1.0).mean


def test_least_squares_cg_matches_the_normal_equations():
    operator, _, state, y = observe({"kind": "blur", "kernel_size": 3, "std": 1.0, "sigma_n": 0.1})
    lam = 0.05
    got = least_squares_cg(operator, y, state, lam, iters=40)
    A = matrix_of(operator, {}).double()
    want = torch.linalg.solve(A.T @ A + lam * torch.eye(D, dtype=torch.float64), A.T @ y.flatten(1).double().T).T
    assert torch.allclose(got.flatten(1).double(), want.clamp(-1, 1), atol=1e-4)


class GaussianTeacher(torch.nn.Module):
    """The exact denoiser of N(mu, Sigma) images behind the network call signature."""

    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64), requires_grad=False)
        self.denoiser = gaussian_denoiser(self.mu.data, random_covariance(D, seed=3))

    def forward(self, x, sigma, cond=None):
        return self.denoiser(x.flatten(1), sigma).view_as(x).float()


def test_dps_reduces_the_misfit_of_the_teacher_samples():
    operator, _, state, y = observe({"kind": "inpaint", "p": 0.5}, n=16)
    objective, teacher = Objective(operator), GaussianTeacher()

    def misfit(zeta):
        x = dps_restore(teacher, objective, SHAPE, y, state, DPSConfig(zeta=zeta, data_consistency=False)).sample
        return float((operator.forward(x, state) - y).square().sum())

    unguided, guided = misfit(1e-9), misfit(1.0)
    assert guided < 0.5 * unguided, (guided, unguided)


@pytest.mark.parametrize("t", [0.3, 4.0])
def test_the_dps_step_is_the_papers_in_ve_coordinates(t):
    """With the exact denoiser of N(0, I) data, D(x; t) = x / (1 + t^2), and a mask A, the correction is
    zeta (1 + t^2) / ||r|| * (-2 / (1 + t^2)) A^T r with r = y - A x / (1 + t^2), in closed form: the
    (1 + t^2) of the VE change of variables and the 1 / ||r|| normalisation both matter."""
    operator, _, state, y = observe({"kind": "inpaint", "p": 0.5}, n=4)
    x = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(5), dtype=torch.float64).float() * 3
    level = torch.full((4,), t)

    def denoise(x_t, sigma):
        return x_t / (1.0 + sigma.view(-1, 1, 1, 1) ** 2)

    x0, correction = dps_guidance(denoise, operator, y, state, x, level, zeta=0.7)
    a = 1.0 / (1.0 + t**2)
    r = y - operator.forward(a * x, state)
    norm = r.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = 0.7 * (1.0 + t**2) / norm * (-2.0 * a) * operator.adjoint(r, state)
    torch.testing.assert_close(x0.float(), a * x)
    torch.testing.assert_close(correction.float(), expected, rtol=1e-4, atol=1e-6)


def test_one_ancestral_dps_step_by_hand():
    """The ancestral schedule's first step from t = 2 to t' = 0.5 with D(x; t) = x / (1 + t^2), computed by hand:
    t_up^2 = t'^2 (t^2 - t'^2) / t^2, t_down^2 = t'^2 - t_up^2, x' = x + (t_down - t) (x - D) / t + t_up z - c, the
    guide's correction c subtracted after the step; the last level returns D(x'; t')."""
    latents = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    correction = torch.full((3, 1, 4, 4), 0.3, dtype=torch.float64)

    def denoise(x, t):
        return x / (1.0 + t**2)

    def guide(x, t):
        return denoise(x, t), correction

    out, nfe = ancestral_sample(denoise, latents, torch.Generator().manual_seed(7), num_steps=2, sigma_min=0.5,
                                sigma_max=2.0, guide=guide)
    t, t_next = 2.0, 0.5
    x = latents.double() * t
    t_up = (t_next**2 * (t**2 - t_next**2) / t**2) ** 0.5
    t_down = (t_next**2 - t_up**2) ** 0.5
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_next = x + (t_down - t) * (x - denoise(x, t)) / t + t_up * z - correction
    torch.testing.assert_close(out, denoise(x_next, t_next))
    assert nfe == 2
    # truncated at the first level: its x0 prediction, one evaluation, no step taken
    first, nfe = ancestral_sample(denoise, latents, torch.Generator().manual_seed(7), num_steps=2, sigma_min=0.5,
                                  sigma_max=2.0, sigma_stop=1.0)
    torch.testing.assert_close(first, denoise(x, t))
    assert nfe == 1


def test_dps_samples_average_into_their_mean():
    """K posterior samples per observation: the mean is their average, the sample the first, and with more than
    one sample the spread is positive (the ancestral steps draw fresh noise)."""
    operator, _, state, y = observe({"kind": "inpaint", "p": 0.5}, n=3)
    config = DPSConfig(num_steps=10, samples=3, data_consistency=False)
    result = dps_restore(GaussianTeacher(), Objective(operator), SHAPE, y, state, config)
    assert result.mean.shape == result.sample.shape == result.spread.shape == (3, *SHAPE)
    assert float(result.spread.mean()) > 0
    one = dps_restore(GaussianTeacher(), Objective(operator), SHAPE, y, state, config.updated(samples=1))
    torch.testing.assert_close(one.mean, one.sample)


def test_restore_with_model_folder(tmp_path):
    """A saved generator folder restores observations of its own shape, and refuses a teacher."""
    network = NetworkConfig(img_resolution=8, model_channels=8, channel_mult=(1, 2), attn_resolutions=())
    operator = build_operator({"kind": "inpaint", "p": 0.6})
    from rsd_core.kinds import objective_for

    net = build_teacher(network, objective_for(operator))
    card = ModelCard(kind="generator", network=network, operator=operator.spec, image_shape=(1, 8, 8),
                     objective="ambient_diffusion")
    save_model(tmp_path / "generator", net, card)
    save_model(tmp_path / "teacher", net, card.model_copy(update={"kind": "teacher"}))
    state = operator.sample_state(3, (1, 8, 8), torch.Generator().manual_seed(0))
    y = operator.forward(torch.rand(3, 1, 8, 8) * 2 - 1, state)
    got = restore_with_model(tmp_path / "generator", y, state, RestoreConfig(steps=2, restarts=2, encoder=None))
    assert got.mean.shape == got.spread.shape == (3, 1, 8, 8)
    assert got.mean.abs().max() <= 1.0
    with pytest.raises(ValueError, match="one-step generator"):
        restore_with_model(tmp_path / "teacher", y, state, RestoreConfig(steps=2, encoder=None))
    with pytest.raises(ValueError, match="need their state"):
        restore_with_model(tmp_path / "generator", y, {}, RestoreConfig(steps=2, encoder=None))


def test_restore_benchmark_end_to_end_and_resumes(tmp_path, monkeypatch):
    """A toy run of benchmarks/restore.py: one row per method named for what it runs, the issue's keys, the
    default marked, every interval against the best baseline, the slow methods on their subset, the missing
    task listed, and a second run served from the work folder (same numbers, same timings). The long DPS runs
    where validation settings exist for its length (here: stubbed, at 120 levels to keep the toy short)."""
    from benchmarks import restore

    tuned = []
    monkeypatch.setattr(restore, "DPS_LONG_STEPS", 120)
    monkeypatch.setattr(restore, "dps_settings", lambda task, num_steps=restore.DPS_STEPS, model=None:
                        tuned.append(num_steps)
                        or {"zeta": 1.0, "sigma_stop": 1.0, "tuned_on": f"stub at {num_steps} levels"})

    argv = ["--budget", "0.02", "--distill-budget", "0.05", "--limit", "64", "--n-images", "4", "--slow-images", "2",
            "--batch-size", "2", "--steps", "3", "--restarts", "2", "--encoder-fit-steps", "3",
            "--models", str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--quiet", "--no-publish"]
    result = restore.main([*argv, "--train", "--tasks", "inpaint-0.8"])
    default_name = restore.default_method(build_operator({"kind": "inpaint", "p": 0.8}))
    assert default_name == "posterior-net-observations"  # inpainting splits its observations
    applies = [m for m in restore.METHODS if m != "compressed-sensing"]  # MRI only
    rows = result["rows"]
    assert [(r["task"], r["method"]) for r in rows] == [("inpaint-0.8", m) for m in applies]
    assert [r["method"] for r in rows if r["default"]] == [default_name]  # rsd restore's method
    best = max((r for r in rows if r["method"] in restore.BASELINES), key=lambda r: r["psnr"])
    for row in rows:
        assert row["psnr"] > 0 and 0 < row["ssim"] <= 1 and row["seconds_per_image"] > 0
        assert row["n_images"] == (2 if row["method"] in restore.SLOW_METHODS else 4)
        assert row["vs"] == best["method"]
        if row is not best:
            lo, hi = row["ci95"]
            assert lo <= row["psnr_diff"] <= hi and row["ssim_ci95"][0] <= row["ssim_diff"] <= row["ssim_ci95"][1]
    assert "ci95" not in best
    assert tuned == [restore.DPS_STEPS, 120] and result["task_settings"][0]["dps_1000_config"]["num_steps"] == 120
    # the four encoder rows: two posterior nets, the latent encoder and its single pass
    assert [r["fit_seconds"] > 0 for r in rows if "fit_seconds" in r] == [True] * 4
    rerun = restore.main([*argv, "--tasks", "inpaint-0.8,mri-r4"])  # no --train: the MRI models are missing
    assert list(rerun["skipped"]) == ["mri-r4"]
    assert rerun["rows"] == rows


def test_tuning_sweeps_the_posterior_net_fit_on_validation_images(tmp_path, monkeypatch):
    """benchmarks/restore_tuning.py on the posterior-mean network: one fit per grid value (the value recorded as
    swept, not overwritten by the restoration's own fields), scored on validation images, appended to its file."""
    from benchmarks import restore, restore_tuning

    restore.main(["--budget", "0.02", "--distill-budget", "0.02", "--limit", "64", "--n-images", "2",
                  "--methods", "classical", "--models", str(tmp_path / "models"), "--out", str(tmp_path / "out"),
                  "--quiet", "--no-publish", "--train", "--tasks", "inpaint-0.8"])
    monkeypatch.setattr(restore_tuning, "RESULTS_DIR", tmp_path)
    records = restore_tuning.main(["--task", "inpaint-0.8", "--method", "posterior-net", "--models",
                                   str(tmp_path / "models"), "--n-images", "2", "--grid", '{"steps": [2, 3]}',
                                   "--base", '{"width": 8}', "--out", str(tmp_path / "out")])
    assert [(r["settings"]["steps"], r["settings"]["encoder"]["steps"]) for r in records] == [(2, 2), (3, 3)]
    assert all(r["split"] == "validation" and r["psnr"] > 0 for r in records)
    assert json.loads((tmp_path / "restore_tuning.json").read_text()) == records
    # each record names its model and keeps its per-image PSNRs, so that two runs compare as pairs
    assert {r["model_sha256"] for r in records} == {restore.model_digest(tmp_path / "models/inpaint-0.8/generator")}
    assert all(abs(sum(r["psnr_per_image"]) / 2 - r["psnr"]) < 1e-3 for r in records)
    compare = ["--task", "inpaint-0.8", "--method", "posterior-net", "--compare", '{"steps": 2}']
    [diff] = restore_tuning.main([*compare, '{"steps": 3}'])
    assert diff["diff"] == pytest.approx(records[1]["psnr"] - records[0]["psnr"], abs=1e-3)
    assert diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1] and diff["n_images"] == 2
    with pytest.raises(SystemExit, match="no posterior-net record"):
        restore_tuning.main([*compare, '{"steps": 4}'])
    # the restoration's own fields land on the restoration, the fit's on the fit (here: the cached 3-step one)
    again = restore_tuning.main(["--task", "inpaint-0.8", "--method", "posterior-net", "--models",
                                 str(tmp_path / "models"), "--n-images", "2", "--grid", '{"consistency_iters": [1, 7]}',
                                 "--base", '{"width": 8, "steps": 3}', "--out", str(tmp_path / "out")])
    assert [(r["settings"]["consistency_iters"], r["settings"]["encoder"]["steps"], r["settings"]["batch_size"],
             r["settings"]["encoder"]["batch_size"]) for r in again] == [(1, 3, 2, 32), (7, 3, 2, 32)]


def test_the_fit_cache_key_names_the_split_strength_the_fit_uses(monkeypatch):
    """The benchmark caches fits by their settings: a default fit on inpainting observations splits with the
    operator's default for restorers, so its key says so and matches the same value given explicitly; where an
    operator has no such default (or the fit is on generator samples), the key is what it was before."""
    from benchmarks.restore import cache_settings
    from rsd_core.restore.encoder import EncoderConfig

    inpaint, blur = build_operator({"kind": "inpaint", "p": 0.8}), build_operator({"kind": "blur", "sigma_n": 0.2})
    default = RestoreConfig()
    key = cache_settings(default, inpaint)["encoder"]
    assert key["holdout_delta"] == inpaint.restorer_further == 0.2
    assert key == cache_settings(RestoreConfig(encoder=EncoderConfig(holdout_delta=0.2)), inpaint)["encoder"]
    assert "holdout_delta" not in cache_settings(default, blur)["encoder"]
    monkeypatch.setattr(inpaint, "restorer_further", None)
    assert "holdout_delta" not in cache_settings(default, inpaint)["encoder"]


def test_dps_settings_come_from_validation_runs_on_the_same_teacher(tmp_path, monkeypatch):
    """The best validation run of the task and length, counted only where it was tuned on the teacher at hand:
    runs on another teacher (or recorded before records named theirs) leave the settings untuned."""
    from benchmarks import restore

    def run(zeta, psnr, model, split="validation", num_steps=restore.DPS_STEPS):
        return {"task": "inpaint-0.8", "method": "dps", "split": split, "psnr": psnr, "n_images": 16,
                "settings": {"schedule": "ancestral", "num_steps": num_steps, "zeta": zeta, "sigma_stop": 0.3},
                **({"model_sha256": model} if model else {})}

    records = [run(0.3, 19.0, "a"), run(1.0, 19.5, "a"), run(3.0, 25.0, "b"), run(10.0, 30.0, None),
               run(0.1, 40.0, "a", split="test"), run(0.03, 40.0, "a", num_steps=1000)]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "restore_tuning.json").write_text(json.dumps(records))
    monkeypatch.setattr(restore, "ROOT", tmp_path)
    assert restore.dps_settings("inpaint-0.8", model="a")["zeta"] == 1.0
    assert restore.dps_settings("inpaint-0.8", model="b")["zeta"] == 3.0
    assert restore.dps_settings("inpaint-0.8", model="c")["tuned_on"] is None
    assert restore.dps_settings("inpaint-0.8", 1000, "a")["zeta"] == 0.03
    (tmp_path / "teacher").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "teacher" / "model.safetensors"))
    assert len(restore.model_digest(tmp_path / "teacher")) == 16


def test_published_rows_under_former_names_are_renamed(tmp_path, monkeypatch):
    """Rows published before the rows were named for what they run keep their numbers under the new names, the
    former ``generator`` alias row becoming ``default`` on the method it repeated."""
    from benchmarks import restore

    old = {"date": "2026-12-03", "tasks": ["superres-x2"], "task_settings": [{"task": "superres-x2"}], "rows": [
        {"task": "superres-x2", "method": "classical", "psnr": 20.4},
        {"task": "superres-x2", "method": "generator-posterior-net", "psnr": 20.7},
        {"task": "superres-x2", "method": "generator", "alias_of": "generator-posterior-net", "psnr": 20.7}]}
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "restore.json").write_text(json.dumps(old))
    monkeypatch.setattr(restore, "ROOT", tmp_path)
    merged = restore.with_published_tasks({"rows": [], "tasks": ["inpaint-0.8"], "task_settings": []})
    assert [(r["method"], r["default"]) for r in merged["rows"]] == [("classical", False),
                                                                     ("posterior-net-generator", True)]
    assert merged["tasks"] == ["inpaint-0.8", "superres-x2"]  # TASKS' order, not the order they ran in


def test_an_updated_config_is_validated_like_a_new_one():
    """Spec.updated builds the benchmark's and serving's configs: a bad value must not slip through."""
    assert LATENT_OPTIMISATION.updated(restarts=2) == RestoreConfig(steps=30, restarts=2, encoder=None)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        LATENT_OPTIMISATION.updated(restarts=0)
    with pytest.raises(ValueError, match="steps 0 restores nothing without an encoder"):
        RestoreConfig().updated(encoder=None)
