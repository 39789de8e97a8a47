"""Tuning evidence for the restore benchmark: latent optimisation and DPS settings, swept on
validation images (benchmarks.restore.validation_images: Fashion-MNIST training images 59,000 onwards, the models
saw only the first 20,000; for MRI the held-out subject's last slices, the benchmark scoring its first ones).

    python -m benchmarks.restore_tuning --task inpaint-0.8 --method latent \
        --grid '{"steps": [10, 30], "lr": [0.1, 0.3]}' [--base '{"restarts": 1}'] [--n-images 16]
    python -m benchmarks.restore_tuning --task inpaint-0.8 --method posterior-net \
        --compare '{"holdout_delta": 0.1}' '{"holdout_delta": 0.2}'

Every combination of the ``--grid`` values (over ``--base``, over the defaults) is run on the same
observations; PSNR, SSIM and seconds per image are appended to benchmarks/results/restore_tuning.json
(one record per run, with its settings, the model's digest and the per-image PSNRs) and printed, one JSON line
each. ``--compare A B`` runs nothing: it prints the paired bootstrap 95% interval of B's PSNR minus A's from the
last records whose settings contain A and B.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import RESULTS_DIR
from benchmarks.restore import ROOT, fitted_encoder, model_digest, observe, scores, validation_images
from benchmarks.statistics import paired_bootstrap_ci
from rsd_core.kinds import build_operator
from rsd_core.restore.encoder import EncoderConfig, load_encoder
from rsd_core.restore.estimate import LATENT_OPTIMISATION, RestoreConfig, restore_observations
from rsd_core.restore.posterior import DPSConfig, dps_restore
from rsd_core.stages import load_model
from rsd_core.train.sampling import OneStepSampler

# posterior-net settings that belong to the restoration, not to the network's fit (steps, lr, seed: the fit's; the
# sweep's batch size is the restoration's)
RESTORE_ONLY = set(RestoreConfig.model_fields) - set(EncoderConfig.model_fields) - {"encoder"} | {"batch_size"}


def posterior_net_config(settings: dict) -> RestoreConfig:
    """A posterior-net sweep's settings as a RestoreConfig: the restoration's own fields (data_consistency,
    consistency_iters, held_out_passes, batch_size, ...) on it, every other one on its network's fit."""
    restore = {k: v for k, v in settings.items() if k in RESTORE_ONLY}
    fit = {k: v for k, v in settings.items() if k not in RESTORE_ONLY}
    return RestoreConfig(**restore, encoder=EncoderConfig(**fit))


def compare(records: list[dict], task: str, method: str, a: dict, b: dict) -> dict:
    """B's PSNR minus A's on the same validation images, with its paired bootstrap 95% interval: A and B select the
    last record of ``task`` and ``method`` whose settings contain them (records carrying per-image PSNRs)."""
    def last(want: dict) -> dict:
        found = [r for r in records if r["task"] == task and r["method"] == method and "psnr_per_image" in r
                 and all(r["settings"].get(k) == v for k, v in want.items())]
        if not found:
            raise SystemExit(f"no {method} record of {task} with settings {want} and per-image PSNRs in "
                             "restore_tuning.json: run the sweep first")
        return found[-1]

    ra, rb = last(a), last(b)
    if (ra["n_images"], ra.get("model_sha256")) != (rb["n_images"], rb.get("model_sha256")):
        raise SystemExit(f"{a} and {b} were not run on the same images and model ({ra['n_images']} / "
                         f"{rb['n_images']} images, models {ra.get('model_sha256')} / {rb.get('model_sha256')})")
    pa, pb = np.array(ra["psnr_per_image"]), np.array(rb["psnr_per_image"])
    return {"task": task, "method": method, "a": a, "b": b, "psnr_a": float(pa.mean()), "psnr_b": float(pb.mean()),
            "diff": float((pb - pa).mean()), "ci95": paired_bootstrap_ci(pb, pa), "n_images": len(pa)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help="task folder name under --models")
    parser.add_argument("--method", choices=("latent", "dps", "posterior-net"), required=True,
                        help="posterior-net: the grid's settings are the network's fit (EncoderConfig: steps, width, "
                        "...), fitted on the task's training observations (cached in --out) and scored here, or the "
                        "restoration's own (RestoreConfig: consistency_iters, held_out_passes, ...)")
    parser.add_argument("--grid", default="{}", help="JSON {setting: [values]} swept as a product")
    parser.add_argument("--base", default="{}", help="JSON settings applied to every run")
    parser.add_argument("--models", default=str(ROOT / "outputs" / "restore-models"))
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "restore"), help="posterior-net: fits cached here")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                        help="run nothing; print B's PSNR minus A's (JSON settings selecting recorded runs) with its "
                        "paired bootstrap 95%% interval")
    args = parser.parse_args(argv)
    results = RESULTS_DIR / "restore_tuning.json"
    if args.compare:
        result = compare(json.loads(results.read_text()) if results.exists() else [], args.task, args.method,
                         *(json.loads(text) for text in args.compare))
        print(json.dumps(result))
        return [result]
    torch.set_num_threads(args.threads)
    folder = Path(args.models) / args.task / ("teacher" if args.method == "dps" else "generator")
    net, objective, card = load_model(folder)
    operator = build_operator(card.operator)
    clean = validation_images(args.task, args.n_images, tuple(card.image_shape))
    y, state = observe(operator, clean)
    grid, base = json.loads(args.grid), json.loads(args.base)
    model = model_digest(folder)
    records = []
    for values in itertools.product(*grid.values()):
        settings = {**base, **dict(zip(grid, values, strict=True)), "batch_size": args.n_images}
        start = time.perf_counter()
        if args.method == "posterior-net":
            config = posterior_net_config(settings)
            path, _ = fitted_encoder(Path(args.out) / args.task, Path(args.models), args.task, config)
            start = time.perf_counter()  # the fit is cached apart: time only the restoration
            generator = OneStepSampler(net, objective, tuple(card.image_shape), card.sigma_init)
            restored = restore_observations(generator, y, state, config, encoder=load_encoder(path)[0]).mean
        elif args.method == "latent":
            config = LATENT_OPTIMISATION.updated(**settings)
            generator = OneStepSampler(net, objective, tuple(card.image_shape), card.sigma_init)
            restored = restore_observations(generator, y, state, config).mean
        else:
            sigma_stop = settings.pop("sigma_stop", card.sigma_stop)
            config = DPSConfig(**settings)
            samples = dps_restore(net, objective, card.image_shape, y, state, config, sigma_stop)
            restored, one = samples.mean, samples.sample
            settings["sigma_stop"] = sigma_stop
        seconds = (time.perf_counter() - start) / len(y)
        per_image, per_image_ssim = scores(restored, clean)
        settings = {**config.model_dump(), **settings}
        records.append({"task": args.task, "method": args.method, "settings": settings,
                        "psnr": float(per_image.mean()), "ssim": float(per_image_ssim.mean()),
                        "seconds_per_image": seconds, "n_images": len(y), "threads": args.threads,
                        "split": "validation", "model_sha256": model,
                        "psnr_per_image": [round(float(v), 4) for v in per_image]})
        if args.method == "dps":  # psnr / ssim: the mean of the samples; these: the first sample alone
            records[-1] |= dict(zip(("psnr_sample", "ssim_sample"),
                                    (float(v.mean()) for v in scores(one, clean)), strict=True))
        print(json.dumps(records[-1]), flush=True)
    previous = json.loads(results.read_text()) if results.exists() else []
    results.write_text(json.dumps(previous + records, indent=1))
    return records


if __name__ == "__main__":
    main()
