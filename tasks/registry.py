"""Model registry rules: register a generator version once per pipeline execution, then promote it.

Promotion compares Proximal FID, which is only meaningful between models of the *same* corrupted
dataset scored the *same* way (feature extractor and sample count: FDs of different features are on
different scales, and FD is biased by n), so every version carries the dataset fingerprint, that
scoring and its Proximal FD as tags:

* ``champion`` moves to the new version when there is no champion yet, or when the champion was
  trained on the same dataset fingerprint, scored the same way, and the new Proximal FD is below the
  champion's bootstrap interval (``rsd.proximal_fd_interval``, :mod:`rsd_core.select.fd_interval`): a new
  version inside that interval is not told apart from the champion and does not displace it (versions
  registered without an interval compare by their Proximal FD alone);
* otherwise the new version takes ``challenger`` (a champion from another dataset or scored another
  way is never displaced automatically: its score is not comparable).

A retried ``register_model`` task must not create a second version: versions are tagged with the
execution's parent MLflow run id, and an existing version with that tag is reused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_EXECUTION = "rsd.execution_run_id"
TAG_FINGERPRINT = "rsd.dataset_fingerprint"
TAG_PROXIMAL_FD = "rsd.proximal_fd"
TAG_PROXIMAL_FD_INTERVAL = "rsd.proximal_fd_interval"  # "<low>,<high>": 95% bootstrap interval
TAG_SCORING = "rsd.proximal_fd_scoring"  # "<extractor id>/n<samples>"
TAG_OPERATOR = "rsd.operator_kind"


@dataclass(frozen=True)
class Registration:
    """What was registered and where it stands: ``alias`` is ``champion`` or ``challenger``."""

    name: str
    version: int
    alias: str
    proximal_fd: float
    reason: str


def dataset_model_name(dataset_name: str) -> str:
    """The registered model name of a dataset's generators: ``rsd-`` and its manifest name, lower-cased, with
    runs of characters other than letters, digits, '.', '_' and '-' replaced by '-'."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", dataset_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"dataset name {dataset_name!r} gives no model name: set tracking.model_name")
    return f"rsd-{slug}"


def logged_model_id(version: ModelVersion) -> str:
    """The MLflow 3 LoggedModel behind a version: its ``model_id``, or the id in its ``models:/m-...`` source
    (stores that do not fill ``model_id`` in); "" for versions registered from a run's artifact path."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else ""


def find_version(client: MlflowClient, name: str, execution_run_id: str) -> ModelVersion | None:
    """The version an earlier attempt of this execution registered, if any."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`{TAG_EXECUTION}` = '{execution_run_id}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def bar_to_beat(champion: ModelVersion) -> float:
    """The Proximal FD a version must go below to displace ``champion``: its interval's low end, or its FD."""
    interval = champion.tags.get(TAG_PROXIMAL_FD_INTERVAL)
    if interval:
        return float(interval.split(",")[0])
    return float(champion.tags.get(TAG_PROXIMAL_FD, "inf"))


def promotion(champion: ModelVersion | None, fingerprint: str, scoring: str, proximal_fd: float) -> tuple[str, str]:
    """(alias, reason) for a new version scored ``proximal_fd`` on dataset ``fingerprint`` with ``scoring``."""
    if champion is None:
        return CHAMPION, "first version: no champion yet"
    their_fp = champion.tags.get(TAG_FINGERPRINT, "")
    their_scoring = champion.tags.get(TAG_SCORING, "")
    their_fd = float(champion.tags.get(TAG_PROXIMAL_FD, "inf"))
    if their_fp != fingerprint:
        return CHALLENGER, f"champion v{champion.version} is from another dataset; Proximal FDs are not comparable"
    if their_scoring != scoring:
        return CHALLENGER, (f"champion v{champion.version} was scored as '{their_scoring or 'unrecorded'}', this "
                            f"version as '{scoring}'; Proximal FDs are not comparable")
    bar = bar_to_beat(champion)
    interval = champion.tags.get(TAG_PROXIMAL_FD_INTERVAL)
    theirs = f"{their_fd:.4g}" + (f", interval [{interval.replace(',', ', ')}]" if interval else "")
    if proximal_fd < bar:
        return CHAMPION, f"Proximal FD {proximal_fd:.4g} beats champion v{champion.version} ({theirs})"
    if proximal_fd < their_fd:
        return CHALLENGER, (f"Proximal FD {proximal_fd:.4g} is inside champion v{champion.version}'s interval "
                            f"({theirs}): not told apart")
    return CHALLENGER, f"Proximal FD {proximal_fd:.4g} does not beat champion v{champion.version} ({theirs})"


def register_generator(
    client: MlflowClient,
    *,
    name: str,
    execution_run_id: str,
    fingerprint: str,
    scoring: str,
    operator_kind: str,
    proximal_fd: float,
    log_model: Callable[[], ModelInfo],
    proximal_fd_interval: tuple[float, float] | None = None,
) -> Registration:
    """Register (once per ``execution_run_id``) and promote a generator under ``name``.

    ``log_model`` logs the model (in a run of this execution) and returns its ``ModelInfo``; it is
    called only when no version of this execution exists yet, so a retry neither logs nor
    registers twice.
    """
    _ensure_registered_model(client, name)
    version = find_version(client, name, execution_run_id)
    if version is None:
        tags = {
            TAG_EXECUTION: execution_run_id,
            TAG_FINGERPRINT: fingerprint,
            TAG_SCORING: scoring,
            TAG_PROXIMAL_FD: repr(float(proximal_fd)),
            TAG_OPERATOR: operator_kind,
        }
        if proximal_fd_interval is not None:
            tags[TAG_PROXIMAL_FD_INTERVAL] = ",".join(repr(float(v)) for v in proximal_fd_interval)
        info = log_model()
        version = client.create_model_version(name, info.model_uri, run_id=info.run_id, tags=tags,
                                              model_id=info.model_id)
    else:
        version = client.get_model_version(name, version.version)  # fresh aliases
        for alias in (CHAMPION, CHALLENGER):
            if alias in version.aliases:
                return Registration(name, int(version.version), alias, proximal_fd, "already registered (retry)")
    _, reason = promotion(current_champion(client, name), fingerprint, scoring, proximal_fd)
    champion = settle_champion(client, name, fingerprint, scoring)
    alias = CHAMPION if champion is not None and champion.version == version.version else CHALLENGER
    if alias == CHALLENGER:
        _with_retries(lambda: client.set_registered_model_alias(name, CHALLENGER, version.version))
    client.set_model_version_tag(name, version.version, "rsd.promotion", reason)
    return Registration(name, int(version.version), alias, proximal_fd, reason)


def _error_code(err: MlflowException) -> str:
    return getattr(err, "error_code", "") or ""


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" not in _error_code(err):
            raise  # e.g. the server is down: do not mistake it for a missing model
        try:
            client.create_registered_model(name, description="One-step generators distilled by RSD from corrupted data")
        except MlflowException as race:
            if "RESOURCE_ALREADY_EXISTS" not in _error_code(race):
                raise


def _with_retries(action: Callable[[], object], attempts: int = 5, delay_s: float = 0.2) -> None:
    """Alias writes can collide under concurrent registrations (a UNIQUE constraint): retry them."""
    for attempt in range(attempts):
        try:
            action()
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(delay_s * (attempt + 1))


def settle_champion(
    client: MlflowClient, name: str, fingerprint: str, scoring: str, rounds: int = 5
) -> ModelVersion | None:
    """Point ``champion`` at the best version of the champion's dataset and scoring (ours if there is none).

    Read-then-write promotion races when two registrations run at once; re-deriving the
    champion from the version tags after every write converges to the best version whatever
    order the writes landed in, so exactly one champion, the better, remains.
    """
    champion = None
    for _ in range(rounds):
        champion = current_champion(client, name)
        dataset, how = (fingerprint, scoring) if champion is None else (
            champion.tags.get(TAG_FINGERPRINT, fingerprint), champion.tags.get(TAG_SCORING, ""))
        if not how:  # a champion registered before scorings were recorded: nothing is comparable with it
            return champion
        query = f"name = '{name}' and tags.`{TAG_FINGERPRINT}` = '{dataset}' and tags.`{TAG_SCORING}` = '{how}'"
        scored = [v for v in client.search_model_versions(query) if TAG_PROXIMAL_FD in v.tags]
        if not scored:
            return champion
        best = min(scored, key=lambda v: (float(v.tags[TAG_PROXIMAL_FD]), int(v.version)))
        if champion is not None and (champion.version == best.version
                                     or float(best.tags[TAG_PROXIMAL_FD]) >= bar_to_beat(champion)):
            return champion  # the best is the champion, or inside its interval
        _with_retries(lambda best=best: client.set_registered_model_alias(name, CHAMPION, best.version))
    return current_champion(client, name) or champion
