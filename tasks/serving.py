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
  operator state (e.g. ``mask``), by :func:`rsd_core.restore.methods.restore_with_model`; returns
  ``mean`` and ``spread`` (none from the ``classical`` and ``projection`` methods). The params are
  :class:`~rsd_core.restore.estimate.RestoreConfig`'s scalar fields (``method`` included), with the defaults of
  latent optimisation (:data:`~rsd_core.restore.estimate.LATENT_OPTIMISATION`): one request has no dataset to fit
  a network on, so the methods that fit one (``posterior-net``, and ``latent``'s encoder) are refused, as is
  ``dps``, which needs the teacher.

The model's signature therefore describes these params, not tensor inputs (a tensor signature
would make MLflow drop every input but ``eps``/``u``); the pt2 program's tensor inputs are in
card.json. Serving needs this project installed (its image, or ``--env-manager local`` in its venv).

:func:`save_model` is the flavour hook that ``mlflow.models.Model.log(flavor=tasks.serving)``
calls, so the model is logged, with both flavours, in one step.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from rsd_core.data.manifest import expected_state
from rsd_core.export.onestep import CARD_FILE, ONNX_FILE, draw_card_inputs, draw_inputs, load_exportable
from rsd_core.kinds import build_operator
from rsd_core.operators import State
from rsd_core.restore.estimate import LATENT_OPTIMISATION, RestoreConfig
from rsd_core.restore.methods import get_method, restore_with_model
from rsd_core.stages import MODEL_FILES, ModelCard, read_card
from tasks.request_limits import RequestLimits

EXTRA_FILES = "extra_files"
_log = logging.getLogger(__name__)
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
    files = [Path(export_dir) / f for f in (ONNX_FILE, CARD_FILE, *MODEL_FILES)]
    extra = [str(f) for f in files if f.exists()]  # no ONNX file when the export formats leave it out
    mlflow.pytorch.save_model(module, path, mlflow_model=mlflow_model, input_example=example,
                              signature=ModelSignature(inputs, outputs), serialization_format="pt2",
                              pip_requirements=["torch"], extra_files=extra)
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=__name__, conda_env="conda.yaml",
                               python_env="python_env.yaml")
    mlflow_model.signature = ModelSignature(params=params_schema())  # the pt2 export needed the tensor one
    # The pyfunc's input example (what a request sends), written by MLflow's own example writer: the
    # public one is only reachable through pyfunc.save_model, which would drop the pytorch flavour.
    _save_example(mlflow_model, ({"count": np.array([2])}, {"seed": 0}), path)
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(path: str, model_config: dict | None = None) -> GeneratorModel:
    """The pyfunc loader: ``path`` is the model's root folder."""
    return GeneratorModel(Path(path))


def invalid_input(message: str) -> MlflowException:
    """An error the scoring server answers with 400 and the message (one line, no stack trace)."""
    return MlflowException.invalid_parameter_value(" ".join(message.split()))


def answers_errors(predict: Callable[..., dict[str, np.ndarray]]) -> Callable[..., dict[str, np.ndarray]]:
    """Wrap a pyfunc ``predict`` so that no response body carries a stack trace.

    MLflow's scoring server answers an :class:`MlflowException` with its message and puts the traceback
    of any other exception into the body. Bad inputs are caught before any work and raised as
    ValueError (400 with their message); anything else is logged here, with its traceback, and
    answered as a 500 that says where to look.
    """

    @functools.wraps(predict)
    def guarded(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        try:
            return predict(*args, **kwargs)
        except MlflowException:
            raise
        except ValueError as err:
            raise invalid_input(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the server must answer, the log keeps the details
            _log.exception("predict failed")
            raise MlflowException(f"internal error ({type(err).__name__}); the server's log has the details",
                                  error_code=INTERNAL_ERROR) from None

    return guarded


def observation_inputs(data: dict[str, Any], card: ModelCard, limits: RequestLimits) -> tuple[torch.Tensor, State]:
    """The request's observations and per-sample state as tensors, each checked against the model's
    operator and image shape (a ValueError naming the input otherwise)."""
    operator = build_operator(card.operator)
    needed = expected_state(operator, card.image_shape)
    missing = sorted(set(needed) - set(data))
    if missing:
        raise ValueError(f"'{card.operator.kind}' observations need their per-sample state {missing} as inputs")
    y = _array(data, "observations", np.float32, operator.observation_shape(tuple(card.image_shape)))
    limits.check_rows(len(y), "observations")
    state = {key: _array(data, key, np.dtype(info.dtype), info.shape) for key, info in needed.items()}
    for key, value in state.items():
        if len(value) != len(y):
            raise ValueError(f"input '{key}' has {len(value)} rows for {len(y)} observations")
    return torch.from_numpy(y), {k: torch.from_numpy(v) for k, v in state.items()}


def _array(data: dict[str, Any], name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Input ``name`` as an array of rows of ``shape``."""
    try:
        value = np.ascontiguousarray(np.asarray(data[name], dtype=dtype))
    except (TypeError, ValueError):
        raise ValueError(f"input '{name}' is not a numeric array of rows of shape {list(shape)}") from None
    if value.ndim != len(shape) + 1 or tuple(value.shape[1:]) != tuple(shape):
        raise ValueError(f"input '{name}' has shape {list(value.shape)}; expected [rows, {', '.join(map(str, shape))}]")
    if not np.isfinite(value).all():
        raise ValueError(f"input '{name}' has values that are not finite")
    return value


class GeneratorModel:
    """Samples and restorations of one registered generator (see the module docstring for the inputs)."""

    def __init__(self, root: Path):
        self.folder = root / EXTRA_FILES
        self.card = json.loads((self.folder / CARD_FILE).read_text())
        self.model_card = read_card(self.folder)
        self.program = mlflow.pytorch.load_model(str(root))
        self.limits = RequestLimits.from_env()

    @answers_errors
    def predict(self, data: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        if not isinstance(data, dict):
            raise ValueError("inputs must be named arrays: {'count': n}, {'eps': ..., 'u': ...} or "
                             "{'observations': ..., <state>: ...}")
        config = LATENT_OPTIMISATION.updated(**(params or {}))
        if "observations" in data:  # the server's batch limit caps the batch (MLflow fills in every param)
            return self._restore(data, config.updated(batch_size=min(config.batch_size, self.limits.max_batch)))
        if "eps" in data:
            latents = [torch.from_numpy(_array(data, k, np.float32, tuple(spec["shape"][1:])))
                       for k, spec in self.card["inputs"].items() if k in data]
            self.limits.check_rows(len(latents[0]), "latents")
            return {"images": self._generate(latents)}
        if "count" in data:
            given = np.asarray(data["count"]).reshape(-1)
            if given.size != 1 or not np.issubdtype(given.dtype, np.number):
                raise ValueError(f"count must be one number, got {data['count']!r}")
            count = int(given[0])
            if count < 1:
                raise ValueError(f"count must be >= 1, got {count}")
            self.limits.check_rows(count, "samples")
            return {"images": self._generate(self.draw_latents(count, config.seed))}
        raise ValueError(f"expected an input 'count', 'eps' or 'observations', got {sorted(data)}")

    def draw_latents(self, n: int, seed: int) -> list[torch.Tensor]:
        """The program's inputs for ``n`` images as ``rsd sample`` draws them: eps, then u, from one seed."""
        return draw_card_inputs(self.card["inputs"], n, seed)

    def _generate(self, latents: list[torch.Tensor]) -> np.ndarray:
        """Images of the latents, ``max_batch`` at a time (the latents of a request are drawn at once, so
        chunking does not change them)."""
        if len(latents) != len(self.card["inputs"]):
            raise ValueError(f"this generator takes the inputs {list(self.card['inputs'])}")
        with torch.no_grad():
            return np.concatenate([self.program(*(x[rows] for x in latents)).numpy()
                                   for rows in self.limits.chunks(len(latents[0]))])

    def _restore(self, data: dict[str, Any], config: RestoreConfig) -> dict[str, np.ndarray]:
        if config.encoder is not None or get_method(config.method).model == "teacher":
            raise ValueError(f"method {config.method!r} needs " + ("a network fitted on a whole dataset (rsd restore)"
                             if config.encoder is not None else "the teacher") + "; a request to the generator "
                             "restores with method 'latent', 'classical' or 'projection'")
        y, state = observation_inputs(data, self.model_card, self.limits)
        restored = restore_with_model(self.folder, y, state, config)
        spread = {} if restored.spread is None else {"spread": restored.spread.numpy()}
        return {"mean": restored.mean.numpy(), **spread}
