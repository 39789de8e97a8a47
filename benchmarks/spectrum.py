"""Where an MRI model puts its energy along the phase-encode axis (the one the column masks sample).

    python -m benchmarks.spectrum --data DIR --model NAME=FOLDER[@SIGMA_STOP] [--model ...] [--plot PNG]

For the clean evaluation slices of the dataset in DIR (evaluation only: no model or selection reads them) and
for each saved model's samples (a one-step generator, or a teacher's sampler truncated at SIGMA_STOP; default:
its card's), prints the mean energy |F x|^2 per frequency along the width of the complex image, in cycles per
field of view, and the share of it outside the calibration (ACS) block of lines every scan measures.

Why: the long run's MRI students draw a speckle their teachers do not; this locates it in frequency. A
Fourier-space Ambient network sees only the lines of its further mask M~, so the SiD loss matches the law of
what M~ holds and only the conditional mean of the rest; where M~ is the ACS block in every draw, the energy
just outside the block is the suspect (docs/results.md, "Where the MRI student's speckle sits").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rsd_core.data.reader import open_dataset
from rsd_core.operators.mri import MRI
from rsd_core.stages import sampler_for


def phase_encode_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Mean |F_w x|^2 over samples and rows, per frequency along the width, zero frequency at the centre
    (orthonormal DFT, so the energies sum to the images' mean energy per row). ``images``: (N, 2, H, W) [Re, Im]."""
    if images.ndim != 4 or images.shape[1] != 2:
        raise ValueError(f"expected complex images (N, 2, H, W) [Re, Im], got shape {tuple(images.shape)}")
    z = torch.complex(images[:, 0].double(), images[:, 1].double())
    k = torch.fft.fftshift(torch.fft.fft(z, dim=-1, norm="ortho"), dim=-1)
    return (k.abs() ** 2).mean((0, 1))


def frequencies(width: int) -> list[int]:
    """Cycles per field of view of the centred spectrum's bins."""
    return list(range(-(width // 2), width - width // 2))


def outside_share(spectrum: torch.Tensor, band: torch.Tensor) -> float:
    """The share of the energy outside the ``band`` of bins (a bool mask over the centred spectrum)."""
    return float(spectrum[~band].sum() / spectrum.sum())


def parse_model(text: str) -> tuple[str, Path, float | None]:
    """NAME=FOLDER[@SIGMA_STOP] -> (name, folder, sigma_stop or None)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--model takes NAME=FOLDER[@SIGMA_STOP], got {text!r}")
    folder, _, stop = rest.partition("@")
    try:
        return name, Path(folder), float(stop) if stop else None
    except ValueError:
        raise ValueError(f"--model {text!r}: SIGMA_STOP must be a number, got {stop!r}") from None


def measure(data: str, models: list[str], n: int | None = None, seed: int = 0) -> dict:
    """The spectra of the clean evaluation slices and of each model's samples (as many as the slices)."""
    parsed = [parse_model(m) for m in models]  # refuse a malformed or missing model before anything is sampled
    for name, folder, _ in parsed:
        if not (folder / "model.json").exists():
            raise ValueError(f"--model {name}: {folder} holds no saved model (model.json)")
    dataset = open_dataset(data)
    operator = dataset.operator
    if not isinstance(operator, MRI):
        raise ValueError(f"{data}: the spectrum is along MRI's phase-encode axis; this dataset's operator is "
                         f"'{dataset.manifest.operator.kind}'")
    clean_set = dataset.clean_eval()
    if clean_set is None:
        raise ValueError(f"{data}: the dataset has no clean evaluation split (its manifest's clean_eval_uri)")
    clean = clean_set.read_all(n)[0].float()
    width = clean.shape[-1]
    band = operator.acs_block(width)
    rows = {"clean": phase_encode_spectrum(clean)}
    for name, folder, stop in parsed:
        rows[name] = phase_encode_spectrum(sampler_for(folder, sigma_stop=stop).sample(len(clean), seed=seed).float())
    return {
        "data": str(data),
        "n": len(clean),
        "features": "none (raw k-space energies); clean evaluation slices for evaluation only",
        "frequencies": frequencies(width),
        "acs_frequencies": [f for f, inside in zip(frequencies(width), band.tolist(), strict=True) if inside],
        "rows": {name: {"energy": s.tolist(), "outside_acs": outside_share(s, band), "total": float(s.sum())}
                 for name, s in rows.items()},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freqs = result["frequencies"]
    acs = result["acs_frequencies"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.axvspan(min(acs) - 0.5, max(acs) + 0.5, color="0.9", label=f"ACS block ({len(acs)} lines)")
    for name, row in result["rows"].items():
        ax.semilogy(freqs, row["energy"], marker=".", label=f"{name} ({row['outside_acs']:.1%} outside ACS)")
    ax.set_xlabel("phase-encode frequency (cycles per field of view)")
    ax.set_ylabel("mean energy |F x|^2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an MRI dataset folder with a clean evaluation split")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER[@SIGMA_STOP]",
                        help="a saved model (generator or teacher) to sample; repeatable")
    parser.add_argument("--n", type=int, default=None, help="slices and samples (default: every clean slice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--plot", type=Path, default=None, help="write the spectra as a PNG here")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure(args.data, args.model, args.n, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(f"{result['n']} slices; {result['features']}")
    print("frequency: " + " ".join(f"{f:>7d}" for f in result["frequencies"]))
    for name, row in result["rows"].items():
        print(f"{name:>9}: " + " ".join(f"{e:7.2g}" for e in row["energy"]))
    for name, row in result["rows"].items():
        print(f"{name}: {row['outside_acs']:.2%} of the energy outside the {len(result['acs_frequencies'])} ACS lines "
              f"(total {row['total']:.3g})")
    if args.plot:
        plot(result, args.plot)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
