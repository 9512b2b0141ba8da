"""Result tables and plots shared by ``qmambair demo`` and ``qmambair benchmark``.

A result is a plain dict per row (``method``, ``bits``, ``psnr``, ``ssim``, ...). ``Column`` says how one
key is shown. CSV keeps every key; Markdown and HTML show the chosen columns; the plot draws PSNR against
bits, one line per method (matplotlib, an optional dependency: without it no plot is made and None is
returned).
"""

from __future__ import annotations

import csv
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Column",
    "write_csv",
    "markdown_table",
    "html_table",
    "plot_metric_vs_bits",
    "format_value",
]


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header and a format spec (``".3f"``); missing values show "-"."""

    key: str
    header: str
    fmt: str = ""


def format_value(value: Any, fmt: str = "") -> str:
    if value is None or value == "":
        return "-"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """All keys of all rows (in first-seen order) as a CSV file."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub Markdown table; text columns left-aligned, numeric ones right-aligned."""
    numeric = [bool(c.fmt) for c in columns]
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c.key), c.fmt) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(format_value(row.get(c.key), c.fmt))}</td>" for c in columns)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_metric_vs_bits(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    metric: str = "psnr",
    title: str = "",
    floors: dict[str, float] | None = None,
) -> Path | None:
    """Plot ``metric`` against ``bits`` with one line per ``method`` (rows without bits are skipped);
    ``floors`` draws horizontal reference lines (e.g. ``{"bicubic": 28.1, "float": 30.2}``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row.get("bits") in (None, "") or row.get(metric) is None:
            continue
        series.setdefault(str(row["method"]), []).append((int(row["bits"]), float(row[metric])))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    styles = ("--", ":", "-.")
    for i, (label, value) in enumerate((floors or {}).items()):  # grey reference lines, apart from the series
        ax.axhline(value, linestyle=styles[i % len(styles)], color=str(0.2 + 0.25 * (i % 3)), label=label)
    bits = sorted({b for points in series.values() for b, _ in points})
    if bits:
        ax.set_xticks(bits)
        ax.set_xticklabels([f"W{b}A{b}" for b in bits])
    ax.set_xlabel("bits (weights and activations)")
    ax.set_ylabel(f"{metric.upper()}{' (dB)' if metric == 'psnr' else ''}")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
