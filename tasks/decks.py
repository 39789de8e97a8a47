"""Flyte Decks: sample grids and loss curves as inline PNGs, so the Flyte console shows them."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from flytekit import Deck


def png_html(path: str | Path, caption: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}"/><figcaption>{html.escape(caption)}</figcaption></figure>'


def table_html(rows: list[dict]) -> str:
    if not rows:
        return "<p>no rows</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def loss_curves(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """One panel per ``loss*`` series against the step, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in history.items() if k.startswith("loss") and v}
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(4.5 * max(1, len(series)), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items(), strict=False):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log" if min(values) > 0 else "linear")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def show(name: str, *parts: str) -> None:
    """Add a Deck to the running task (no-op outside a task with ``enable_deck=True``)."""
    Deck(name, "\n".join(parts))
