"""Multi-coil MRI end to end: the Fourier-space Ambient objective against its closed form, the teacher
samplers' fixed further mask, gradient paths of an MRI distillation step, the .pt2 export, and the benchmark.

Closed form. x0 ~ N(0, Sigma) (complex images as [Re, Im]), a fixed coil-map set, a random acquisition
mask M per image and the further mask M~ inside it. With u = P_M~(x0 + sigma n), the loss
||P_M (W u - x0)||^2 over linear predictors W is minimised, when E[P_M^2 | M~] is invertible and M is drawn
independently of x0 given M~, by the posterior mean E[x0 | u, M~] = Sigma P~ (P~ (Sigma + sigma^2 I) P~)^+ u
(P~ = P_M~, Hermitian): the objective recovers the frequencies that no input shows.
"""

import argparse
import json

import pytest
import torch

from rsd_core.config import DistillConfig, DistillTrainConfig, NetworkConfig
from rsd_core.export.onestep import PT2_FILE, ExportError, draw_inputs, export_generator, load_exportable
from rsd_core.kinds import build_operator, objective_for
from rsd_core.operators.mri import MRISpec
from rsd_core.presets import ConfigError, build_config
from rsd_core.select.selection import teacher_truncation_samples
from rsd_core.stages import ModelCard, save_model
from rsd_core.train.distill import DistillPhase, OneStepGenerator
from rsd_core.train.loop import StepContext
from rsd_core.train.objectives import FourierAmbientObjective, edm_weight
from rsd_core.train.pretrain import build_teacher
from rsd_core.train.sampling import TeacherSampler
from tests.gaussian import random_covariance
from tests.test_edm import FixedSigma

SHAPE = (2, 2, 8)  # complex 2x8 images: the column masks act along the 8 columns; 2 rows keep the algebra small
# 2 coils, ACS = columns 3 and 4 of 8; M = ACS + 2 random of the other 6 (R = 2: 15 patterns), M~ = floor(8 / 4) = 2
# lines = the ACS block, so every M~ is the same and one linear map is the most general linear predictor.
SPEC = MRISpec(R=2.0, delta_R=2.0, acs_fraction=0.25, n_coils=2, n_map_variants=1)
TINY = NetworkConfig(img_resolution=8, img_channels=2, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,))


def _matrix(linear_map, d: int) -> torch.Tensor:
    """The (d, d) matrix of a linear map on flattened images (columns = images of the basis vectors)."""
    basis = torch.eye(d, dtype=torch.float32).view(d, *SHAPE)
    return linear_map(basis).double().flatten(1).T


def _problem(n: int, sigma: float, seed: int = 0):
    """Data, observations and the closed form: W* = Sigma P~ C^+ with C = P~ (Sigma + sigma^2 I) P~ = Cov(u)."""
    op = build_operator(SPEC)
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    cov = random_covariance(d, seed=seed, scale=1.0)
    gen = torch.Generator().manual_seed(seed)
    x0 = (torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    state = op.sample_state(n, SHAPE, gen)
    y = op.forward(x0.view(n, *SHAPE), state)
    further = {"mask": op.further_mask(state["mask"][:1], None), "maps_index": state["maps_index"][:1]}
    P = _matrix(lambda b: op.normal(b, {k: v.expand(len(b), *v.shape[1:]) for k, v in further.items()}), d)
    P = (P + P.T) / 2
    C = P @ (cov + sigma**2 * torch.eye(d, dtype=torch.float64)) @ P
    analytic = cov @ P @ torch.linalg.pinv(C, rtol=1e-6, hermitian=True)
    evals, evecs = torch.linalg.eigh(C)
    C_half = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    return op, y, state, further, analytic, C_half, P


class OutputProbe(torch.nn.Module):
    """A 'network' whose output is a free tensor H: records its input u, so that the objective's loss, a
    quadratic in H, can be read off exactly by autograd (its gradient at H = 0 and its Hessian)."""

    def __init__(self, n: int):
        super().__init__()
        self.H = torch.nn.Parameter(torch.zeros(n, *SHAPE, dtype=torch.float64))

    def forward(self, u, sigma, cond=None):
        self.u = u.detach().double().flatten(1)
        return self.H


def least_squares_predictor(objective, y, state) -> torch.Tensor:
    """argmin_W of the objective's loss summed over the samples, with the network h_i = W u_i.

    The loss is sum_i ||A_i h_i - t_i||^2 for per-sample linear maps A_i that depend only on the sample's
    acquisition mask M_i. One forward pass with h = H free gives the gradient g_i = 2 A_i^T (A_i H_i - t_i)
    at H = 0 and, by a Hessian-vector product with V_i = the (i mod d)-th basis vector, a column of
    Q_i = 2 A_i^T A_i for every sample; collecting the columns per mask pattern gives each Q_k. The normal
    equations sum_k Q_k W C_k = -sum_i g_i u_i^T (C_k = sum of u_i u_i^T over the pattern) are then solved.
    """
    n = len(y)
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    probe = OutputProbe(n)
    loss = objective.loss(probe, y, state, torch.Generator().manual_seed(7)).sum()
    (grad,) = torch.autograd.grad(loss, probe.H, create_graph=True)
    basis = torch.eye(d, dtype=torch.float64)[torch.arange(n) % d].view(n, *SHAPE)
    (columns,) = torch.autograd.grad(grad, probe.H, grad_outputs=basis)
    grad, columns, u = grad.detach().flatten(1), columns.flatten(1), probe.u
    pattern = (state["mask"].flatten(1) * 2.0 ** torch.arange(SHAPE[-1])).sum(1).long()
    lhs = torch.zeros(d * d, d * d, dtype=torch.float64)
    for k in pattern.unique():
        rows = pattern == k
        Q = torch.zeros(d, d, dtype=torch.float64)
        for j in range(d):
            Q[:, j] = columns[rows & (torch.arange(n) % d == j)][0]
        C = u[rows].T @ u[rows]
        lhs += torch.kron(C.T.contiguous(), Q)  # vec(Q W C) = (C^T kron Q) vec(W), vec stacking columns
    rhs = -(grad.T @ u).T.reshape(-1)  # vec(-sum_i g_i u_i^T), columns stacked
    w = torch.linalg.lstsq(lhs, rhs[:, None], driver="gelsd").solution[:, 0]
    return w.view(d, d).T


def _relative_error(W, analytic, C_half) -> float:
    """||(W - W*) C^1/2||_F / ||W* C^1/2||_F: the prediction error on the inputs the network really sees."""
    return float(torch.linalg.norm((W - analytic) @ C_half) / torch.linalg.norm(analytic @ C_half))


def _draws(objective: FourierAmbientObjective, y, state, rng):
    """The objective's random draws, in its order: M~ inside M, sigma, then image-domain noise n; with
    P_M x0 = A^H y and P_M~ x0."""
    op = objective.operator
    further = {"mask": op.further_mask(state["mask"], rng), "maps_index": state["maps_index"]}
    sigma = objective.sample_sigma(y.shape[0], rng, y.device)
    x0_acq, x0_further = op.adjoint(y, state), op.adjoint(y, further)
    n = torch.randn(x0_acq.shape, generator=rng, dtype=x0_acq.dtype)
    return further, sigma, x0_acq, x0_further, n


class UnprojectedLoss(FourierAmbientObjective):
    """Naive: the loss on all pixels against the zero-filled target A^H y = P_M x0 (no P_M on h)."""

    def loss(self, net, y, state, rng=None):
        further, sigma, x0_acq, x0_further, n = _draws(self, y, state, rng)
        u = x0_further + sigma.view(-1, 1, 1, 1) * self.operator.normal(n, further)
        h = net(u, sigma, self._cond(n, further["mask"]))
        return edm_weight(sigma) * ((h - x0_acq) ** 2).flatten(1).sum(1)


class NoiseAfterProjection(FourierAmbientObjective):
    """Naive: white noise added after the projection, u = P_M~ x0 + sigma n."""

    def loss(self, net, y, state, rng=None):
        further, sigma, x0_acq, x0_further, n = _draws(self, y, state, rng)
        h = net(x0_further + sigma.view(-1, 1, 1, 1) * n, sigma, self._cond(n, further["mask"]))
        return edm_weight(sigma) * ((self.operator.normal(h, state) - x0_acq) ** 2).flatten(1).sum(1)


def test_fourier_ambient_minimiser_is_the_posterior_mean_given_the_projected_input():
    """Measured: relative error 0.095 / 0.048 / 0.024 at n = 5k / 20k / 80k samples (sampling noise, ~1/sqrt(n));
    the naive variants stay at 0.50 (unprojected loss) and 0.62 (noise after the projection)."""
    sigma, n = 0.8, 80_000
    op, y, state, further, analytic, C_half, P = _problem(n, sigma)
    d = analytic.shape[0]
    assert int(further["mask"].sum()) == 2  # M~ = the ACS block; M adds 2 random lines
    # The posterior mean really infers what the input hides: much of W* lies outside the range of P~.
    hidden = torch.eye(d, dtype=torch.float64) - P @ torch.linalg.pinv(P, rtol=1e-6, hermitian=True)
    assert float(torch.linalg.norm(hidden @ analytic @ C_half) / torch.linalg.norm(analytic @ C_half)) > 0.3

    errors = {}
    objectives = {"ambient": FourierAmbientObjective(op),
                  "floored": FourierAmbientObjective(op, heldout_sigma_floor=2.0),
                  "unprojected": UnprojectedLoss(op), "noise after projection": NoiseAfterProjection(op)}
    for name, objective in objectives.items():
        FixedSigma(objective, sigma)
        errors[name] = _relative_error(least_squares_predictor(objective, y, state), analytic, C_half)
    # the held-out weight floor (above sigma here, so it acts) reweights the lines by what the network is given
    # only, and must not move the minimiser
    assert errors.pop("ambient") < 0.05 and errors.pop("floored") < 0.05, errors
    assert min(errors.values()) > 0.2, errors


def test_fourier_ambient_heldout_floor_weighs_the_held_out_lines_by_the_floors_weight():
    """lambda_h ||P_M h - P_M x0||^2 + (lambda - lambda_h) ||P_M~ h - P_M~ x0||^2 with lambda_h = lambda(floor)
    below the floor (docs/algorithms.md); no floor is EDM's lambda ||P_M h - P_M x0||^2."""
    op = build_operator(SAMPLING_SPEC)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, *IMAGE, generator=gen)
    state = op.sample_state(3, IMAGE, gen)
    y = op.forward(x0, state)
    h = torch.randn(3, *IMAGE, generator=gen)

    def loss(floor):
        objective = FourierAmbientObjective(op, heldout_sigma_floor=floor)
        objective.sample_sigma = lambda batch, generator, device: torch.tensor([0.02, 0.3, 1.5])
        return objective.loss(lambda u, sigma, cond: h, y, state, torch.Generator().manual_seed(1))

    objective = FourierAmbientObjective(op)
    objective.sample_sigma = lambda batch, generator, device: torch.tensor([0.02, 0.3, 1.5])
    further, sigma, x0_acq, x0_further, _ = _draws(objective, y, state, torch.Generator().manual_seed(1))
    assert bool((further["mask"] != state["mask"]).any())  # lines are held out
    observed = ((op.normal(h, state) - x0_acq) ** 2).flatten(1).sum(1)
    seen = ((op.normal(h, further) - x0_further) ** 2).flatten(1).sum(1)
    lam, lam_h = edm_weight(sigma), edm_weight(sigma.clamp_min(0.3))
    torch.testing.assert_close(loss(0.3), lam_h * observed + (lam - lam_h) * seen)
    torch.testing.assert_close(loss(0.0), lam * observed)
    capped, uncapped = loss(0.3), loss(0.0)
    assert float(capped[0]) < 0.9 * float(uncapped[0])  # only the sample below the floor moves
    torch.testing.assert_close(capped[1:], uncapped[1:])


# 8x8 images, 2 coils, ACS = columns 3 and 4; M = ACS + 2 random lines (R = 2), M~ = floor(8 / 2.5) = 3 lines:
# the ACS block and one of M's random lines, so further masks differ between samples.
SAMPLING_SPEC = MRISpec(R=2.0, delta_R=0.5, acs_fraction=0.25, n_coils=2)
IMAGE = (2, 8, 8)


def _random_net(objective, seed: int) -> torch.nn.Module:
    """The tiny U-Net with random (not zero-initialised) weights, so every layer and path matters."""
    net = build_teacher(TINY, objective)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return net.eval()


def _record_projections(monkeypatch, objective) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (M~, maps index) the network's input projection P_M~ is evaluated with, in call order."""
    calls = []
    normal = objective.operator.normal

    def recording(x, state):
        calls.append((state["mask"].clone(), state["maps_index"].clone()))
        return normal(x, state)

    monkeypatch.setattr(objective.operator, "normal", recording)
    return calls


@pytest.mark.parametrize("sampler", ["TeacherSampler", "teacher_truncation_samples"])
def test_teacher_samplers_keep_one_further_mask_for_the_whole_trajectory(monkeypatch, sampler):
    objective = objective_for(build_operator(SAMPLING_SPEC))
    net = _random_net(objective, seed=0)
    calls = _record_projections(monkeypatch, objective)
    if sampler == "TeacherSampler":
        TeacherSampler(net, objective, IMAGE).sample(8, seed=0)
    else:
        teacher_truncation_samples(net, objective, IMAGE, 8, seed=0)
    assert len(calls) == 35  # 18 Heun levels: one batch, every denoiser call projects with the same state
    mask, maps = calls[0]
    for m, s in calls:
        assert torch.equal(m, mask) and torch.equal(s, maps)
    lines = mask.view(8, -1)
    assert (lines.sum(1) == 3).all() and (lines[:, 3:5] == 1).all()  # M~: the ACS block + one random line
    assert len({tuple(row.tolist()) for row in lines}) > 1  # one fresh M~ per sample, not one per batch


class GradientProbe(StepContext):
    """A step context that back-propagates and records the gradient instead of stepping the optimiser."""

    def optimizer_step(self, loss, optimizer, clip):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.gradient = torch.cat([p.grad.flatten() for group in optimizer.param_groups for p in group["params"]])
        return 0.0


def _generator_gradient(phase: DistillPhase) -> torch.Tensor:
    ctx = GradientProbe(rng=torch.Generator().manual_seed(3), device=torch.device("cpu"), bf16=False,
                        channels_last=False)
    phase._generator_step(ctx)
    return ctx.gradient


@pytest.mark.parametrize("detach", [("teacher",), ("fake",), ("teacher", "fake")])
def test_mri_generator_step_backpropagates_through_teacher_and_fake_outputs(monkeypatch, detach):
    """SiD's generator gradient flows through x_g in the target term *and* through each score network's input
    P_M~(x_g + s n) (only their weights are frozen). Recomputed with the teacher's, the fake's or both outputs
    detached, the gradient must change; had distill.py detached f_phi or f_psi itself, the recomputation would
    give the same gradient and this test fails (checked by hand, f_phi and f_psi detached, then f_psi alone:
    change 0.0 exactly). Measured here: 0.21 (teacher), 0.58 (fake), 0.37 (both); the size depends on the drawn
    noise levels (0.002-9.6 over 4 seeds with both detached at batch 4)."""
    objective = objective_for(build_operator(SAMPLING_SPEC))
    teacher = _random_net(objective, seed=0)
    generator = OneStepGenerator(_random_net(objective, seed=2), objective, IMAGE)
    phase = DistillPhase(teacher, objective, generator, _random_net(objective, seed=1),
                         DistillTrainConfig(batch_size=8), DistillConfig(), {})
    full = _generator_gradient(phase)
    assert all(p.grad is None for p in [*teacher.parameters(), *phase.fake.parameters()])  # frozen weights

    denoise = objective.denoise
    cut = {"teacher": teacher, "fake": phase.fake}

    def detached(net, x, sigma, input_state):
        out = denoise(net, x, sigma, input_state)
        return out.detach() if any(net is cut[name] for name in detach) else out

    monkeypatch.setattr(objective, "denoise", detached)
    change = float(torch.linalg.norm(full - _generator_gradient(phase)) / torch.linalg.norm(full))
    assert change > 0.05, change


def _saved_generator(folder, spec=SAMPLING_SPEC):
    card = ModelCard(kind="generator", network=TINY, operator=spec, image_shape=IMAGE, objective="fourier_ambient",
                     dataset_fingerprint="f" * 64, code_version="test")
    return save_model(folder, _random_net(objective_for(build_operator(spec)), seed=0), card)


def test_mri_generator_exports_to_pt2_with_the_projection_inside(tmp_path):
    out = export_generator(_saved_generator(tmp_path / "gen"), tmp_path / "export", formats=("pt2",))
    module, card = load_exportable(out, formats=("pt2",))
    program = torch.export.load(str(out / PT2_FILE)).module()
    for batch in (1, 5):
        inputs = draw_inputs(module, card.image_shape, batch, seed=batch)
        with torch.no_grad():
            expected = module(*inputs)
            # the eager module is the generator G(z) = D(P_M~(z); sigma_init) with the law's M~ and maps
            direct = module.objective.denoise(module.net, 2.5 * inputs[0], torch.full((batch,), 2.5),
                                              module.law.state(*inputs[1:]))
            got = program(*inputs)
        assert got.shape == (batch, *IMAGE)
        assert torch.equal(expected, direct)
        assert (got - expected).abs().max() < 1e-5  # measured: 0.0
    exported = json.loads((out / "card.json").read_text())
    assert list(exported["inputs"]) == ["eps", "u", "v"] and "onnx" not in exported["files"]
    assert exported["inputs"]["u"]["shape"] == ["batch", 1, 1, 8]


def test_exported_mask_law_is_the_generators():
    """The graph's M~ from uniform scores has the law of FourierAmbientObjective.draw_input_state: the ACS block
    always, the same line count, every other column equally likely; the coil-map entries uniform."""
    objective = objective_for(build_operator(SAMPLING_SPEC))
    law = objective.input_law(IMAGE)
    n, gen = 4000, torch.Generator().manual_seed(0)
    exported = law.state(torch.rand((n, 1, 1, 8), generator=gen), torch.rand(n, generator=gen))
    drawn = objective.draw_input_state(n, IMAGE, gen, "cpu")
    for state in (exported, drawn):
        lines = state["mask"].view(n, 8)
        assert (lines.sum(1) == 3).all() and (lines[:, 3:5] == 1).all()
        others = lines[:, [0, 1, 2, 5, 6, 7]].mean(0)
        assert torch.allclose(others, torch.full((6,), 1 / 6), atol=0.03), others
        counts = torch.bincount(state["maps_index"], minlength=SAMPLING_SPEC.n_map_variants) / n
        assert torch.allclose(counts, torch.full_like(counts, 1 / SAMPLING_SPEC.n_map_variants), atol=0.03)


def test_mri_onnx_export_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="'mri' cannot be exported as onnx"):
        build_config("cpu-mri", overrides=["export.formats=[onnx, pt2]"])
    with pytest.raises(ExportError, match="onnx"):
        export_generator(_saved_generator(tmp_path / "gen"), tmp_path / "export", formats=("onnx", "pt2"))


def test_cpu_mri_preset_follows_the_spec_rules():
    config = build_config("cpu-mri")
    op = build_operator(config.data.operator)
    state = op.sample_state(64, (2, 32, 32), torch.Generator().manual_seed(0))
    further = op.further_mask(state["mask"], None)
    assert (state["mask"].view(64, 32).sum(1) == 8).all() and (further.view(64, 32).sum(1) == 6).all()
    assert (further.view(64, 32)[:, 15:17] == 1).all()  # ACS: 2 of 32 central columns, as 20 of 320
    assert config.data.clean_eval_split == "test" and config.export.formats == ["pt2"]
    assert config.selection.extractor == "self-supervised"


def test_acs_holdout_makes_the_acs_lines_droppable_in_that_share_of_the_draws():
    """The further mask with ``acs_holdout`` q: every row keeps the same number of lines inside M; its ACS lines
    can be dropped in about a share q of the rows (never at q = 0, which draws exactly the default's masks)."""
    op = build_operator(build_config("cpu-mri").data.operator)
    state = op.sample_state(4000, (2, 32, 32), torch.Generator().manual_seed(0))
    default = op.further_mask(state["mask"], torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.further_mask(state["mask"], torch.Generator().manual_seed(1), 0.0), default)
    further = op.further_mask(state["mask"], torch.Generator().manual_seed(1), 0.5).view(4000, 32)
    assert (further.sum(1) == 6).all() and not (further * (1 - state["mask"].view(4000, 32))).any()
    acs = op.acs_block(32)
    lost_acs = (further[:, acs] == 0).any(1).float().mean()
    # a freed row drops 2 of its 8 lines: both ACS lines kept with probability (6 * 5) / (8 * 7) = 0.536
    assert abs(float(lost_acs) - 0.5 * (1 - 30 / 56)) < 0.03, float(lost_acs)
    assert (default.view(4000, 32)[:, acs] == 1).all()
    with pytest.raises(ValueError, match="inpainting has no always-sampled"):
        build_operator({"kind": "inpaint", "p": 0.5, "delta": 0.2}).split_observation(
            torch.zeros(1, 1, 4, 4), {"mask": torch.ones(1, 1, 4, 4)}, None, acs_holdout=0.5)


@pytest.mark.slow  # 3.4-6.3 minutes measured on a shared 2-core machine: Inception features on a CPU, the SSL encoder
@pytest.mark.parametrize("maps", ["bank", "estimated"])
def test_mri_benchmark_at_a_toy_budget(tmp_path, capsys, maps):
    from benchmarks import mri
    from benchmarks.report import RESULTS_DIR

    published = [mri.DOC, RESULTS_DIR / "mri.json", *mri.FIGURES.glob("mri_*.png")]
    before = {f: f.read_bytes() for f in published if f.exists()}
    argv = ["--budget", "0.05", "--distill-budget", "0.1", "--n-eval", "8", "--limit", "64", "--checkpoint-every",
            "2", "--quiet", "--no-publish", "--threads", "1", "--out", str(tmp_path), "--maps", maps]
    result = mri.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    (row,) = result["rows"]
    folder = tmp_path / ("R4" if maps == "bank" else "R4-estimated")
    assert row["maps"] == maps and row["acs_lines"] == (2 if maps == "bank" else 6)
    if maps == "estimated":  # the stored maps are ESPIRiT's estimates, not a bank index
        manifest = json.loads((folder / "data" / "manifest.json").read_text())
        assert manifest["operator"]["coil_maps"] == "observed" and "maps" in manifest["state_keys"]
        assert (folder / "generator" / "operator_pool.safetensors").exists()
        return
    assert row.keys() >= {"R", "teacher_fd", "teacher_sampler", "student_fd", "proximal_fd", "extractor",
                          "budget_minutes"}
    assert row["R"] == 4 and row["budget_minutes"] == 0.05 and row["paper_rsd_fid"] == 10.71
    assert row["teacher_kid_std"] > 0 and row["student_kid_std"] > 0 and row["heldout_sigma_floor"] == 0.0
    assert row["teacher_fd"] == min(row["teacher_fd_full"], row["teacher_fd_truncated"])
    assert "Inception" in row["extractor"] and "self-supervised" in row["proximal_extractor"]
    assert result["grids"] == [row["grid"]] and (folder / "selection-self-supervised").is_dir()
    assert json.loads((tmp_path / "mri.json").read_text()) == json.loads(json.dumps(result))
    # references beside the row: the clean model (same network and budget, A = I) and the floor, at the rows' count
    refs = json.loads((tmp_path / "clean-reference" / "references.json").read_text())
    assert row["clean_fd"] == refs["clean"]["fd"] > 0 and row["floor_fd"] == refs["floor"]["fd"] > 0
    assert row["student_over_clean"] == row["student_fd"] / row["clean_fd"] and row["clean_kid_std"] > 0
    assert refs["floor"]["n"] == 8 and result["references"] == refs
    clean_data = json.loads((tmp_path / "clean-reference" / "data" / "manifest.json").read_text())
    assert clean_data["operator"]["kind"] == "identity" and clean_data["image_shape"] == [2, 32, 32]
    assert not (tmp_path / "clean-reference" / "generator").exists()  # a teacher only
    again = mri.main(argv)  # every phase is reused: the same numbers and recorded wall times
    assert again["rows"] == result["rows"]
    assert {f: f.read_bytes() for f in published if f.exists()} == before


def test_mri_references_made_otherwise_are_refused_not_reused(tmp_path):
    """A cached clean model of another budget or sample count would sit beside rows it was not matched with."""
    from benchmarks import mri

    folder = tmp_path / "clean-reference"
    folder.mkdir()
    made_with = {"budget_minutes": 8.0, "n_eval": 100, "seed": 0, "limit": None}
    (folder / "references.json").write_text(json.dumps({"made_with": made_with, "clean": {}, "floor": {}}))
    args = argparse.Namespace(out=str(tmp_path), budget=8.0, n_eval=100, seed=0, limit=None, quiet=True)
    assert mri.references(args)["made_with"] == made_with
    with pytest.raises(SystemExit, match="references.json was made with .*'n_eval': 100.*'n_eval': 128"):
        mri.references(argparse.Namespace(**{**vars(args), "n_eval": 128}))
