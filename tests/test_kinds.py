"""The operator registry: every registered kind (and two toy ones registered here) runs through the
whole pipeline's contract: spec validation, the CLI, forward/adjoint, its objective's loss and
denoiser, one distillation step, selection's image view, export or its clear refusal, its classical
estimate, and restoration as the served model runs it (the request's inputs parsed against the card).

Each toy kind is added in exactly two places, both below: its spec + operator class, and one
``register_kind`` call. The permutation has no state; the row shift has per-sample state (each
observation's own shift), which the dataset, the distillation, restoration and serving carry like a mask.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from pydantic import Field

from rsd_core.config import DistillConfig, DistillTrainConfig, NetworkConfig, OperatorSpecBase
from rsd_core.export.onestep import ExportError, draw_inputs, export_generator, load_exportable
from rsd_core.kinds import (
    OperatorKind,
    build_operator,
    classical_estimate,
    get_kind,
    objective_for,
    register_kind,
    registered_kinds,
    unregister_kind,
)
from rsd_core.operators import Operator, parse_operator_spec
from rsd_core.presets import ConfigError, build_config
from rsd_core.restore.estimate import RestoreConfig
from rsd_core.restore.methods import restore_with_model
from rsd_core.select.selection import corrupted_view
from rsd_core.stages import ModelCard, save_model
from rsd_core.train.distill import distill
from rsd_core.train.objectives import AmbientTweedieObjective, Objective
from rsd_core.train.pretrain import build_teacher
from tasks.request_limits import RequestLimits
from tasks.serving import observation_inputs


# --- place 1 of 2: the toy kind's spec and operator -------------------------------------------
class PermuteSpec(OperatorSpecBase):
    """A fixed random permutation of the pixels (seeded), a linear isometry."""

    kind: Literal["permute"] = "permute"
    perm_seed: int = Field(0, description="seed of the pixel permutation")


class Permute(Operator):
    def _perm(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2] * x.shape[-1]
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.spec.perm_seed)).to(x.device)

    def forward(self, x, state):
        return x.flatten(-2)[..., self._perm(x)].reshape(x.shape)

    def adjoint(self, y, state):
        out = torch.empty_like(y.flatten(-2))
        out[..., self._perm(y)] = y.flatten(-2)
        return out.reshape(y.shape)


class RowShiftSpec(OperatorSpecBase):
    """Each image's rows shifted circularly by its own random amount: a linear isometry with per-sample state."""

    kind: Literal["rowshift"] = "rowshift"


class RowShift(Operator):
    state_keys = ("shift",)

    def sample_state(self, batch, image_shape, rng=None, device="cpu"):
        return {"shift": torch.randint(image_shape[-2], (batch,), generator=rng).to(device)}

    def _roll(self, x, shift, sign):
        return torch.stack([xi.roll(sign * int(s), dims=-2) for xi, s in zip(x, shift, strict=True)])

    def forward(self, x, state):
        return self._roll(x, state["shift"], 1)

    def adjoint(self, y, state):
        return self._roll(y, state["shift"], -1)


# --- place 2 of 2: their registrations --------------------------------------------------------
TOYS = (OperatorKind(PermuteSpec, Permute, Objective, AmbientTweedieObjective, summary="toy pixel permutation"),
        OperatorKind(RowShiftSpec, RowShift, Objective, AmbientTweedieObjective, summary="toy per-image row shift"))


@pytest.fixture(autouse=True, scope="module")
def toy_kinds():
    for kind in TOYS:
        register_kind(kind)
    yield
    for kind in TOYS:
        unregister_kind(kind.name)


KINDS = ("identity", "inpaint", "blur", "superres", "mri", "permute", "rowshift")
TRAIN = DistillTrainConfig(steps=1, batch_size=4, checkpoint_every=1, precision="fp32", lr_rampup_steps=0)


def test_the_builtin_kinds_are_all_tested_here():
    assert set(registered_kinds()) == set(KINDS)


def _setup(kind_name: str, sigma_n: float = 0.0):
    kind = get_kind(kind_name)
    spec = parse_operator_spec({"kind": kind_name, "sigma_n": sigma_n})
    op = build_operator(spec)
    shape = (kind.image_channels or 1, 8, 8)
    return kind, op, shape


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_runs_the_whole_contract(name, tmp_path):
    kind, op, shape = _setup(name)
    rng = torch.Generator().manual_seed(0)
    x = torch.rand((4, *shape), generator=rng) * 2 - 1
    state = op.sample_state(4, shape, rng)

    # spec round trip through a model field typed OperatorSpec
    card = ModelCard(kind="generator", network=NetworkConfig(img_resolution=8, img_channels=shape[0]),
                     operator=op.spec.model_dump(), image_shape=shape, objective="x")
    assert type(card.operator) is kind.spec
    assert ModelCard.model_validate_json(card.model_dump_json()).operator == op.spec

    # forward / adjoint: <A x, y> = <x, A^T y> where linear
    y = op.forward(x, state)
    assert y.shape[1:] == op.observation_shape(shape)
    if op.linear:
        v = torch.randn(y.shape, generator=rng) * (y != 0)
        assert torch.allclose((y * v).sum(), (x * op.adjoint(v, state)).sum(), rtol=1e-4, atol=1e-4)

    # the objective's loss and denoiser
    objective = objective_for(op)
    net_cfg = NetworkConfig(img_resolution=8, img_channels=shape[0], model_channels=8, channel_mult=(1, 2),
                            attn_resolutions=())
    torch.manual_seed(0)
    teacher = build_teacher(net_cfg, objective)
    obs = op.observe(x, state, rng)
    loss = objective.loss(teacher, obs, state, rng)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    input_state = objective.draw_input_state(4, shape, rng, "cpu")
    assert objective.denoise(teacher, x, torch.full((4,), 0.5), input_state).shape == x.shape

    # one distillation step moves the generator
    phase, result = distill(teacher, objective, shape, TRAIN, DistillConfig(), tmp_path / "distill", progress=False)
    assert result.steps == 1 and result.nonfinite_skipped == 0
    moved = [not torch.equal(a, b) for a, b in zip(phase.generator.net.parameters(), teacher.parameters(),
                                                     strict=True)]
    assert any(moved)

    # selection's image view: observations as images of the image's height and width
    assert op.image_view(obs, state).shape[-2:] == shape[-2:]
    assert corrupted_view(x, op, rng).shape[-2:] == shape[-2:]

    # export to every format the kind declares, or a clear refusal
    gen_card = card.model_copy(update={"network": net_cfg, "objective": objective.name})
    model_dir = save_model(tmp_path / "generator", phase.generator_ema.net, gen_card)
    if "pt2" in kind.export_formats:
        out = export_generator(model_dir, tmp_path / "export", formats=("pt2",))
        module, _ = load_exportable(model_dir, ("pt2",))
        inputs = draw_inputs(module, shape, 2, seed=1)
        program = torch.export.load(str(out / "generator.pt2")).module()
        assert torch.allclose(program(*inputs), module(*inputs), atol=1e-5)
    else:
        with pytest.raises(ExportError, match=f"operator kind '{name}' cannot be exported"):
            load_exportable(model_dir)

    # restored like the others: the kind's classical estimate, and what the served model runs (the request's
    # observations and per-sample state parsed against the card, then restoration through the saved generator)
    assert classical_estimate(op, obs, state).shape == x.shape
    request = {"observations": obs.numpy(), **{k: v.numpy() for k, v in state.items()}}
    y_in, state_in = observation_inputs(request, gen_card, RequestLimits())
    assert all(torch.equal(state_in[k], state[k]) for k in state)
    restored = restore_with_model(model_dir, y_in, state_in, RestoreConfig(steps=2, encoder=None))
    assert restored.mean.shape == x.shape and torch.isfinite(restored.mean).all()
    if state:  # restored through each observation's own state, not another's

        def misfit(s):
            return float((op.forward(restored.mean, s) - obs).pow(2).mean())

        assert misfit(state) < misfit({k: v.roll(1, 0) for k, v in state.items()})


def test_the_toy_kind_reaches_the_cli_and_the_dataset_errors():
    from rsd_cli.main import build_parser

    args = build_parser().parse_args(["data", "corrupt", "--source", "fashion-mnist", "--operator", "permute",
                                      "--perm-seed", "3", "--out", "x"])
    from rsd_cli.data_cmd import _operator_spec

    assert _operator_spec(args) == PermuteSpec(perm_seed=3)
    with pytest.raises(ValueError, match="unknown operator kind 'warp' \\(expected one of .*permute"):
        parse_operator_spec({"kind": "warp"})


def test_config_that_cannot_export_is_refused_before_training():
    with pytest.raises(ConfigError, match="operator kind 'mri' cannot be exported as onnx \\(it exports to: pt2\\)"):
        build_config("cpu-smoke", overrides=["data.operator={kind: mri}", "network.img_channels=2"])
    config = build_config("cpu-smoke", overrides=["data.operator={kind: mri}", "export.formats=[pt2]"])
    assert config.export.formats == ["pt2"]


def test_a_kind_name_is_registered_once():
    clash = OperatorKind(PermuteSpec, Operator, Objective, None)
    with pytest.raises(ValueError, match="already registered"):
        register_kind(clash)


@pytest.mark.parametrize("module", ["rsd_core.config", "rsd_core.operators", "rsd_core.train.objectives",
                                    "rsd_core.data", "rsd_core.operators.mri"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    """The spec registry and the config models refer to each other lazily: no import order may break."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
