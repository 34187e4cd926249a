"""Reports over ``results.jsonl``: ``summary.md`` (mean ± std over seeds per configuration) and a plot of
accuracy against retention, one line per (quantizer, scorer), dense configurations as horizontal lines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from qapframe.eval.metrics import mean_std

SUMMARY_FILE = "summary.md"
PLOT_FILE = "accuracy_vs_retention.png"


@dataclass
class ConfigurationRow:
    """All seeds of one configuration."""

    configuration_id: str
    label: str
    quantizer: str
    scorer: str
    retention: float | None  # None for dense (no pruning)
    ok: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def stat(self, name: str) -> tuple[float, float]:
        return mean_std([r["metrics"][name] for r in self.ok if r["metrics"].get(name) is not None])


def group_runs(records: Iterable[dict[str, Any]]) -> list[ConfigurationRow]:
    """Latest record per run key, grouped by configuration in first-seen order."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["key"]] = record
    rows: dict[str, ConfigurationRow] = {}
    for record in latest.values():
        cid = record["configuration_id"]
        row = rows.get(cid)
        if row is None:
            row = rows[cid] = ConfigurationRow(
                cid, record["label"], record["quantizer"], record["scorer"], record.get("retention")
            )
        (row.ok if record["status"] == "ok" else row.errors).append(record)
    return list(rows.values())


def _pm(stat: tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def summary_markdown(rows: list[ConfigurationRow]) -> str:
    """A markdown table: one row per configuration, mean ± sample std over its successful seeds."""
    lines = [
        "# qapframe results",
        "",
        "Mean ± sample standard deviation over seeds. Accuracy in %; retained = vision tokens per image "
        "the LLM received; prefill = first forward of `generate`, ms per sample; memory = peak MiB "
        "(CUDA max allocated, or the process peak RSS on CPU).",
        "",
        "| configuration | quantizer | scorer | retention | accuracy (%) | retained tokens | prefill (ms) "
        "| peak memory (MiB) | seeds | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        retention = "dense" if row.retention is None else f"{row.retention:g}"
        errors = str(len(row.errors))
        if row.errors:
            first = row.errors[0].get("error", "").splitlines()[0][:80].replace("|", "/")
            errors += f" ({first})"
        lines.append(
            f"| {row.label} | {row.quantizer} | {row.scorer} | {retention} | {_pm(row.stat('accuracy'), 100)} "
            f"| {_pm(row.stat('retained_tokens'))} | {_pm(row.stat('prefill_ms_per_sample'), digits=2)} "
            f"| {_pm(row.stat('peak_memory_mib'), digits=0)} | {len(row.ok)} | {errors} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_retention(rows: list[ConfigurationRow], path: str | Path) -> Path:
    """Accuracy (mean ± std) vs retention per (quantizer, scorer); dense rows as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float, float]]] = {}
    dense: dict[str, tuple[float, float]] = {}
    for row in rows:
        mean, std = row.stat("accuracy")
        if math.isnan(mean):
            continue
        if row.retention is None:
            dense[f"{row.quantizer}, dense"] = (mean, std)
        else:
            series.setdefault(f"{row.quantizer} + {row.scorer}", []).append((row.retention, mean, std))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    retentions = sorted({x for points in series.values() for x, _, _ in points})
    for name, points in series.items():
        points.sort()
        xs, ys, es = zip(*points)
        ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="o", capsize=3, label=name)
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (name, (mean, std)) in enumerate(dense.items()):
        ax.axhline(100 * mean, linestyle=styles[i % len(styles)], color=f"C{(len(series) + i) % 10}", label=name)
    if retentions:
        ax.set_xscale("log", base=2)
        ax.set_xticks(retentions, [f"{100 * r:g}%" for r in retentions])
    ax.set_xlabel("vision tokens retained")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs retention")
    ax.grid(True, alpha=0.3)
    if series or dense:  # below the axes: labels of swept strategies can be long
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_reports(records: Iterable[dict[str, Any]], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.md`` and the plot into ``output_dir``; returns their paths."""
    output_dir = Path(output_dir)
    rows = group_runs(records)
    summary = output_dir / SUMMARY_FILE
    tmp = summary.with_suffix(".md.tmp")
    tmp.write_text(summary_markdown(rows), encoding="utf-8")
    tmp.replace(summary)  # readers never see a half-written table
    plot = plot_accuracy_vs_retention(rows, output_dir / PLOT_FILE)
    return summary, plot


__all__ = ["PLOT_FILE", "SUMMARY_FILE", "ConfigurationRow", "group_runs", "plot_accuracy_vs_retention",
           "summary_markdown", "write_reports"]
