"""Reports over ``results.jsonl``: ``summary.md`` (mean ± std over seeds per configuration, and the plot's
key) and a plot of accuracy against retention, one keyed curve per (quantizer, scorer, pruner), dense
configurations as grey horizontal lines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from qapframe.eval.metrics import MEMORY_KINDS, mean_std

SUMMARY_FILE = "summary.md"
PLOT_FILE = "accuracy_vs_retention.png"


@dataclass
class ConfigurationRow:
    """All seeds of one configuration."""

    configuration_id: str
    label: str
    quantizer: str
    scorer: str
    pruner: str  # "" for dense (no pruning)
    retention: float | None  # None for dense (no pruning)
    ok: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def stat(self, name: str) -> tuple[float, float]:
        return mean_std([r["metrics"][name] for r in self.ok if r["metrics"].get(name) is not None])

    @property
    def memory_kind(self) -> str | None:
        return next((r["metrics"].get("peak_memory_kind") for r in self.ok), None)


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
                cid, record["label"], record["quantizer"], record["scorer"], record.get("pruner", ""),
                record.get("retention"),
            )
        (row.ok if record["status"] == "ok" else row.errors).append(record)
    return list(rows.values())


# -- the plot's curves and their keys ------------------------------------------------------------

_COLORS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]  # matplotlib's cycle without C7, its grey
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
_DASHES = ["-", "--", "-.", ":"]
_DENSE_GREYS = ["0.0", "0.35", "0.55", "0.7"]  # baselines in greys: never a curve's colour
_LABEL_WIDTH = 28


def _name(label: str) -> str:
    """``rtn(scheme=W4A4)`` -> ``rtn``: the legend shows names, summary.md the parameters."""
    return label.split("(", 1)[0]


@dataclass
class PlotEntry:
    """One legend entry: a curve (a quantizer + scorer + pruner over retentions) or a dense baseline."""

    key: str  # "A", "B", ... for curves, "D1", "D2", ... for dense baselines
    quantizer: str
    scorer: str
    pruner: str
    dense: bool
    color: str
    marker: str | None
    linestyle: str
    points: list[tuple[float, float, float]] = field(default_factory=list)  # (retention, mean, std) accuracy

    @property
    def label(self) -> str:
        """The short legend label; summary.md's plot key holds the full description."""
        if self.dense:
            text = f"{_name(self.quantizer)} dense"
        else:
            pruner = f" /{_name(self.pruner)}" if self.pruner not in ("", "topk") else ""
            text = f"{_name(self.quantizer)} + {_name(self.scorer)}{pruner}"
        text = text if len(text) <= _LABEL_WIDTH else text[: _LABEL_WIDTH - 1] + "…"
        return f"{self.key}  {text}"


def _curve_key(i: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[i] if i < 26 else f"{letters[i // 26 - 1]}{letters[i % 26]}"


def plot_entries(rows: list[ConfigurationRow]) -> list[PlotEntry]:
    """Curves (one per quantizer + scorer + pruner) then dense baselines, each with a key and a style
    no other entry shares (colour x marker for curves; grey x dash for baselines)."""
    curves: dict[tuple[str, str, str], PlotEntry] = {}
    dense: dict[str, PlotEntry] = {}
    for row in rows:
        mean, std = row.stat("accuracy")
        if row.retention is None:
            if row.quantizer not in dense:
                i = len(dense)
                dense[row.quantizer] = PlotEntry(
                    f"D{i + 1}", row.quantizer, "dense", "", True, _DENSE_GREYS[i % len(_DENSE_GREYS)], None,
                    _DASHES[(i + i // len(_DENSE_GREYS)) % len(_DASHES)],
                )
            if not math.isnan(mean):
                dense[row.quantizer].points.append((1.0, mean, std))
            continue
        name = (row.quantizer, row.scorer, row.pruner)
        if name not in curves:
            i = len(curves)
            # Colour c = i mod 9 with marker (c + i div 9) mod 10: a colour's curves differ in marker, so
            # the first 90 curves all look different.
            c, lap = i % len(_COLORS), i // len(_COLORS)
            curves[name] = PlotEntry(
                _curve_key(i), *name, False, _COLORS[c], _MARKERS[(c + lap) % len(_MARKERS)],
                _DASHES[lap % len(_DASHES)],
            )
        if not math.isnan(mean):
            curves[name].points.append((row.retention, mean, std))
    return [*curves.values(), *dense.values()]


def _pm(stat: tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _memory_note(rows: list[ConfigurationRow]) -> str:
    kinds = list(dict.fromkeys(k for k in (row.memory_kind for row in rows) if k))
    if not kinds:
        return "peak memory in MiB"
    return "peak memory in MiB: " + "; ".join(MEMORY_KINDS.get(k, k) for k in kinds)


def summary_markdown(rows: list[ConfigurationRow]) -> str:
    """A markdown table (one row per configuration, mean ± sample std over its successful seeds) and the
    key of the plot's legend."""
    entries = plot_entries(rows)
    key_of = {(e.quantizer, e.scorer if not e.dense else "dense", e.pruner): e.key for e in entries}
    lines = [
        "# qapframe results",
        "",
        "Mean ± sample standard deviation over seeds. Accuracy in %; retained = vision tokens per image "
        "the LLM received; prefill = first forward of `generate`, ms per sample; " + _memory_note(rows) + ". "
        "Plot key: the curve (or dense baseline) of `accuracy_vs_retention.png` the row belongs to.",
        "",
        "| plot key | quantizer | scorer | pruner | retention | accuracy (%) | retained tokens | prefill (ms) "
        "| peak memory (MiB) | seeds | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        dense = row.retention is None
        retention = "dense" if dense else f"{row.retention:g}"
        key = key_of.get((row.quantizer, "dense" if dense else row.scorer, "" if dense else row.pruner), "")
        errors = str(len(row.errors))
        if row.errors:
            first = row.errors[0].get("error", "").splitlines()[0][:80].replace("|", "/")
            errors += f" ({first})"
        lines.append(
            f"| {key} | {row.quantizer} | {'–' if dense else row.scorer} | {'–' if dense else row.pruner or 'topk'} "
            f"| {retention} | {_pm(row.stat('accuracy'), 100)} "
            f"| {_pm(row.stat('retained_tokens'))} | {_pm(row.stat('prefill_ms_per_sample'), digits=2)} "
            f"| {_pm(row.stat('peak_memory_mib'), digits=0)} | {len(row.ok)} | {errors} |"
        )
    plotted = [e for e in entries if e.points]
    lines += ["", "## Plot key", ""]
    if not plotted:
        lines.append("No run succeeded, so no plot was written.")
        return "\n".join(lines) + "\n"
    lines += [
        "Curves: accuracy (mean over seeds, error bars ± one standard deviation) against the share of vision "
        "tokens kept; each curve is shifted slightly sideways so that curves which coincide stay visible (the "
        "ticks mark the true retentions). Dense baselines (D…): grey horizontal lines, shaded ± one std.",
        "",
        "| key | legend | quantizer | scorer | pruner | colour | marker |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in plotted:
        lines.append(
            f"| {e.key} | {e.label.split('  ', 1)[1]} | {e.quantizer} | {'dense baseline' if e.dense else e.scorer} "
            f"| {'–' if e.dense else e.pruner or 'topk'} | {e.color if not e.dense else 'grey ' + e.color} "
            f"| {e.marker or 'line ' + e.linestyle} |"
        )
    return "\n".join(lines) + "\n"


def short_table(rows: list[ConfigurationRow], width: int = 60) -> str:
    """The terminal's end-of-run table: one line per configuration, its label cut to ``width``, accuracy (%)
    and vision tokens per image as mean ± std over its successful seeds, and how many seeds failed."""
    lines = [f"{'configuration':<{width}}  {'accuracy (%)':>13}  {'tokens':>13}  seeds"]
    for row in rows:
        label = row.label if len(row.label) <= width else row.label[: width - 1] + "…"
        failed = f" ({len(row.errors)} failed)" if row.errors else ""
        lines.append(f"{label:<{width}}  {_pm(row.stat('accuracy'), 100):>13}  {_pm(row.stat('retained_tokens')):>13}"
                     f"  {len(row.ok)}{failed}")
    return "\n".join(lines)


def plot_accuracy_vs_retention(rows: list[ConfigurationRow], path: str | Path) -> Path | None:
    """Accuracy (mean ± std) vs retention per curve, dense baselines as grey horizontal lines; None (and
    no file) when no run succeeded."""
    entries = [e for e in plot_entries(rows) if e.points]
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    curves = [e for e in entries if not e.dense]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    retentions = sorted({x for e in curves for x, _, _ in e.points})
    for i, e in enumerate(curves):
        e.points.sort()
        xs, ys, es = zip(*e.points)
        shift = 2 ** (0.03 * (i - (len(curves) - 1) / 2))  # a sideways nudge, a few % on the log axis
        ax.errorbar([x * shift for x in xs], [100 * y for y in ys], yerr=[100 * v for v in es], color=e.color,
                    marker=e.marker, linestyle=e.linestyle, markersize=5, capsize=3, linewidth=1.2, label=e.label)
    for e in entries:
        if e.dense:
            mean, std = e.points[0][1], e.points[0][2]
            ax.axhline(100 * mean, color=e.color, linestyle=e.linestyle, linewidth=1.4, label=e.label)
            if std:
                ax.axhspan(100 * (mean - std), 100 * (mean + std), color=e.color, alpha=0.08, linewidth=0)
            ax.annotate(e.key, (1.0, 100 * mean), xycoords=("axes fraction", "data"), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7, color=e.color)
    if retentions:
        ax.set_xscale("log", base=2)
        ax.set_xticks(retentions, [f"{100 * r:g}%" for r in retentions])
        ax.minorticks_off()
    ax.set_xlabel("vision tokens retained")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs retention (keys: summary.md)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.04, 1.0), frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_reports(records: Iterable[dict[str, Any]], output_dir: str | Path) -> tuple[Path, Path | None]:
    """Write ``summary.md`` and the plot into ``output_dir``; returns their paths (the plot's None, and a
    stale plot removed, when no run succeeded)."""
    output_dir = Path(output_dir)
    rows = group_runs(records)
    summary = output_dir / SUMMARY_FILE
    tmp = summary.with_suffix(".md.tmp")
    tmp.write_text(summary_markdown(rows), encoding="utf-8")
    tmp.replace(summary)  # readers never see a half-written table
    plot = plot_accuracy_vs_retention(rows, output_dir / PLOT_FILE)
    if plot is None:
        (output_dir / PLOT_FILE).unlink(missing_ok=True)  # an old plot would contradict summary.md
    return summary, plot


__all__ = ["PLOT_FILE", "SUMMARY_FILE", "ConfigurationRow", "PlotEntry", "group_runs", "plot_accuracy_vs_retention",
           "plot_entries", "summary_markdown", "write_reports"]
