"""Summaries of evaluation records: a JSON summary, a Markdown report and the ratio-sensitivity plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from linalign.evaluation import pareto

SUMMARY, REPORT, PLOT, PARETO_PLOT = "summary.json", "report.md", "sweep.png", "pareto.png"
OPTION_KEYS = ("kl", "guard", "mask", "dry", "placement")  # the quality options, as records name them


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(records: list[dict], judgments: dict | None = None) -> dict:
    """Per run: score (compliance or accuracy) overall and per group, fluency, length, repetition, reward."""
    by_run: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_run[r["run"]].append(r)
    runs = {}
    for label, rows in by_run.items():
        groups: dict[str, list] = defaultdict(list)
        for r in rows:
            groups[r["group"]].append(r["score"])
        runs[label] = {
            "method": rows[0]["method"],
            "ratio": rows[0].get("ratio"),
            "lam": rows[0].get("lam"),
            "options": {k: rows[0][k] for k in OPTION_KEYS if rows[0].get(k) is not None},
            "n": len(rows),
            "score": _mean([r["score"] for r in rows]),
            "by_group": {g: _mean(s) for g, s in sorted(groups.items())},
            "perplexity_median": _median([r["perplexity"] for r in rows]),
            "new_tokens_mean": _mean([r["new_tokens"] for r in rows]),
            "distinct2_mean": _mean([r["distinct2"] for r in rows]),
            "repeat4_mean": _mean([r["repeat4"] for r in rows]),
            "reward_mean": _mean([r.get("reward") for r in rows]),
        }
    return {"runs": runs, "judgments": judgments or {}}


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def markdown(summary: dict, title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| run | n | score | median perplexity (plain model) | mean tokens | distinct-2 | repeated 4-grams | reward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in summary["runs"].items():
        lines.append(
            f"| {label} | {s['n']} | {_fmt(s['score'])} | {_fmt(s['perplexity_median'], '{:.1f}')} | "
            f"{_fmt(s['new_tokens_mean'], '{:.1f}')} | {_fmt(s['distinct2_mean'])} | {_fmt(s['repeat4_mean'])} | "
            f"{_fmt(s['reward_mean'])} |"
        )
    groups = sorted({g for s in summary["runs"].values() for g in s["by_group"]})
    if len(groups) > 1:
        lines += ["", "## Score per group", "", "| run | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        for label, s in summary["runs"].items():
            lines.append(f"| {label} | " + " | ".join(_fmt(s["by_group"].get(g)) for g in groups) + " |")
    for pair, j in summary["judgments"].items():
        lines += [
            "",
            f"## Judge: {pair}",
            "",
            f"wins {j['win']}, losses {j['loss']}, ties {j['tie']} "
            f"(win rate {_fmt(j['win_rate'])}, each pair judged in both orders)",
        ]
    return "\n".join(lines) + "\n"


def plot_sweep(summary: dict, path: Path, title: str) -> bool:
    """Score and fluency against the ratio (Linear Alignment) or lam (DeRa); baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"].values()
    series: dict[str, list] = {}
    for r in runs:  # one line per method and set of options (la's default preset has the loop penalty's)
        strength = {"la": "ratio", "dera": "lam"}.get(r["method"])
        if strength is not None and r[strength] is not None:
            name = " ".join([r["method"], *(f"{k}={v}" for k, v in sorted((r.get("options") or {}).items()))])
            series.setdefault(name, []).append((r[strength], r))
    series = {name: sorted(s, key=lambda point: point[0]) for name, s in series.items() if len(s) > 1}
    if not series:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for method, points in series.items():
        xs = [x for x, _ in points]
        top.plot(xs, [r["score"] for _, r in points], marker="o", label=method)
        bottom.plot(xs, [r["perplexity_median"] for _, r in points], marker="o", label=method)
    for r in runs:
        if r["method"] in ("base", "prompt"):
            for axis, key in ((top, "score"), (bottom, "perplexity_median")):
                if r[key] is not None:
                    axis.axhline(r[key], linestyle="--", linewidth=1, color="grey" if r["method"] == "base" else "k")
                    axis.annotate(r["method"], (0, r[key]), xycoords=("axes fraction", "data"), fontsize=8)
    top.set_ylabel("score (compliance / accuracy)")
    bottom.set_ylabel("median perplexity\nunder the plain model")
    bottom.set_xlabel("ratio r (Linear Alignment) / λ (DeRa)")
    top.legend()
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(out: Path, records: list[dict], title: str, judgments: dict | None = None) -> dict:
    """summary.json, report.md (with the Pareto view where runs have scores), sweep.png and pareto.png."""
    summary = summarise(records, judgments)
    text = markdown(summary, title)
    if any(s["score"] is not None for s in summary["runs"].values()):
        summary["pareto"] = pareto.pareto(records, summary["runs"])
        text += "\n".join(pareto.markdown(summary["pareto"])) + "\n"
        pareto.plot(summary["pareto"], out / PARETO_PLOT, title)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    (out / REPORT).write_text(text)
    plot_sweep(summary, out / PLOT, title)
    return summary
