"""The registered generator as an MLflow model with two flavours: ``pytorch`` and ``python_function``.

``pytorch`` is the ``torch.export`` program (.pt2, no pickle) that ``rsd sample`` and
``mlflow.pytorch.load_model`` use. ``python_function`` makes ``mlflow models serve`` and
``mlflow.pyfunc.load_model`` work: this module is its ``loader_module`` (source code imported
from the installed project, no pickled code objects), loading that same program plus the saved
generator folder logged beside it (``extra_files``: model.json, model.safetensors, card.json,
generator.onnx). :class:`GeneratorModel.predict` takes a dict of arrays (the JSON ``inputs``):

* ``{"count": n}``: n samples, latents drawn from the ``seed`` param exactly as ``rsd sample``
  draws them (same seed, same images);
* ``{"eps": ..., "u": ...}``: the images of given latents (``u`` only for inpainting generators;
  shapes and laws in card.json);
* ``{"observations": ..., <state>: ...}``: restorations of observations with their per-sample
  operator state (e.g. ``mask``), by :func:`rsd_core.restore.restore_with_model`; returns
  ``mean`` and ``spread``. The params are :class:`~rsd_core.restore.RestoreConfig`'s scalar fields, with
  the defaults of latent optimisation (:data:`~rsd_core.restore.LATENT_OPTIMISATION`): one request has no
  dataset to fit the amortised encoder on.

The model's signature therefore describes these params, not tensor inputs (a tensor signature
would make MLflow drop every input but ``eps``/``u``); the pt2 program's tensor inputs are in
card.json. Serving needs this project installed (its image, or ``--env-manager local`` in its venv).

:func:`save_model` is the flavour hook that ``mlflow.models.Model.log(flavor=tasks.serving)``
calls, so the model is logged, with both flavours, in one step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from rsd_core.data import expected_state
from rsd_core.export import CARD_FILE, ONNX_FILE, draw_card_inputs, draw_inputs, load_exportable
from rsd_core.kinds import build_operator
from rsd_core.restore import LATENT_OPTIMISATION, RestoreConfig, restore_with_model
from rsd_core.stages import read_card

EXTRA_FILES = "extra_files"
_PARAM_TYPES = {bool: "boolean", int: "long", float: "double", str: "string"}


# The amortised encoder is fitted on a whole dataset (the rsd_restore workflow), not inside one request.
_NOT_PARAMS = ("encoder",)


def params_schema() -> ParamSchema:
    """Every scalar :class:`RestoreConfig` field as an inference param with its latent-optimisation default
    (``seed`` also seeds sampling)."""
    return ParamSchema([ParamSpec(name, _PARAM_TYPES[type(value)], value)
                        for name in RestoreConfig.model_fields if name not in _NOT_PARAMS
                        for value in [getattr(LATENT_OPTIMISATION, name)]])


def save_model(path: str, mlflow_model: Model, export_dir: str | Path) -> None:
    """Write the MLflow model of the exported generator in ``export_dir`` to ``path``: both flavours."""
    module, card = load_exportable(export_dir, formats=("pt2",))  # the pytorch flavour holds the .pt2 program
    example = draw_inputs(module, card.image_shape, 2, seed=0)  # batch >= 2 keeps the batch axis dynamic
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *x.shape[1:]), name)
                     for name, x in zip(module.input_names(), example, strict=True)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *card.image_shape), "images")])
    files = [Path(export_dir) / f for f in (ONNX_FILE, CARD_FILE, "model.json", "model.safetensors")]
    extra = [str(f) for f in files if f.exists()]  # no ONNX file when the export formats leave it out
    mlflow.pytorch.save_model(module, path, mlflow_model=mlflow_model, input_example=example,
                              signature=ModelSignature(inputs, outputs), serialization_format="pt2",
                              pip_requirements=["torch"], extra_files=extra)
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=__name__, conda_env="conda.yaml",
                               python_env="python_env.yaml")
    mlflow_model.signature = ModelSignature(params=params_schema())  # the pt2 export needed the tensor one
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(path: str, model_config: dict | None = None) -> GeneratorModel:
    """The pyfunc loader: ``path`` is the model's root folder."""
    return GeneratorModel(Path(path))


def _invalid(message: str) -> MlflowException:
    """An error the scoring server answers with 400 and the message."""
    return MlflowException.invalid_parameter_value(message)


class GeneratorModel:
    """Samples and restorations of one registered generator (see the module docstring for the inputs)."""

    def __init__(self, root: Path):
        self.folder = root / EXTRA_FILES
        self.card = json.loads((self.folder / CARD_FILE).read_text())
        self.model_card = read_card(self.folder)
        self.program = mlflow.pytorch.load_model(str(root))

    def predict(self, data: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        if not isinstance(data, dict):
            raise _invalid("inputs must be named arrays: {'count': n}, {'eps': ..., 'u': ...} or "
                           "{'observations': ..., <state>: ...}")
        try:
            config = LATENT_OPTIMISATION.updated(**(params or {}))
        except ValueError as err:
            raise _invalid(" ".join(str(err).split())) from None
        if "observations" in data:
            return self._restore(data, config)
        if "eps" in data:
            latents = [torch.as_tensor(np.asarray(data[k], dtype=np.float32)) for k in self.card["inputs"]
                       if k in data]
            return {"images": self._generate(latents)}
        if "count" in data:
            count = int(np.asarray(data["count"]).reshape(-1)[0])
            if count < 1:
                raise _invalid(f"count must be >= 1, got {count}")
            return {"images": self._generate(self.draw_latents(count, config.seed))}
        raise _invalid(f"expected an input 'count', 'eps' or 'observations', got {sorted(data)}")

    def draw_latents(self, n: int, seed: int) -> list[torch.Tensor]:
        """The program's inputs for ``n`` images as ``rsd sample`` draws them: eps, then u, from one seed."""
        return draw_card_inputs(self.card["inputs"], n, seed)

    def _generate(self, latents: list[torch.Tensor]) -> np.ndarray:
        if len(latents) != len(self.card["inputs"]):
            raise _invalid(f"this generator takes the inputs {list(self.card['inputs'])}")
        with torch.no_grad():
            return self.program(*latents).numpy()

    def _restore(self, data: dict[str, Any], config: RestoreConfig) -> dict[str, np.ndarray]:
        card = self.model_card
        needed = expected_state(build_operator(card.operator), card.image_shape)
        missing = sorted(set(needed) - set(data))
        if missing:
            raise _invalid(f"'{card.operator.kind}' observations need their per-sample state {missing} as inputs")
        y = torch.as_tensor(np.asarray(data["observations"], dtype=np.float32))
        state = {k: torch.as_tensor(np.asarray(data[k], dtype=info.dtype)) for k, info in needed.items()}
        try:
            restored = restore_with_model(self.folder, y, state, config)
        except ValueError as err:
            raise _invalid(str(err)) from None
        return {"mean": restored.mean.numpy(), "spread": restored.spread.numpy()}
