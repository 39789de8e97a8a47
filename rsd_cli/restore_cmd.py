"""`rsd restore`: clean versions of a corrupted dataset from a registered generator, as the Flyte
workflow ``rsd_restore`` run locally (the same outputs folder as `rsd run`: MLflow store, sandbox).

The model and the dataset are checked here first, so a mismatch is one line on stderr before
Flyte starts; the workflow's first task repeats the check for cluster runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

from rsd_cli.local import DEFAULT_OUT, HelpFormatter, prepare_outputs, raw_outputs
from rsd_core.restore.estimate import LATENT_RESTARTS, RestoreConfig
from rsd_core.restore.methods import registered_methods

_SETTING_HELP = {
    "method": "what restores: " + "; ".join(f"'{m.name}': {m.summary}" for m in registered_methods().values()),
    "steps": "Adam steps on the latents (after a latent encoder's start, or from noise with --encoder none)",
    "lr": "Adam learning rate on the latents",
    "restarts": "latents per observation (latent encoder or --encoder none): their mean is the restoration, "
    "their std the spread",
    "prior_weight": "weight of the Gaussian prior |z|^2 / 2 on the latents",
    "sigma_floor": "noise scale of the misfit when the data are noiseless",
    "data_consistency": "true/false: move the result to the nearest image that reproduces the measurements "
    "(noiseless data)",
    "consistency_iters": "conjugate-gradient iterations (at most) of that projection",
    "batch_size": "observations optimised together",
    "seed": "seed of the latents (a row group adds its first row index)",
    "encoder": "the network fitted for the dataset first: 'default' (the posterior-mean network, trained on the "
    "dataset's own observations corrupted further where the operator has a further mask (inpaint, mri), "
    "else on the generator's samples seen through the dataset's operator), a YAML mapping of its settings, "
    "e.g. '{steps: 500, width: 32}', '{fit_on: generator}' or '{target: latent}' (a latent encoder whose "
    "G(z) starts every restart), or "
    "'none' (latent optimisation from noise, with --steps >= 1; slower per image); its target follows --method",
}


def _uri(value: str) -> str:
    """URLs as given; local paths made absolute (the tasks do not share the caller's cwd on a cluster)."""
    return value if "://" in value else str(Path(value).resolve())


def _encoder_setting(value: str) -> dict | None:
    """--encoder: 'default', 'none' or a YAML mapping of EncoderConfig fields."""
    if value.strip() in ("default", "none"):
        return None if value.strip() == "none" else {}
    parsed = yaml.safe_load(value)
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected 'default', 'none' or a YAML mapping of encoder settings, "
                                         f"got {value!r}")
    return parsed


def _config(args: argparse.Namespace) -> RestoreConfig:
    given = {name: getattr(args, name) for name in RestoreConfig.model_fields if hasattr(args, name)}
    try:
        return RestoreConfig(**given)
    except ValidationError as err:
        raise ValueError("; ".join(_flag_error(e) for e in err.errors())) from None


def _flag_error(error: dict) -> str:
    """A validation error in the flags' words: the field as its flag, or a whole-config rule with its flags named."""
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return "--" + message.replace("set encoder", "drop '--encoder none'").replace("steps >= 1", "--steps >= 1")
    return f"--{'-'.join(map(str, error['loc'])).replace('_', '-')}: {message}"


def _restorer_config(args: argparse.Namespace, model) -> RestoreConfig:
    """The settings of ``--restorer`` (fixed when it was fitted), after checking it was fitted for ``model``."""
    from tasks import tracking
    from tasks.restorer import resolve_restorer

    given = [f"--{name.replace('_', '-')}" for name in RestoreConfig.model_fields if hasattr(args, name)]
    if given:
        raise ValueError(f"--restorer restores with the settings it was fitted with; drop {' '.join(given)}")
    restorer = resolve_restorer(tracking.client(), args.restorer)
    if restorer.generator != f"{model.name}/{model.version}":
        raise ValueError(f"restorer {args.restorer} was fitted for generator {restorer.generator}, not "
                         f"{model.name}/{model.version} ({model.uri})")
    return restorer.config


def _restore(args: argparse.Namespace) -> int:
    config = _config(args)
    from tasks.restore import check_inputs, check_method

    check_method(config)
    model_uri, dataset_uri, out_uri = args.model, _uri(args.dataset), _uri(args.out)
    prepare_outputs(args.out_dir, cache=False)
    if not args.verbose:  # as in `rsd run`: flytekit's schema warnings, MLflow's run URLs and download bars
        os.environ.setdefault("FLYTE_SDK_LOGGING_LEVEL", str(logging.ERROR))
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from rsd_core.stages import read_card
    from tasks import tracking

    with tempfile.TemporaryDirectory() as tmp:
        model, ds = check_inputs(model_uri, dataset_uri, out_uri, Path(tmp))
        card = read_card(model.folder)
    if args.restorer:
        config = _restorer_config(args, model)
    print(f"model    {model.label}: '{card.operator.kind}' generator of {tuple(card.image_shape)} images")
    print(f"dataset  {dataset_uri}: {len(ds)} '{ds.manifest.operator.kind}' observations in "
          f"{len(ds.manifest.shards)} shard(s)")
    print(f"settings {' '.join(f'{k}={v}' for k, v in config.model_dump().items())}")
    print(f"tracking {tracking.tracking_uri()}   outputs {args.out_dir.resolve()}", flush=True)
    from workflows.restore import rsd_restore

    start = time.perf_counter()
    with raw_outputs(args.raw_output_prefix):
        result = rsd_restore(model_uri=model_uri, dataset_uri=dataset_uri, out_uri=out_uri, config=config,
                             restorer=args.restorer or "", refit=args.refit,
                             **({"experiment": args.experiment} if hasattr(args, "experiment") else {}))
    m = result.metrics
    print(f"\nrestored {result.count} observations in {(time.perf_counter() - start) / 60:.1f} min "
          f"({m['seconds_per_image']:.3g} s per image)")
    print(f"restored dataset  {result.uri}")
    print(f"spread            {result.spread_uri or f'none (method {config.method} gives none)'}")
    spread = f"   spread {m['spread']:.4g} (mean std)" if "spread" in m else ""
    print(f"data misfit       {m['misfit']:.4g} (mean squared residual){spread}")
    if "eval/images" in m:
        ssim = f", SSIM {m['eval/ssim']:.4f}" if "eval/ssim" in m else ""
        print(f"evaluation        PSNR {m['eval/psnr']:.2f} dB{ssim} on the {int(m['eval/images'])} rows "
              "of the dataset's clean split")
        if "eval/coverage_2sd" in m:
            print(f"calibration       {100 * m['eval/coverage_2sd']:.1f}% of the clean pixels inside mean +- 2 spread "
                  "(95.4% if calibrated; pixels of zero spread left out)")
    print(f"MLflow run        {result.run_id}")
    print(f"grid              {result.grid.path}  (observation / restoration / spread / clean when known)")
    return 0


def add_restore_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `rsd restore`; each RestoreConfig field becomes a flag (default: RestoreConfig's)."""
    p = subparsers.add_parser(
        "restore", help="restore a corrupted dataset with a registered generator", formatter_class=HelpFormatter,
        description="Clean versions of your own observations, by --method (default posterior-net): fit a network "
        "that maps an observation y to the "
        "posterior mean and per-pixel std of its clean image (no clean data): on the dataset's own observations "
        "with measurements held out (inpaint, mri), else on pairs the registered generator simulates through "
        "the dataset's operator and sampling patterns; then restore shard by shard "
        "with one pass per observation, as the Flyte workflow rsd_restore. Writes "
        "a dataset of restored images (identity operator) at --out, their per-pixel spread at --out/spread, "
        "and an MLflow run with time, misfit, spread (PSNR/SSIM when the "
        "dataset has a clean split) and a grid. The model must be trained on the dataset's operator and "
        "image shape.",
    )
    required = {"--model": "models:/<name>@<alias> or models:/<name>/<version>",
                "--dataset": "the corrupted dataset (path or s3://)",
                "--out": "where the restored dataset goes (path or s3://; must not exist)"}
    for flag, text in required.items():
        p.add_argument(flag, required=True, default=argparse.SUPPRESS, help=text)
    defaults = RestoreConfig()
    for name in RestoreConfig.model_fields:
        default = getattr(defaults, name)
        if name == "encoder":
            p.add_argument("--encoder", dest=name, default=argparse.SUPPRESS, type=_encoder_setting,
                           metavar="SETTINGS", help=f"{_SETTING_HELP[name]} (default: 'default')")
            continue
        if name == "method":
            p.add_argument("--method", dest=name, default=argparse.SUPPRESS, choices=list(registered_methods()),
                           help=f"{_SETTING_HELP[name]} (default: {default})")
            continue
        shown = f"{LATENT_RESTARTS} on the latent paths" if name == "restarts" else default
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                       metavar="int" if name == "restarts" else type(default).__name__,
                       help=f"{_SETTING_HELP.get(name, 'restoration setting')} (default: {shown})")
    p.add_argument("--restorer", default=None, metavar="MODEL_URI",
                   help="a registered restorer (models:/<name>/<version>, as rsd restore printed) fitted for --model: "
                   "restore with it, no fit (its settings are used)")
    p.add_argument("--refit", action="store_true",
                   help="fit the restorer again even if one fitted for this generator, dataset and settings is "
                   "registered (by default that one is reused)")
    p.add_argument("--experiment", default=argparse.SUPPRESS,
                   help="MLflow experiment of the run (default: rsd-restore)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="outputs folder: MLflow store, Flyte sandbox")
    p.add_argument("--raw-output-prefix", default=None, metavar="URI",
                   help="where tasks write their outputs, e.g. s3://bucket/raw (default: the local sandbox)")
    p.add_argument("--verbose", action="store_true", help="show flytekit's warnings")
    p.set_defaults(func=_restore)
