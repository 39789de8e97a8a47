"""`rsd run`, `rsd sample`, `rsd models`: run the Flyte pipeline locally, sample a registered or
exported generator, and list the registry.

Local runs keep everything under one outputs folder (default ``<repo>/outputs``): the MLflow
SQLite store and artifacts, Flyte's sandbox and its temporary files. flytekit picks its temporary
folder when it is imported, so the environment is set before the workflows are imported.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from rsd_cli.local import DEFAULT_OUT, HelpFormatter, prepare_outputs, raw_outputs, stale_cache_explained
from rsd_core.presets import PRESETS, build_config, for_existing_dataset

# The file each export format writes (rsd_core.export.onestep), named in the run's summary.
EXPORT_FILES = {"onnx": "generator.onnx", "pt2": "generator.pt2"}

def check_local_resources(config, preset: str) -> None:
    """A local run executes every task in this process, so Kubernetes requests and data-parallel
    layouts cannot apply; refuse them instead of ignoring them."""
    registered = build_config(preset).resources
    if config.resources != registered:
        changed = sorted(
            f"resources.{task}.{field}"
            for task, spec in config.resources
            for field, value in spec
            if getattr(getattr(registered, task), field) != value
        )
        raise ValueError(
            f"{', '.join(changed)}: task resources are fixed when the workflows are registered on a cluster "
            "(RSD_PRESET / RSD_CONFIG at `pyflyte register`, see docs/deploy.md); a local `rsd run` executes "
            "every task in this process and cannot honour them: drop the setting"
        )


def _run(args: argparse.Namespace) -> int:
    config = build_config(args.preset, args.config, args.set or [])
    check_local_resources(config, args.preset)
    if args.dataset:
        from rsd_core.data.reader import open_dataset
        from rsd_core.kinds import check_export

        # A bad path or manifest, or a kind that cannot export as configured, fails here in one line.
        manifest = open_dataset(args.dataset).manifest
        check_export(manifest.operator, config.export.formats)
        config = for_existing_dataset(config, args.preset)
    prepare_outputs(args.out, cache=not args.no_cache)
    os.environ.setdefault("RSD_PRESET", args.preset)
    if not args.verbose:  # flytekit warns about every tuple field of the configs (schema only, harmless)
        os.environ.setdefault("FLYTE_SDK_LOGGING_LEVEL", str(logging.ERROR))
        # With a tracking server MLflow prints two URLs per finished run; the summary below names the run.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from tasks import tracking
    from workflows.pipeline import rsd_pipeline, rsd_rerun

    if args.dataset:  # the preset's description would name the preset's data
        print(f"dataset {manifest.name}: {manifest.count} observations, operator {manifest.operator.kind} "
              f"({args.dataset}); settings of preset {args.preset}")
    else:
        print(f"preset {args.preset}: {config.description or '(no description)'}")
    print(f"tracking {tracking.tracking_uri()}   outputs {args.out.resolve()}")
    if args.raw_output_prefix:
        print(f"task outputs {args.raw_output_prefix}")
    start = time.perf_counter()
    with raw_outputs(args.raw_output_prefix), stale_cache_explained(args.out.resolve()):
        result = rsd_rerun(dataset_uri=args.dataset, config=config) if args.dataset else rsd_pipeline(config=config)
    minutes = (time.perf_counter() - start) / 60
    uri = tracking.tracking_uri()
    print(f"\nfinished in {minutes:.1f} min")
    print(f"registered model  {result.name} version {result.version} alias @{result.alias} "
          f"(Proximal FD {result.proximal_fd:.4g}; {result.reason})")
    print(f"scored on         {result.proximal_features}")
    print(f"MLflow run        {result.run_id}")
    if uri.startswith("sqlite:///"):
        print(f"MLflow UI         .venv/bin/mlflow ui --backend-store-uri {uri}")
    else:
        print(f"MLflow UI         {uri}")
    print(f"sample grid       {result.grid.path}")
    files = ", ".join([*(EXPORT_FILES[f] for f in config.export.formats), "card.json"])
    print(f"exported model    {result.exported.path}  ({files})")
    print(f"sample again      rsd sample --model models:/{result.name}@{result.alias} -n 64 --out grid.png")
    return 0


def _sample_registered(uri: str, n: int, seed: int):
    """Images from a registered model: its torch.export program, inputs drawn as card.json says."""
    import json

    import mlflow
    import torch

    from rsd_core.export.onestep import draw_card_inputs

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    card = json.loads((local / "extra_files" / "card.json").read_text())
    program = mlflow.pytorch.load_model(str(local))
    with torch.no_grad():
        return program(*draw_card_inputs(card["inputs"], n, seed))


def _sample(args: argparse.Namespace) -> int:
    from rsd_core.viz import save_grid

    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    if args.model.startswith("models:/"):
        prepare_outputs(args.out_dir, cache=False)
        from mlflow.exceptions import MlflowException

        from tasks import tracking

        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri())
        try:
            images = _sample_registered(args.model, args.n, args.seed)
        except MlflowException as err:
            raise ValueError(f"{args.model}: {err.message} (tracking store {tracking.tracking_uri()})") from None
    else:
        from rsd_core.stages import sampler_for

        images = sampler_for(args.model).sample(args.n, seed=args.seed)
    save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {len(images)} samples of {args.model} to {args.out}")
    return 0


def _models(args: argparse.Namespace) -> int:
    prepare_outputs(args.out_dir, cache=False)
    from tasks import registry, tracking

    client = tracking.client()
    names = [args.name] if args.name else [m.name for m in client.search_registered_models()]
    if not names:
        print(f"no registered models in {tracking.tracking_uri()}")
        return 0
    for name in names:
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        if not versions:
            raise ValueError(f"no registered model named {name!r} in {tracking.tracking_uri()}")
        aliases: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        print(f"{name}")
        print(f"  {'version':>7}  {'aliases':<20} {'proximal_fd':>11}  {'95% interval':<17} {'scored as':<34} "
              f"{'operator':<9} {'dataset':<12}  {'run':<32}  {'logged model':<36}")
        for v in versions:
            fd = float(v.tags.get(registry.TAG_PROXIMAL_FD, "nan"))
            names = ",".join(aliases.get(str(v.version), [])) or "-"
            operator = v.tags.get(registry.TAG_OPERATOR, "-")
            dataset = v.tags.get(registry.TAG_FINGERPRINT, "-")[:12]
            scoring = v.tags.get(registry.TAG_SCORING, "-")
            bounds = v.tags.get(registry.TAG_PROXIMAL_FD_INTERVAL)
            interval = "[{:.4g}, {:.4g}]".format(*map(float, bounds.split(","))) if bounds else "-"
            print(f"  {v.version:>7}  {names:<20} {fd:>11.4g}  {interval:<17} {scoring:<34} {operator:<9} "
                  f"{dataset:<12}  {v.run_id or '-':<32}  {registry.logged_model_id(v) or '-':<36}")
    return 0


def add_pipeline_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `rsd run`, `rsd sample` and `rsd models`."""
    p = subparsers.add_parser(
        "run", help="run the whole pipeline locally (Flyte, in this process)", formatter_class=HelpFormatter,
        description="Corrupt, pretrain, distil, select by Proximal FID, export and register, as the Flyte "
        "workflow rsd_pipeline (or rsd_rerun with --dataset). Config: --preset, then --config, then --set.",
    )
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu-demo", help="named configuration to start from")
    p.add_argument("--config", type=Path, default=None, help="YAML file merged over the preset")
    p.add_argument("--set", action="append", metavar="KEY.SUB=VALUE",
                   help="override one field, e.g. --set teacher_train.time_budget_s=60 (values are YAML)")
    p.add_argument("--dataset", default=None, help="an already-corrupted dataset (path or s3://): skip corruption")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="outputs folder: MLflow store, Flyte sandbox")
    p.add_argument("--raw-output-prefix", default=None, metavar="URI",
                   help="where tasks write their outputs, e.g. s3://bucket/raw (default: the local sandbox)")
    p.add_argument("--no-cache", action="store_true", help="do not reuse Flyte's local cache of earlier runs")
    p.add_argument("--verbose", action="store_true", help="show flytekit's warnings")
    p.set_defaults(func=_run)

    p = subparsers.add_parser("sample", help="write a grid of samples of a generator", formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/<name>@<alias> or models:/<name>/<version> (registry), or a model/export folder")
    p.add_argument("-n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p.add_argument("--out", default="samples.png", help="PNG path (local or fsspec URL)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="outputs folder holding the MLflow store")
    p.set_defaults(func=_sample)

    p = subparsers.add_parser("models", help="list registered generator versions", formatter_class=HelpFormatter)
    p.add_argument("--name", default=None, help="one registered model (default: all)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="outputs folder holding the MLflow store")
    p.set_defaults(func=_models)
