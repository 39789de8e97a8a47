"""The fitted restorer as a registered MLflow model: ``rsd restore``'s network, served and reused.

``rsd restore`` fits a network for a dataset (the posterior-mean network by default), then restores
every observation with one pass of it. That fit is the expensive part, so it is registered as a model
version of its own, named from the generator and the dataset (:func:`restorer_name`), tagged with the
generator version it was fitted for, the dataset's fingerprint and a hash of the restore settings:

* a later ``rsd restore`` of the same generator, dataset and settings (a rerun after a failure in the
  write step, say) finds that version and restores with it instead of fitting again;
* ``rsd restore --restorer models:/...`` restores any dataset of the same operator with a registered one;
* its ``python_function`` flavour (this module is the ``loader_module``; the generator folder, the
  network's safetensors and the settings are its data, no pickled code) serves it:
  ``{"observations": ..., <state>: ...}`` -> ``{"mean", "spread"}``, the same function
  (:func:`rsd_core.restore.methods.restore`, by the settings' ``method``) and settings as ``rsd restore``'s
  shards.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import Schema, TensorSpec

from rsd_core.data.manifest import expected_state
from rsd_core.kinds import build_operator
from rsd_core.restore.encoder import load_encoder
from rsd_core.restore.estimate import RestoreConfig
from rsd_core.restore.methods import RestoreModels, restore
from rsd_core.stages import MODEL_FILES, read_card
from tasks.request_limits import RequestLimits
from tasks.serving import answers_errors, observation_inputs

ENCODER_FILE = "restorer.safetensors"
SETTINGS_FILE = "restore.json"
GENERATOR_FILES = (*MODEL_FILES, "card.json")
TAG_GENERATOR = "rsd.generator"  # "<name>/<version>" of the generator it was fitted for
TAG_FINGERPRINT = "rsd.dataset_fingerprint"
TAG_SETTINGS = "rsd.restore_settings"  # settings_hash of the RestoreConfig
TAG_CONFIG = "rsd.restore_config"  # the RestoreConfig as JSON: read without downloading the model
TAG_FITTED_ON = "rsd.fitted_on"
TAG_OPERATOR = "rsd.operator_kind"


def restorer_name(generator_name: str, dataset_name: str) -> str:
    """``<generator name>.restorer.<dataset name>`` with the dataset's name reduced to registry-safe characters."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", dataset_name.lower()).strip("-") or "dataset"
    return f"{generator_name}.restorer.{slug}"


def settings_hash(config: RestoreConfig) -> str:
    """A short hash of every restore setting: a registered restorer is reused only with the same ones. ``method``
    is left out: a restorer's network fixes it (``encoder.target``), and restorers registered before the field
    existed are still found."""
    return hashlib.sha256(config.model_dump_json(exclude={"method"}).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RegisteredRestorer:
    """A registered restorer version: where it is and what it was fitted for."""

    name: str
    version: int
    generator: str
    fingerprint: str
    fitted_on: str
    config: RestoreConfig

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def restorer_tags(generator: str, fingerprint: str, config: RestoreConfig, fitted_on: str,
                  operator_kind: str) -> dict[str, str]:
    """The tags a restorer version is found and checked by."""
    return {TAG_GENERATOR: generator, TAG_FINGERPRINT: fingerprint, TAG_SETTINGS: settings_hash(config),
            TAG_CONFIG: config.model_dump_json(), TAG_FITTED_ON: fitted_on, TAG_OPERATOR: operator_kind}


def _registered(version: ModelVersion) -> RegisteredRestorer:
    return RegisteredRestorer(version.name, int(version.version), version.tags.get(TAG_GENERATOR, ""),
                              version.tags.get(TAG_FINGERPRINT, ""), version.tags.get(TAG_FITTED_ON, ""),
                              RestoreConfig.model_validate_json(version.tags[TAG_CONFIG]))


def find_restorer(client: MlflowClient, name: str, generator: str, fingerprint: str,
                  config: RestoreConfig) -> RegisteredRestorer | None:
    """The latest version of ``name`` fitted for this generator, dataset and settings, if any."""
    query = (f"name = '{name}' and tags.`{TAG_GENERATOR}` = '{generator}' and "
             f"tags.`{TAG_FINGERPRINT}` = '{fingerprint}' and tags.`{TAG_SETTINGS}` = '{settings_hash(config)}'")
    try:
        found = client.search_model_versions(query)
    except MlflowException:
        return None
    return _registered(max(found, key=lambda v: int(v.version))) if found else None


def resolve_restorer(client: MlflowClient, uri: str) -> RegisteredRestorer:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` of a restorer (a ValueError otherwise)."""
    ref = uri.removeprefix("models:/")
    name, _, which = ref.rpartition("@") if "@" in ref else ref.rpartition("/")
    if not uri.startswith("models:/") or not name or not which:
        raise ValueError(f"restorer {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    try:
        version = (client.get_model_version(name, which) if which.isdigit()
                   else client.get_model_version_by_alias(name, which))
    except MlflowException as err:
        raise ValueError(f"restorer {uri}: {' '.join(err.message.split())}") from None
    if TAG_GENERATOR not in version.tags or TAG_CONFIG not in version.tags:
        raise ValueError(f"{uri} is not a restorer registered by rsd restore (no '{TAG_GENERATOR}' tag)")
    return _registered(version)


def register_restorer(client: MlflowClient, name: str, tags: dict[str, str],
                      log_model: Callable[[], ModelInfo]) -> RegisteredRestorer:
    """Log the restorer (``log_model``) and register it as a new version of ``name`` with ``tags``."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Restorers fitted by rsd restore for one generator "
                                           "and one dataset of corrupted observations")
        except MlflowException as race:
            if "RESOURCE_ALREADY_EXISTS" not in (getattr(race, "error_code", "") or ""):
                raise
    info = log_model()
    version = client.create_model_version(name, info.model_uri, run_id=info.run_id, tags=tags,
                                          model_id=info.model_id)
    return _registered(client.get_model_version(name, version.version))


def download_restorer(restorer: RegisteredRestorer, dst: Path) -> Path:
    """The restorer's data folder (generator files, network, settings) under ``dst``."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=restorer.uri, dst_path=str(dst)))
    return local / "data" / "restorer"


def read_settings(folder: Path) -> RestoreConfig:
    """The restore settings the restorer in ``folder`` was fitted with (and restores with)."""
    return RestoreConfig.model_validate_json((folder / SETTINGS_FILE).read_text())


def save_model(path: str, mlflow_model: Any, generator_dir: str | Path, encoder_file: str | Path,
               config: RestoreConfig, example: dict[str, np.ndarray]) -> None:
    """The flavour hook of ``Model.log(flavor=tasks.restorer, ...)``: a python_function model whose data
    are the generator folder, the fitted network and the settings; signature and input example from
    ``example`` (one observation and its state)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "restorer"
        data.mkdir()
        for file in GENERATOR_FILES:
            if (Path(generator_dir) / file).exists():
                shutil.copy(Path(generator_dir) / file, data / file)
        shutil.copy(encoder_file, data / ENCODER_FILE)
        (data / SETTINGS_FILE).write_text(config.model_dump_json(indent=1))
        inputs = Schema([TensorSpec(value.dtype, (-1, *value.shape[1:]), key) for key, value in example.items()])
        image_shape = tuple(read_card(generator_dir).image_shape)
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape), key) for key in ("mean", "spread")])
        mlflow.pyfunc.save_model(path, loader_module=__name__, data_path=str(data), mlflow_model=mlflow_model,
                                 signature=ModelSignature(inputs, outputs), input_example=example,
                                 pip_requirements=["torch", "safetensors"])


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> RestorerModel:
    """The pyfunc loader: ``data_path`` is the copied data folder."""
    return RestorerModel(Path(data_path))


def example_inputs(generator_dir: str | Path, y: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named inputs of one request: observations, then the operator's per-sample state."""
    card = read_card(generator_dir)
    keys = expected_state(build_operator(card.operator), card.image_shape)
    return {"observations": y.astype(np.float32), **{k: state[k].astype(keys[k].dtype) for k in keys}}


class RestorerModel:
    """Restorations of observations by a fitted restorer (inputs: ``observations`` and the operator's state)."""

    def __init__(self, folder: Path):
        self.card = read_card(folder)
        self.models = RestoreModels(folder, encoder=load_encoder(folder / ENCODER_FILE)[0])
        self.config = read_settings(folder)
        self.limits = RequestLimits.from_env()

    @answers_errors
    def predict(self, data: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        if not isinstance(data, dict):
            raise ValueError("inputs must be named arrays: {'observations': ..., <state>: ...}")
        y, state = observation_inputs(data, self.card, self.limits)
        config = self.config.updated(batch_size=min(self.config.batch_size, self.limits.max_batch))
        restored = restore(self.models, y, state, config)
        return {"mean": restored.mean.numpy(), "spread": restored.spread.numpy()}
