"""The rule a candidate must pass to become the default for `la` (docs/quality.md, "A soft loop penalty"):
against the paper's setting, on the principle sets its compliance is not lower (paired 95 % bootstrap interval
of the difference reaches 0), its repeated 4-gram rate is no higher than prompting's and its median perplexity
is at most 1.1x the paper's; on the structured suite its validity is not lower (the same paired interval).

    python -m linalign.evaluation.decide runs/dry-structured runs/dry-principles ...

prints, per candidate and per results directory, each condition with its margin. The reference is the paper's
recipe, `la ratio=2` with no option: run the evaluation with `--preset paper` (la's default has the loop penalty).
"""

from __future__ import annotations

import sys
from pathlib import Path

from linalign.evaluation.pareto import _scores_by_task, paired_difference
from linalign.evaluation.report import summarise
from linalign.evaluation.runner import RECORDS, SETTINGS, read_records

REFERENCE, BASELINE = "la ratio=2", "prompt"
PERPLEXITY_FACTOR = 1.1


def conditions(records: list[dict], candidate: str, structured: bool) -> dict[str, dict]:
    """Each condition of the rule for `candidate` on one set's records: whether it holds, the candidate's
    figure and the limit it is held to. A condition without the runs it needs is absent."""
    runs = summarise(records)["runs"]
    by_task = _scores_by_task(records)
    out: dict[str, dict] = {}
    if candidate not in runs or REFERENCE not in runs:
        return out
    diff = paired_difference(by_task.get(candidate, {}), by_task.get(REFERENCE, {}))
    if diff:
        name = "validity" if structured else "compliance"
        out[name] = {
            "holds": diff["high"] >= 0,
            "value": diff["mean"],
            "limit": f"[{diff['low']:+.3f}, {diff['high']:+.3f}]",
        }
    if structured:
        return out
    c, ref = runs[candidate], runs[REFERENCE]
    if BASELINE in runs and None not in (c["repeat4_mean"], runs[BASELINE]["repeat4_mean"]):
        limit = runs[BASELINE]["repeat4_mean"]
        out["repetition"] = {"holds": c["repeat4_mean"] <= limit, "value": c["repeat4_mean"], "limit": limit}
    if None not in (c["perplexity_median"], ref["perplexity_median"]):
        limit = PERPLEXITY_FACTOR * ref["perplexity_median"]
        out["perplexity"] = {"holds": c["perplexity_median"] <= limit, "value": c["perplexity_median"], "limit": limit}
    return out


def verdicts(directories: list[Path]) -> dict[str, dict[str, dict]]:
    """candidate -> directory -> its conditions, for every Linear Alignment run with a quality option."""
    import json

    out: dict[str, dict[str, dict]] = {}
    for directory in directories:
        records = read_records(directory / RECORDS)
        structured = json.loads((directory / SETTINGS).read_text())["suite"] == "structured"
        for label in sorted({r["run"] for r in records} - {REFERENCE, BASELINE}):
            out.setdefault(label, {})[str(directory)] = conditions(records, label, structured)
    return out


def main(argv: list[str]) -> None:
    for candidate, per_set in verdicts([Path(a) for a in argv]).items():
        print(candidate)
        for directory, conds in per_set.items():
            cells = []
            for name, c in conds.items():
                value = f"{c['value']:+.3f}" if name in ("compliance", "validity") else f"{c['value']:.3f}"
                limit = c["limit"] if isinstance(c["limit"], str) else f"<= {c['limit']:.3f}"
                cells.append(f"{name} {value} {limit} {'ok' if c['holds'] else 'FAILS'}")
            print(f"  {directory}: " + "; ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
