"""Registry rules with tiny models: promotion by Proximal FD within a dataset, idempotent retries."""

import numpy as np
import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from tasks import registry  # noqa: E402

FP_A, FP_B = "a" * 64, "b" * 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating the schema takes seconds); each test its own model name."""
    from tasks import tracking

    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        c = tracking.client()
        c.exp_id = tracking.experiment_id(c, "registry-test")
        assert c.get_experiment(c.exp_id).artifact_location.startswith((root / "mlartifacts").as_uri())
        yield c


@pytest.fixture
def client(store, request):
    store.model_name = request.node.name
    return store


class Logger:
    """Logs a tiny torch.export model in a new run; counts calls so retries can be checked."""

    def __init__(self, client):
        self.client = client
        self.calls = 0

    def __call__(self):
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        self.calls += 1
        run = self.client.create_run(self.client.exp_id)
        spec = Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "x")])
        mlflow.set_tracking_uri(self.client._tracking_client.tracking_uri)
        with mlflow.start_run(run_id=run.info.run_id):
            return mlflow.pytorch.log_model(torch.nn.Linear(4, 4), name="m", input_example=torch.zeros(2, 4),
                                            signature=ModelSignature(spec, spec), serialization_format="pt2",
                                            pip_requirements=["torch"])


SCORING = "fmnist-cnn-0123/n1000"


def register(client, logger, execution, fd, fingerprint=FP_A, scoring=SCORING, interval=None):
    return registry.register_generator(client, name=client.model_name, execution_run_id=execution,
                                       fingerprint=fingerprint, scoring=scoring, operator_kind="inpaint",
                                       proximal_fd=fd, log_model=logger, proximal_fd_interval=interval)


def test_better_takes_champion_worse_never_does(client):
    logger = Logger(client)
    first = register(client, logger, "exec-1", 10.0)
    assert (first.version, first.alias) == (1, "champion")
    worse = register(client, logger, "exec-2", 12.0)
    assert worse.alias == "challenger"
    tie = register(client, logger, "exec-3", 10.0)
    assert tie.alias == "challenger"
    assert int(client.get_model_version_by_alias(client.model_name, "champion").version) == 1
    better = register(client, logger, "exec-4", 7.5)
    assert (better.version, better.alias) == (4, "champion")
    champion = client.get_model_version_by_alias(client.model_name, "champion")
    assert int(champion.version) == 4 and champion.tags[registry.TAG_PROXIMAL_FD] == "7.5"
    assert champion.tags[registry.TAG_FINGERPRINT] == FP_A


def test_a_version_inside_the_champions_interval_does_not_take_the_alias(client):
    """Proximal FD 9.5 is lower than the champion's 10.0 but inside its interval [9.0, 11.0]: not told apart."""
    logger = Logger(client)
    register(client, logger, "exec-1", 10.0, interval=(9.0, 11.0))
    tied = register(client, logger, "exec-2", 9.5, interval=(8.5, 10.5))
    assert tied.alias == "challenger" and "inside champion v1's interval" in tied.reason
    assert int(client.get_model_version_by_alias(client.model_name, "champion").version) == 1
    version = client.get_model_version(client.model_name, 2)
    assert version.tags[registry.TAG_PROXIMAL_FD_INTERVAL] == "8.5,10.5"
    better = register(client, logger, "exec-3", 8.9, interval=(8.0, 9.8))
    assert (better.version, better.alias) == (3, "champion")


def test_champion_from_another_dataset_is_not_displaced(client):
    logger = Logger(client)
    register(client, logger, "exec-1", 10.0, FP_A)
    other = register(client, logger, "exec-2", 1.0, FP_B)
    assert other.alias == "challenger" and "another dataset" in other.reason
    assert int(client.get_model_version_by_alias(client.model_name, "champion").version) == 1


@pytest.mark.parametrize("scoring", ["fmnist-cnn-4567/n1000", "fmnist-cnn-0123/n500"], ids=["extractor", "n"])
def test_champion_scored_with_other_features_or_sample_count_is_not_displaced(client, scoring):
    """A lower Proximal FD from another extractor or sample count is on another scale: no promotion,
    and later versions scored like the champion still compete with it."""
    logger = Logger(client)
    register(client, logger, "exec-1", 10.0)
    other = register(client, logger, "exec-2", 1.0, scoring=scoring)
    assert other.alias == "challenger" and "not comparable" in other.reason and scoring in other.reason
    assert int(client.get_model_version_by_alias(client.model_name, "champion").version) == 1
    better = register(client, logger, "exec-3", 9.0)
    assert (better.version, better.alias) == (3, "champion")


def test_champion_without_a_recorded_scoring_is_kept(client):
    """Versions registered before scorings were tagged compare with nothing."""
    logger = Logger(client)
    info = logger()
    client.create_registered_model(client.model_name)
    client.create_model_version(client.model_name, info.model_uri, run_id=info.run_id, model_id=info.model_id, tags={
        registry.TAG_EXECUTION: "exec-old", registry.TAG_FINGERPRINT: FP_A, registry.TAG_PROXIMAL_FD: "10.0"})
    client.set_registered_model_alias(client.model_name, "champion", "1")
    new = register(client, logger, "exec-new", 1.0)
    assert new.alias == "challenger" and "unrecorded" in new.reason
    assert int(client.get_model_version_by_alias(client.model_name, "champion").version) == 1


def test_retried_registration_reuses_the_version(client):
    logger = Logger(client)
    first = register(client, logger, "exec-1", 10.0)
    again = register(client, logger, "exec-1", 10.0)
    assert (again.version, again.alias) == (first.version, "champion")
    assert logger.calls == 1
    assert len(client.search_model_versions(f"name = '{client.model_name}'")) == 1


def test_retry_after_version_created_but_before_alias(client):
    """A crash between creating the version and setting its alias: the retry promotes it once."""
    logger = Logger(client)
    register(client, logger, "exec-1", 10.0)
    info = logger()
    client.create_model_version(client.model_name, info.model_uri, run_id=info.run_id, model_id=info.model_id, tags={
        registry.TAG_EXECUTION: "exec-2", registry.TAG_FINGERPRINT: FP_A, registry.TAG_SCORING: SCORING,
        registry.TAG_PROXIMAL_FD: "5.0"})
    resumed = register(client, logger, "exec-2", 5.0)
    assert (resumed.version, resumed.alias) == (2, "champion")
    assert logger.calls == 2 and len(client.search_model_versions(f"name = '{client.model_name}'")) == 2
