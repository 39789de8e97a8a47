"""Export a saved one-step generator for serving: ONNX, a ``torch.export`` program (.pt2),
safetensors weights and a model card JSON.

The exported graph is one network evaluation, ``x = G(sigma_init * eps)``. Randomness stays
*outside* the graph so every runtime gives the same image for the same inputs:

* operators without an input state (identity, blur, super-resolution): one input ``eps``
  (B, C, H, W) ~ N(0, I);
* inpainting generators, whose network sees a random input mask with survival
  ``keep = (1 - p)(1 - delta)``: a second input ``u`` (B, 1, H, W) ~ U[0, 1) and the graph
  computes ``mask = (u < keep)``, exactly as :func:`rsd_core.operators.bernoulli_mask` does.
  Feeding ``u`` rather than a mask keeps the mask law inside the model, so a caller cannot get
  the survival rate wrong.

MRI generators need a coil-map bank and complex FFTs that ONNX does not cover; they are
rejected with an error naming the kind (their saved folder still serves through
:func:`rsd_core.stages.sampler_for`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from rsd_core.objectives import AmbientDiffusionObjective, Objective
from rsd_core.stages import ModelCard, load_model

ONNX_FILE = "generator.onnx"
PT2_FILE = "generator.pt2"
CARD_FILE = "card.json"
EXPORTABLE_KINDS = ("identity", "blur", "superres", "inpaint")


class ExportError(ValueError):
    """The saved model cannot be exported (wrong kind, unsupported operator)."""


class OneStepExport(nn.Module):
    """G(sigma_init * eps) with the input mask drawn from ``u`` (inpainting) as a pure function."""

    def __init__(self, net: nn.Module, objective: Objective, sigma_init: float):
        super().__init__()
        self.net = net
        self.objective = objective
        self.sigma_init = float(sigma_init)
        self.uses_mask = isinstance(objective, AmbientDiffusionObjective)
        if self.uses_mask:
            op = objective.operator
            self.keep = (1.0 - op.p) * (1.0 - op.delta)

    def input_names(self) -> list[str]:
        return ["eps", "u"] if self.uses_mask else ["eps"]

    def forward(self, eps: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        z = self.sigma_init * eps
        sigma = torch.full_like(eps[:, 0, 0, 0], self.sigma_init)
        state = {"mask": (u < self.keep).to(eps.dtype)} if self.uses_mask else {}
        return self.objective.denoise(self.net, z, sigma, state)


def draw_inputs(module: OneStepExport, shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(eps[, u]) for ``n`` images from one seeded generator: the exported model's inputs."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((n, *shape), generator=gen)
    if not module.uses_mask:
        return (eps,)
    return eps, torch.rand((n, 1, *shape[1:]), generator=gen)


def load_exportable(model_dir: str | Path) -> tuple[OneStepExport, ModelCard]:
    """The saved generator in ``model_dir`` wrapped for export (eval mode, no grad)."""
    net, objective, card = load_model(model_dir)
    if card.kind != "generator":
        raise ExportError(f"{model_dir}: model kind is '{card.kind}', export needs a distilled 'generator'")
    if card.operator.kind not in EXPORTABLE_KINDS:
        raise ExportError(
            f"{model_dir}: operator kind '{card.operator.kind}' cannot be exported (supported: {EXPORTABLE_KINDS})"
        )
    return OneStepExport(net, objective, card.sigma_init).eval(), card


def _batch_dims(module: OneStepExport) -> dict[str, dict[int, torch.export.Dim]]:
    batch = torch.export.Dim("batch", min=1, max=65536)
    return {name: {0: batch} for name in module.input_names()}


def export_onnx(module: OneStepExport, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """ONNX with a dynamic batch axis (dynamo exporter; needs onnxscript)."""
    import onnx

    with warnings.catch_warnings():  # eps and u share one batch Dim on purpose; the exporter says so
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        program = torch.onnx.export(
            module,
            example,
            input_names=module.input_names(),
            output_names=["images"],
            dynamic_shapes=_batch_dims(module),
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path))
    return path


def export_pt2(module: OneStepExport, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """A ``torch.export`` program with a dynamic batch axis, loadable without this code."""
    program = torch.export.export(module, example, dynamic_shapes=_batch_dims(module))
    torch.export.save(program, str(path))
    return path


def export_generator(model_dir: str | Path, out_dir: str | Path, extra_metrics: dict[str, float] | None = None) -> Path:
    """Write ONNX, .pt2, the saved model (model.json + model.safetensors) and ``card.json`` to ``out_dir``.

    ``out_dir`` stays a valid saved-model folder, so :func:`rsd_core.stages.sampler_for` samples it too.
    ``extra_metrics`` (e.g. the selection's Proximal FD) are added to the card's metrics.
    """
    module, card = load_exportable(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "model.safetensors"):
        shutil.copyfile(Path(model_dir) / name, out / name)
    example = draw_inputs(module, card.image_shape, 2, seed=0)
    with torch.no_grad():
        export_onnx(module, example, out / ONNX_FILE)
        export_pt2(module, example, out / PT2_FILE)
    inputs = {"eps": {"shape": ["batch", *card.image_shape], "law": "N(0, 1)"}}
    if module.uses_mask:
        inputs["u"] = {"shape": ["batch", 1, *card.image_shape[1:]], "law": "U[0, 1)", "mask": f"u < {module.keep}"}
    exported = {
        "format": "rsd-one-step-generator/1",
        "kind": card.kind,
        "operator": card.operator.model_dump(),
        "objective": card.objective,
        "sigma_init": card.sigma_init,
        "image_shape": list(card.image_shape),
        "value_range": [-1.0, 1.0],
        "network_evaluations": 1,
        "inputs": inputs,
        "output": {"name": "images", "shape": ["batch", *card.image_shape]},
        "dataset_fingerprint": card.dataset_fingerprint,
        "distill_steps": card.steps,
        "metrics": {**card.metrics, **(extra_metrics or {})},
        "code_version": card.code_version,
        "network": card.network.model_dump(),
        "files": {"onnx": ONNX_FILE, "pt2": PT2_FILE, "weights": "model.safetensors", "config": "model.json"},
    }
    (out / CARD_FILE).write_text(json.dumps(exported, indent=1))
    return out
