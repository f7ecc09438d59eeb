"""The Pareto view of a sweep: compliance against fluency (median perplexity under the plain model) and
repetition (repeated 4-gram rate), with bootstrap intervals, the frontier, and the rule a candidate must pass
to replace the paper's default.

The rule (docs/quality.md): a run dominates the reference (Linear Alignment at r = 2, the paper's recipe) when
its compliance is not lower within the 95 % interval of the paired difference, its median perplexity is at most
1.5x plain prompting's and its repeated 4-gram rate is no higher than prompting's.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict

from linalign.evaluation.suites import question_of

BOOTSTRAP = 2000
PERPLEXITY_FACTOR = 1.5


def _scores_by_task(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per run, each question's score: the mean over its samples, so intervals and paired differences
    resample questions, not replies that share one."""
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("score") is not None:
            samples[r["run"]][question_of(r["task"])].append(float(r["score"]))
    return {run: {q: statistics.fmean(s) for q, s in by_question.items()} for run, by_question in samples.items()}


def _interval(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[int(0.025 * len(samples))], samples[min(int(0.975 * len(samples)), len(samples) - 1)]


def bootstrap_interval(scores: list[float], seed: int = 0, n: int = BOOTSTRAP) -> tuple[float, float] | None:
    """95 % percentile interval of the mean score, resampling tasks with replacement."""
    if not scores:
        return None
    rng = random.Random(seed)
    k = len(scores)
    return _interval([sum(rng.choices(scores, k=k)) / k for _ in range(n)])


def paired_difference(a: dict[str, float], b: dict[str, float], seed: int = 0, n: int = BOOTSTRAP):
    """Mean of `a - b` over the tasks both scored and its 95 % interval, resampling those tasks."""
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    diffs = [a[t] - b[t] for t in common]
    rng = random.Random(seed)
    k = len(diffs)
    low, high = _interval([sum(rng.choices(diffs, k=k)) / k for _ in range(n)])
    return {"mean": statistics.fmean(diffs), "low": low, "high": high, "tasks": k}


def frontier(points: dict[str, tuple[float, float, float]]) -> set[str]:
    """Runs no other run beats: higher-or-equal compliance, lower-or-equal perplexity and repetition, one
    strictly better. Points are (compliance, perplexity, repetition)."""

    def beats(p, q) -> bool:
        return p[0] >= q[0] and p[1] <= q[1] and p[2] <= q[2] and p != q

    return {a for a, p in points.items() if not any(beats(q, p) for b, q in points.items() if b != a)}


def pareto(records: list[dict], summary_runs: dict, reference: str = "la ratio=2", baseline: str = "prompt") -> dict:
    """Per run: compliance and its interval, perplexity and repetition, the frontier, and the rule against
    `reference` (its limits taken from `baseline`)."""
    by_task = _scores_by_task(records)
    points = {
        label: (s["score"], s["perplexity_median"], s["repeat4_mean"])
        for label, s in summary_runs.items()
        if None not in (s["score"], s["perplexity_median"], s["repeat4_mean"])
    }
    on_frontier = frontier(points)
    base = summary_runs.get(baseline)
    limits = None
    if base and base["perplexity_median"] is not None and base["repeat4_mean"] is not None:
        limits = {"perplexity": PERPLEXITY_FACTOR * base["perplexity_median"], "repeat4": base["repeat4_mean"]}
    out = {}
    for label, s in summary_runs.items():
        interval = bootstrap_interval(list(by_task.get(label, {}).values()))
        entry = {
            "score": s["score"],
            "score_low": interval[0] if interval else None,
            "score_high": interval[1] if interval else None,
            "perplexity_median": s["perplexity_median"],
            "repeat4_mean": s["repeat4_mean"],
            "frontier": label in on_frontier,
        }
        if reference in by_task and label != reference:
            diff = paired_difference(by_task.get(label, {}), by_task[reference])
            entry["vs_reference"] = diff
            if diff and limits and label in points:
                entry["dominates_reference"] = (
                    diff["high"] >= 0
                    and s["perplexity_median"] <= limits["perplexity"]
                    and s["repeat4_mean"] <= limits["repeat4"]
                )
        out[label] = entry
    return {"reference": reference, "baseline": baseline, "limits": limits, "runs": out}


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def markdown(view: dict) -> list[str]:
    """The Pareto table: one row per run, frontier and the rule against the reference marked."""
    limits = view["limits"]
    rule = (
        f"median perplexity <= {limits['perplexity']:.2f} (1.5x {view['baseline']}), "
        f"repeated 4-grams <= {limits['repeat4']:.3f} ({view['baseline']})"
        if limits
        else "no baseline run to take the limits from"
    )
    lines = [
        "",
        "## Pareto view",
        "",
        f"Frontier: no other run has compliance as high with perplexity and repetition as low. Rule against "
        f"`{view['reference']}`: compliance not lower (paired 95 % bootstrap interval of the difference reaches "
        f"0), {rule}.",
        "",
        "| run | compliance | 95 % interval | median perplexity | repeated 4-grams | Δ vs reference [95 %] "
        "| frontier | dominates reference |",
        "|---|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for label, e in sorted(view["runs"].items(), key=lambda kv: -(kv[1]["score"] or 0)):
        diff = e.get("vs_reference")
        diff_text = f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]" if diff else "–"
        dominates = {True: "yes", False: "no"}.get(e.get("dominates_reference"), "–")
        lines.append(
            f"| {label} | {_fmt(e['score'])} | {_fmt(e['score_low'])}–{_fmt(e['score_high'])} | "
            f"{_fmt(e['perplexity_median'], '{:.2f}')} | {_fmt(e['repeat4_mean'])} | {diff_text} | "
            f"{'★' if e['frontier'] else ''} | {dominates} |"
        )
    return lines


def plot(view: dict, path, title: str) -> bool:
    """Compliance (with its interval) against median perplexity and against repetition; frontier runs
    filled and joined, the paper's ratio sweep as a line, the limits of the rule dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {
        k: v for k, v in view["runs"].items() if None not in (v["score"], v["perplexity_median"], v["repeat4_mean"])
    }
    if len(runs) < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    paper = sorted(((k, v) for k, v in runs.items() if _is_paper_ratio(k)), key=lambda kv: _ratio(kv[0]))
    for axis, key, xlabel in (
        (axes[0], "perplexity_median", "median perplexity under the plain model (lower is better)"),
        (axes[1], "repeat4_mean", "repeated 4-gram rate (lower is better)"),
    ):
        if paper:
            axis.plot(
                [v[key] for _, v in paper],
                [v["score"] for _, v in paper],
                color="grey",
                lw=1,
                zorder=1,
                label="paper: fixed r",
            )
        front = sorted((v[key], v["score"]) for v in runs.values() if v["frontier"])
        for label, v in runs.items():
            err = (
                [[v["score"] - v["score_low"]], [v["score_high"] - v["score"]]] if v["score_low"] is not None else None
            )
            axis.errorbar(
                v[key],
                v["score"],
                yerr=err,
                fmt="o",
                ms=7 if v["frontier"] else 5,
                mfc="C3" if v["frontier"] else "white",
                mec="C3" if v["frontier"] else "C0",
                ecolor="lightgrey",
                zorder=2,
            )
            axis.annotate(
                label.replace("la ", ""), (v[key], v["score"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
        if front:
            axis.plot([x for x, _ in front], [y for _, y in front], color="C3", lw=1, ls=":", label="frontier")
        limits = view["limits"]
        if limits:
            axis.axvline(
                limits["perplexity" if key == "perplexity_median" else "repeat4"],
                color="k",
                ls="--",
                lw=0.8,
                label="limit of the rule",
            )
        axis.set_xlabel(xlabel)
    axes[0].set_ylabel("compliance (95 % bootstrap interval)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _ratio(label: str) -> float:
    return float(label.split("ratio=")[1].split()[0]) if "ratio=" in label else 0.0


def _is_paper_ratio(label: str) -> bool:
    """'prompt' (r = 0) and 'la ratio=R' with no option: the paper's line."""
    return label == "prompt" or (label.startswith("la ratio=") and len(label.split()) == 2)
