"""`rsd serve`: a registered model over HTTP, the MLflow way (``mlflow models serve``), from this venv.

``mlflow models serve --env-manager local`` starts its server as ``bash -c "exec uvicorn ..."``, found
on the PATH: without an activated venv the PATH has no ``uvicorn`` and the server exits with code 127.
This command puts its own interpreter's folder first on the PATH, points tracking at the same store as
`rsd run` (unless ``MLFLOW_TRACKING_URI`` is set), checks that the model exists (one line if not), sets
the request limits the served models read (``RSD_SERVE_*``, see :mod:`tasks.request_limits`) and then
replaces itself with the server.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rsd_cli.local import DEFAULT_OUT, HelpFormatter, prepare_outputs
from tasks.request_limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_ROWS, MAX_BATCH_ENV, MAX_ROWS_ENV


def server_command(model: str, host: str, port: int, workers: int) -> list[str]:
    """The ``mlflow models serve`` command line of this venv."""
    mlflow = Path(sys.executable).parent / "mlflow"
    return [str(mlflow), "models", "serve", "-m", model, "--env-manager", "local", "-h", host, "-p", str(port),
            "-w", str(workers)]


def server_environment(base: dict[str, str], tracking_uri: str, limits: dict[str, int]) -> dict[str, str]:
    """``base`` with this venv's bin folder first on the PATH, the tracking store and the request limits."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**base, "PATH": os.pathsep.join([bin_dir, base.get("PATH", "")]).rstrip(os.pathsep)}
    env.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
    env.update({name: str(value) for name, value in limits.items()})
    return env


def _check_model(uri: str, tracking_uri: str) -> None:
    """A one-line error for a model URI the registry does not resolve."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    try:
        mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as err:
        message = err.message if isinstance(err, MlflowException) else str(err)
        raise ValueError(f"model {uri}: {' '.join(message.split())} (tracking store {tracking_uri})") from None


def _serve(args: argparse.Namespace) -> int:
    limits = {MAX_ROWS_ENV: args.max_rows, MAX_BATCH_ENV: args.max_batch}
    for flag, value in (("--max-rows", args.max_rows), ("--max-batch", args.max_batch), ("--port", args.port),
                        ("--workers", args.workers)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    prepare_outputs(args.out_dir, cache=False)
    from tasks import tracking

    tracking_uri = tracking.tracking_uri()
    _check_model(args.model, tracking_uri)
    command = server_command(args.model, args.host, args.port, args.workers)
    env = server_environment(dict(os.environ), tracking_uri, limits)
    print(f"serving {args.model} on http://{args.host}:{args.port}/invocations (tracking {tracking_uri}; at most "
          f"{args.max_rows} rows per request, {args.max_batch} per batch)", flush=True)
    os.execve(command[0], command, env)
    return 0  # not reached: the server replaced this process


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `rsd serve`."""
    p = subparsers.add_parser(
        "serve", help="serve a registered generator or restorer over HTTP (mlflow models serve)",
        formatter_class=HelpFormatter,
        description="Serve a registered model's python_function flavour on /invocations with this project's "
        "venv, e.g. rsd serve --model models:/rsd-fmnist-inpaint@champion. Requests: {\"inputs\": {\"count\": "
        "[n]}} for samples, {\"inputs\": {\"observations\": ..., <state>: ...}} for restorations.",
    )
    p.add_argument("--model", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=5001, help="port to listen on")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (each loads the model)")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help="most samples or observations one request may ask for (larger: 400 naming the limit)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="rows computed together inside a request (bounds its memory)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="outputs folder holding the MLflow store")
    p.set_defaults(func=_serve)
