"""Shared fixtures: small real data, and a scratch environment for every test session."""


import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def digits8() -> torch.Tensor:
    """sklearn's 1,797 real 8x8 handwritten digits as (N, 1, 8, 8) in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    return torch.from_numpy(images * 2 - 1)[:, None]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real seaweedfs S3 server on free ports for the whole session, stopped by PID at the end.

    Yields a ``tests.servers.S3Server`` (endpoint_url, access_key, secret_key, bucket, env()).
    """
    from tests.servers import start_seaweedfs, stop_process

    proc, server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real ``mlflow server`` (SQLite backend, artifacts proxied to ``s3_server``), stopped by PID.

    Yields a ``tests.servers.MlflowServer`` (tracking_uri, backend_store_uri, artifacts_destination).
    """
    from tests.servers import start_mlflow, stop_process

    proc, server = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3_server)
    try:
        yield server
    finally:
        stop_process(proc)
