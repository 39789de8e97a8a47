"""`rsd data ...`: make, import and look at corrupted datasets.

Operator parameters default to None here so only the ones typed reach the spec; the help
text shows the spec's own defaults, which apply otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import torch

from rsd_cli.local import HelpFormatter
from rsd_core.data.importer import import_corrupted, load_spec_file
from rsd_core.data.kspace_import import import_kspace
from rsd_core.data.manifest import DatasetError, parse_spec
from rsd_core.data.reader import CorruptedDataset, open_dataset
from rsd_core.data.sources import SOURCE_NAMES, corrupt
from rsd_core.kinds import get_kind, registered_kinds
from rsd_core.viz import observations_for_display, save_grid


def _flag_type(annotation: Any) -> tuple[Any, tuple | None]:
    """(argparse type, choices) of a spec field: ``int | None`` takes an int, a Literal one of its values."""
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        return type(values[0]), values
    if get_origin(annotation) in (Union, UnionType):
        return _flag_type(next(a for a in get_args(annotation) if a is not type(None)))
    return annotation, None


def _operator_params() -> dict[str, tuple[type, str]]:
    """spec field -> (type, help) for every parameter of every registered operator kind.

    A field shared by several kinds (sigma_n) is one flag; its help lists the kinds per default.
    ("%(default).0s" prints nothing: it only stops argparse from appending "(default: None)".)"""
    params: dict[str, tuple[type, str, dict[str, list[str]]]] = {}
    for name in registered_kinds():
        for field, info in get_kind(name).spec.model_fields.items():
            if field != "kind":
                _, _, defaults = params.setdefault(field, (info.annotation, info.description or field, {}))
                defaults.setdefault(repr(info.default), []).append(name)
    out = {}
    for field, (kind_type, text, defaults) in params.items():
        per_default = "; ".join(f"{', '.join(kinds)}: default {d}" for d, kinds in defaults.items())
        out[field] = (kind_type, f"{text} ({per_default})%(default).0s")
    return out


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_operator_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("operator (one of --operator or --spec)")
    choice = group.add_mutually_exclusive_group(required=True)
    choice.add_argument("--operator", choices=registered_kinds(), help="corruption kind")
    choice.add_argument("--spec", type=Path, help="operator spec as a JSON/YAML file with 'kind' and parameters")
    for field, (kind_type, text) in _operator_params().items():
        flag_type, choices = _flag_type(kind_type)
        group.add_argument(_flag(field), dest=field, type=flag_type, choices=choices, default=None, help=text)


def _operator_spec(args: argparse.Namespace):
    """The validated spec from --spec, or from --operator plus whichever parameters were typed."""
    given = {field: getattr(args, field) for field in _operator_params() if getattr(args, field) is not None}
    if args.spec is not None:
        if given:
            raise DatasetError(f"give operator parameters in --spec {args.spec}, not as flags ({sorted(given)})")
        return load_spec_file(args.spec)
    return parse_spec({"kind": args.operator, **given}, f"operator '{args.operator}'")


def _run_corrupt(args: argparse.Namespace) -> int:
    manifest = corrupt(
        args.source,
        _operator_spec(args),
        args.seed,
        args.out,
        split=args.split,
        limit=args.limit,
        clean_eval_count=args.clean_eval,
        image_size=args.image_size,
        channels=args.channels,
        rows_per_shard=args.rows_per_shard,
    )
    print(f"wrote {manifest.count} observations ({manifest.name}) to {args.out}")
    return 0


def _parse_state(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not (sep and key and value):
            raise DatasetError(f"--state expects KEY=PATH.npy, got {item!r}")
        out[key] = value
    return out


def _typed_operator_params(args: argparse.Namespace) -> dict[str, Any]:
    """The operator parameters as typed (a --spec file's, or the flags given), defaults left to the importer."""
    if args.spec is not None:
        return load_spec_file(args.spec).model_dump(exclude_unset=True)
    return {"kind": args.operator, **{f: getattr(args, f) for f in _operator_params() if getattr(args, f) is not None}}


def _run_import(args: argparse.Namespace) -> int:
    if (args.observations is None) == (args.kspace is None):
        raise DatasetError("give either --observations (observations on the dataset's scale) or --kspace "
                           "(multi-coil k-space, with --mask)")
    if args.kspace is not None:
        if args.mask is None:
            raise DatasetError("--kspace needs --mask: the sampling mask of each scan as .npy")
        manifest = import_kspace(args.kspace, args.mask, args.out, spec=_typed_operator_params(args), maps=args.maps,
                                 name=args.name)
        print(f"imported {manifest.count} scans ({manifest.name}) to {args.out}; coil maps "
              f"{manifest.provenance['coil_maps']}")
        return 0
    manifest = import_corrupted(
        args.observations,
        _operator_spec(args),
        args.out,
        state=_parse_state(args.state),
        labels=args.labels,
        name=args.name,
        channels=args.channels,
    )
    print(f"imported {manifest.count} observations ({manifest.name}) to {args.out}")
    return 0


def _describe(ds: CorruptedDataset) -> list[str]:
    m = ds.manifest
    lines = [
        f"dataset      {ds.uri}",
        f"name         {m.name}",
        f"count        {m.count}",
        f"image shape  {m.image_shape}   value range {list(m.value_range)}",
        f"observation  {m.observation_shape}   range {[round(v, 4) for v in m.observation_range]}",
        f"operator     {json.dumps(m.operator.model_dump())}",
        "state        " + (", ".join(f"{k} {v.shape} {v.dtype}" for k, v in m.state_keys.items()) or "none"),
        f"labels       {'yes' if m.has_labels else 'no'}   seed {m.seed}",
        f"provenance   {json.dumps(m.provenance)}",
        f"shards       {len(m.shards)}",
    ]
    lines += [f"  {s.file}  {s.rows} rows  {s.bytes} B  sha256 {s.sha256}" for s in m.shards]
    return lines


def _first_rows(ds: CorruptedDataset, n: int):
    """The first ``n`` rows as one batch (reads only what it needs)."""
    return next(ds.iter_batches(batch_size=n))


def _run_inspect(args: argparse.Namespace) -> int:
    ds = open_dataset(args.path)
    for line in _describe(ds):
        print(line)
    ds.verify()
    print(f"checksums    ok ({len(ds.manifest.shards)} shards verified)   fingerprint {ds.fingerprint}")
    batch = _first_rows(ds, args.n)
    shown = observations_for_display(batch.observation, ds.operator, batch.state)
    clean = ds.clean_eval()
    if clean is not None:
        clean_batch = _first_rows(clean, args.n)
        print(f"clean eval   {clean.uri} ({len(clean)} images, for true FID only)")
        paired = min(len(clean_batch.index), len(batch.index))
        if not torch.equal(clean_batch.index[:paired], batch.index[:paired]):
            raise DatasetError(f"{clean.uri}: clean rows do not match the observations' indices")
        shown = torch.cat([shown[:paired], clean_batch.observation[:paired]])
        nrow = paired
    else:
        print("clean eval   none")
        nrow = min(8, len(shown))
    grid = args.grid or f"{ds.manifest.name}-inspect.png"
    save_grid(shown, grid, nrow=nrow)
    print(f"grid         {grid}" + ("   (top: observations, bottom: clean)" if clean is not None else ""))
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `rsd data` and its subcommands on the top-level parser's subparsers."""
    data = subparsers.add_parser("data", help="make, import and inspect corrupted datasets",
                                 formatter_class=HelpFormatter)
    commands = data.add_subparsers(dest="data_command", required=True, metavar="{corrupt,import,inspect}")

    p = commands.add_parser(
        "corrupt",
        help="corrupt a clean source into a dataset",
        formatter_class=HelpFormatter,
        description="Apply an operator to a bundled clean source (or an image folder) and write the dataset.",
    )
    p.add_argument("--source", required=True, help=f"one of {', '.join(SOURCE_NAMES)}, or a folder of PNG/JPEG")
    _add_operator_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the per-sample state and noise")
    p.add_argument("--limit", type=int, default=None, help="corrupt only the first N images (default: all)")
    p.add_argument("--out", required=True, help="output directory: local path or s3://bucket/prefix")
    p.add_argument("--split", choices=("train", "test"), default="train", help="source split")
    p.add_argument("--clean-eval", type=int, default=0, help="also store N clean images (true FID only)")
    p.add_argument("--image-size", type=int, default=None, help="image side (brain-mri: 32/64; folders: 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="image folders: 1 grey, 3 RGB")
    p.add_argument("--rows-per-shard", type=int, default=16384, help="rows per parquet shard")
    p.set_defaults(func=_run_corrupt)

    p = commands.add_parser(
        "import",
        help="package observations that are already corrupted",
        formatter_class=HelpFormatter,
        description="For data teams with corrupted observations only: a folder of PNG/JPEG or a .npy "
        "array, plus the operator that produced them and its per-sample state as .npy arrays; or "
        "multi-coil MRI k-space with its masks (and coil maps, else estimated).",
    )
    p.add_argument("--observations", default=None, help="folder of PNG/JPEG, or a float .npy (N, C, H, W)")
    p.add_argument("--kspace", default=None, help="instead of --observations, with --operator mri: multi-coil "
                   "k-space .npy, complex (N, coils, H, W) or real/imag pairs (N, coils, H, W, 2)")
    p.add_argument("--mask", default=None, help="with --kspace: sampling masks .npy, (N, W) or (N, H, W), 0/1")
    p.add_argument("--maps", default=None, help="with --kspace: coil maps .npy (N, coils, m, m), m <= H "
                   "(default: estimated per scan by ESPIRiT from the ACS lines)")
    _add_operator_args(p)
    p.add_argument("--state", action="append", default=[], metavar="KEY=PATH.npy", help="per-sample state")
    p.add_argument("--labels", default=None, help="optional integer labels as .npy")
    p.add_argument("--name", default=None, help="dataset name (default: the observations' file name)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="PNG folders: force grey/RGB")
    p.add_argument("--out", required=True, help="output directory: local path or s3://bucket/prefix")
    p.set_defaults(func=_run_import)

    p = commands.add_parser(
        "inspect",
        help="print a dataset's manifest, verify checksums, write a PNG grid",
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", help="dataset directory: local path or s3://bucket/prefix")
    p.add_argument("--n", type=int, default=8, help="observations in the grid")
    p.add_argument("--grid", default=None, help="PNG path (default: ./<name>-inspect.png)")
    p.set_defaults(func=_run_inspect)
