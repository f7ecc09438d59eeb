"""The rule a candidate must pass to become the default for `la` (docs/quality.md, "A soft loop penalty", and
"Principle placement"): against a reference run, on the principle sets its compliance is not lower (paired 95 %
bootstrap interval of the difference reaches 0), its repeated 4-gram rate is no higher than prompting's and its
median perplexity is at most 1.1x the reference's; on the structured suite its validity is not lower (the same
paired interval). Where a rule also asks for a gain, the paired interval of the compliance difference pooled over
the principle-set directories (each directory's questions its own) must lie above 0.

    python -m linalign.evaluation.decide [--reference 'la ratio=2 dry=2'] runs/dry-structured runs/dry-principles ...

prints, per candidate (every other Linear Alignment run) and per results directory, each condition with its
margin, then its pooled compliance gain. The reference defaults to the paper's recipe, `la ratio=2` with no
option (an evaluation run with `--preset paper`); la's default (`la ratio=2 dry=2`) is `--reference`'s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from linalign.evaluation.pareto import _scores_by_task, paired_difference
from linalign.evaluation.report import summarise
from linalign.evaluation.runner import RECORDS, SETTINGS, read_records

REFERENCE, BASELINE = "la ratio=2", "prompt"
PERPLEXITY_FACTOR = 1.1


def conditions(records: list[dict], candidate: str, structured: bool, reference: str = REFERENCE) -> dict[str, dict]:
    """Each condition of the rule for `candidate` on one set's records: whether it holds, the candidate's
    figure and the limit it is held to. A condition without the runs it needs is absent."""
    runs = summarise(records)["runs"]
    by_task = _scores_by_task(records)
    out: dict[str, dict] = {}
    if candidate not in runs or reference not in runs:
        return out
    diff = paired_difference(by_task.get(candidate, {}), by_task.get(reference, {}))
    if diff:
        name = "validity" if structured else "compliance"
        out[name] = {
            "holds": diff["high"] >= 0,
            "value": diff["mean"],
            "limit": f"[{diff['low']:+.3f}, {diff['high']:+.3f}]",
        }
    if structured:
        return out
    c, ref = runs[candidate], runs[reference]
    if BASELINE in runs and None not in (c["repeat4_mean"], runs[BASELINE]["repeat4_mean"]):
        limit = runs[BASELINE]["repeat4_mean"]
        out["repetition"] = {"holds": c["repeat4_mean"] <= limit, "value": c["repeat4_mean"], "limit": limit}
    if None not in (c["perplexity_median"], ref["perplexity_median"]):
        limit = PERPLEXITY_FACTOR * ref["perplexity_median"]
        out["perplexity"] = {"holds": c["perplexity_median"] <= limit, "value": c["perplexity_median"], "limit": limit}
    return out


Results = dict[Path, tuple[list[dict], bool]]  # results directory -> its records, whether it is the structured suite


def load(directories: list[Path]) -> Results:
    """Each results directory's records and whether it holds the structured suite, read once."""
    return {
        d: (read_records(d / RECORDS), json.loads((d / SETTINGS).read_text())["suite"] == "structured")
        for d in directories
    }


def verdicts(results: Results, reference: str = REFERENCE) -> dict[str, dict[str, dict]]:
    """candidate -> directory -> its conditions, for every Linear Alignment run but the reference."""
    out: dict[str, dict[str, dict]] = {}
    for directory, (records, structured) in results.items():
        for label in sorted({r["run"] for r in records if r["method"] == "la"} - {reference}):
            out.setdefault(label, {})[str(directory)] = conditions(records, label, structured, reference)
    return out


def pooled_gain(results: Results, candidate: str, reference: str = REFERENCE) -> dict | None:
    """`compliance(candidate) - compliance(reference)` over the questions of every principle-set directory that
    holds both runs, each directory's questions counted apart: the mean, its paired 95 % interval and whether it
    lies above 0 (None: no such question)."""
    pairs: dict[str, dict[str, float]] = {candidate: {}, reference: {}}
    for directory, (records, structured) in results.items():
        if structured:
            continue
        by_task = _scores_by_task(records)
        for run, scores in pairs.items():
            scores.update({f"{directory}/{q}": s for q, s in by_task.get(run, {}).items()})
    diff = paired_difference(pairs[candidate], pairs[reference])
    return diff and diff | {"holds": diff["low"] > 0}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m linalign.evaluation.decide", description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default=REFERENCE, help=f"the reference run's label (default {REFERENCE!r})")
    parser.add_argument("directories", nargs="+", type=Path)
    args = parser.parse_args(argv)
    results = load(args.directories)
    for candidate, per_set in verdicts(results, args.reference).items():
        print(candidate)
        for directory, conds in per_set.items():
            cells = []
            for name, c in conds.items():
                value = f"{c['value']:+.3f}" if name in ("compliance", "validity") else f"{c['value']:.3f}"
                limit = c["limit"] if isinstance(c["limit"], str) else f"<= {c['limit']:.3f}"
                cells.append(f"{name} {value} {limit} {'ok' if c['holds'] else 'FAILS'}")
            print(f"  {directory}: " + "; ".join(cells))
        gain = pooled_gain(results, candidate, args.reference)
        if gain:
            verdict = "above 0" if gain["holds"] else "not above 0"
            print(
                f"  pooled gain: compliance {gain['mean']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}] over "
                f"{gain['tasks']} questions, {verdict}"
            )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
