"""Export a saved one-step generator for serving: ONNX, a ``torch.export`` program (.pt2), safetensors
weights and a model card JSON.

The graph is one network evaluation, ``x = G(sigma_init * eps)``, with the randomness outside it: ``eps`` and
the uniform inputs of the kind's input law (the objective's, e.g. ``u`` for an inpainting mask, ``u`` and ``v``
for MRI's further mask and coil maps), so every runtime gives the same image for the same inputs and a caller
cannot get the law wrong. Which formats a kind exports to is declared in its registration (MRI: .pt2 only;
docs/pipeline.md, "Exported model").
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from rsd_core.kinds import EXPORT_FORMATS, check_export
from rsd_core.stages import MODEL_FILES, ModelCard, load_model
from rsd_core.train.objectives import Objective

ONNX_FILE = "generator.onnx"
PT2_FILE = "generator.pt2"
CARD_FILE = "card.json"


class ExportError(ValueError):
    """The saved model cannot be exported (wrong kind, unsupported operator)."""


class OneStepExport(nn.Module):
    """G(sigma_init * eps) with the generator's input state drawn from U[0, 1) inputs as a pure function."""

    def __init__(self, net: nn.Module, objective: Objective, sigma_init: float, image_shape: tuple[int, ...]):
        super().__init__()
        self.net = net
        self.objective = objective
        self.sigma_init = float(sigma_init)
        self.image_shape = tuple(image_shape)
        self.law = objective.input_law(self.image_shape)

    def input_names(self) -> list[str]:
        return ["eps", *(i.name for i in self.law.inputs)]

    def forward(self, eps: torch.Tensor, u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        z = self.sigma_init * eps
        sigma = torch.full_like(eps[:, 0, 0, 0], self.sigma_init)
        uniforms = [x for x in (u, v) if x is not None]
        return self.objective.denoise(self.net, z, sigma, self.law.state(*uniforms))


def draw_inputs(module: OneStepExport, shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(eps, then each uniform input) for ``n`` images from one seeded generator: the exported model's inputs."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((n, *shape), generator=gen)
    return (eps, *(torch.rand((n, *i.shape), generator=gen) for i in module.law.inputs))


def draw_card_inputs(inputs: dict[str, dict], n: int, seed: int) -> list[torch.Tensor]:
    """The same inputs as :func:`draw_inputs`, read from card.json's ``inputs`` (for callers without this
    code's model classes, e.g. a registered program): in order, N(0, 1) or U[0, 1) of the recorded shape."""
    gen = torch.Generator().manual_seed(seed)
    draw = {"N(0, 1)": torch.randn, "U[0, 1)": torch.rand}
    return [draw[spec["law"]]((n, *spec["shape"][1:]), generator=gen) for spec in inputs.values()]


def load_exportable(
    model_dir: str | Path, formats: tuple[str, ...] = EXPORT_FORMATS
) -> tuple[OneStepExport, ModelCard]:
    """The saved generator in ``model_dir`` wrapped for export (eval mode, no grad)."""
    net, objective, card = load_model(model_dir)
    if card.kind != "generator":
        raise ExportError(f"{model_dir}: model kind is '{card.kind}', export needs a distilled 'generator'")
    try:
        check_export(card.operator, formats)
    except ValueError as err:
        raise ExportError(f"{model_dir}: {err}") from None
    return OneStepExport(net, objective, card.sigma_init, card.image_shape).eval(), card


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


def export_generator(
    model_dir: str | Path,
    out_dir: str | Path,
    extra_metrics: dict[str, float] | None = None,
    formats: tuple[str, ...] = EXPORT_FORMATS,
) -> Path:
    """Write the requested ``formats`` (ONNX, .pt2), the saved model (model.json + model.safetensors)
    and ``card.json`` to ``out_dir``.

    ``out_dir`` stays a valid saved-model folder, so :func:`rsd_core.stages.sampler_for` samples it too.
    ``extra_metrics`` (e.g. the selection's Proximal FD) are added to the card's metrics.
    """
    module, card = load_exportable(model_dir, formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (Path(model_dir) / name).exists():
            shutil.copyfile(Path(model_dir) / name, out / name)
    example = draw_inputs(module, card.image_shape, 2, seed=0)
    writers = {"onnx": (export_onnx, ONNX_FILE), "pt2": (export_pt2, PT2_FILE)}
    with torch.no_grad():
        for fmt in formats:
            write, name = writers[fmt]
            write(module, example, out / name)
    inputs = {"eps": {"shape": ["batch", *card.image_shape], "law": "N(0, 1)"}}
    for i in module.law.inputs:
        inputs[i.name] = {"shape": ["batch", *i.shape], "law": "U[0, 1)", "derives": i.derives}
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
        "files": {**{fmt: writers[fmt][1] for fmt in formats}, "weights": "model.safetensors", "config": "model.json"},
    }
    (out / CARD_FILE).write_text(json.dumps(exported, indent=1))
    return out
