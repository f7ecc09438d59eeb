"""Run a suite over several methods and strengths: generate in batches, score, and stream results to JSONL.

A rerun with the same output directory skips every (run, task) already recorded, so interrupted work is
never lost; a directory produced with other settings is refused rather than mixed. When sampling, every task
has its own seed, derived from `--seed` and the task's id, so a reply does not depend on how the work was
batched or resumed; `samples` > 1 asks each question several times (tasks `id#0`, `id#1`, ...).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from linalign.config import AlignConfig, DecodeConfig, row_seed
from linalign.engine import Aligner
from linalign.errors import LinalignError
from linalign.evaluation.judges import RewardModel
from linalign.evaluation.metrics import distinct_n, perplexities, repeated_ngram_rate
from linalign.evaluation.suites import Task
from linalign.params import KNOBS
from linalign.prompts import build_ids
from linalign.resolve import decode_config, parse_methods

RECORDS = "generations.jsonl"
SETTINGS = "settings.json"


@dataclass
class EvalSettings:
    """Everything that decides what a record means; stored beside the records to guard resumes."""

    suite: str
    model: str
    methods: list[str]
    ratios: list[float] = field(default_factory=lambda: [2.0])
    lams: list[float] = field(default_factory=lambda: [1.0])
    max_new_tokens: int = 64
    plausibility_top_p: float = KNOBS["plausibility_top_p"].default
    system: str | None = None
    seed: int | None = None
    temperature: float | None = None
    # Further principles combined with each task's own in Linear Alignment, e.g. a negative one.
    extra_principles: list[str] = field(default_factory=list)
    extra_weights: list[float] = field(default_factory=list)

    # Which matrix-product form decode steps used (linalign.kernels): floats differ between the two.
    kernel: str = "torch"
    # Quality options of Linear Alignment (AlignConfig's kl_budget, repeat_guard, mask, plausibility_min_p, ...),
    # one dict per variant, each run at every ratio of `variant_ratios` beside the paper's own runs; a variant
    # with a "method" is that method's (e.g. prompting with the principle in the user turn).
    variants: list[dict] = field(default_factory=list)
    variant_ratios: list[float] = field(default_factory=list)
    samples: int = 1  # replies per question (sampling only)
    preset: str = KNOBS["preset"].default  # Linear Alignment's; results from before it existed were "paper"'s

    def runs(self) -> list[AlignConfig]:
        """One AlignConfig per (method, strength) of the sweep, then one per (variant, ratio) of Linear
        Alignment's quality options, and one per (variant, strength) of another method's (a variant's "method",
        Linear Alignment where absent); principles come per task."""
        configs = self._method_runs()
        methods = parse_methods(self.methods)
        for variant in self.variants:
            method = variant.get("method", "la")
            options = {k: v for k, v in variant.items() if k != "method"}
            if method not in methods:
                raise LinalignError(f"a variant of {method!r} ({options}) needs {method!r} in --methods")
            if method != "la":
                configs += [replace(c, **options) for c in self._method_runs() if c.method == method]
                continue
            # a variant may pin its own ratio (e.g. a trust region's cap)
            for ratio in [options["ratio"]] if "ratio" in options else self.variant_ratios or self.ratios:
                configs.append(replace(configs_la(self), **({"ratio": ratio} | options)))
        return list({c.label: c for c in configs}.values())  # a variant may be what the preset gives already

    def _method_runs(self) -> list[AlignConfig]:
        configs = []
        for method in parse_methods(self.methods):
            strengths = self.ratios if method == "la" else self.lams if method == "dera" else [None]
            for s in strengths:
                knob = {"lam": s} if method == "dera" else {"ratio": s} if s is not None else {}
                if method == "la" and self.extra_principles:
                    knob["weights"] = [1.0, *self.extra_weights]
                # Each task brings its own principles: the configuration takes them with each prompt.
                if method == "la":
                    knob["preset"] = self.preset
                configs.append(
                    AlignConfig(method=method, principles=None, plausibility_top_p=self.plausibility_top_p, **knob)
                )
        return configs

    def decode(self) -> DecodeConfig:
        if self.samples < 1:
            raise LinalignError(f"samples must be >= 1, got {self.samples}")
        if self.samples > 1 and self.temperature is None:
            raise LinalignError("several samples per question need --temperature: greedy replies are all the same")
        return decode_config(self.max_new_tokens, temperature=self.temperature, seed=self.seed)


def task_seed(seed: int | None, task_id: str) -> int | None:
    """A task's own sampling seed: the same whichever batch it lands in, on a first run or a resume."""
    return row_seed(seed, zlib.crc32(task_id.encode()))


def configs_la(settings: EvalSettings) -> AlignConfig:
    """Linear Alignment as the sweep runs it (the extra principles' weights, the mask; the principles come with
    each task)."""
    knob = {"weights": [1.0, *settings.extra_weights]} if settings.extra_principles else {}
    return AlignConfig(
        method="la", principles=None, plausibility_top_p=settings.plausibility_top_p, preset=settings.preset, **knob
    )


def read_records(path: Path) -> list[dict]:
    """Records written so far; a line cut short by an interruption is skipped (and its work redone)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def open_for_append(path: Path):
    """Append to a JSONL file, first cutting off a last line that an interruption left unfinished."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    return path.open("a")


def check_settings(
    path: Path, current: dict, defaults: dict, *, growable: Sequence[str] = (), target: str, remedy: str
) -> dict | None:
    """The settings stored at `path` (keys added since they were written count as their `defaults`), or None
    where there are none; results made with other settings are refused rather than mixed, except that the
    `growable` keys may differ (a sweep may grow)."""
    if not path.exists():
        return None
    previous = defaults | json.loads(path.read_text())
    changed = sorted(k for k in current.keys() | previous.keys() if current.get(k) != previous.get(k))
    changed = [k for k in changed if k not in growable]
    if changed:
        raise LinalignError(f"{target} holds results made with other settings ({', '.join(changed)} differ); {remedy}")
    return previous


def _guard_settings(out: Path, settings: EvalSettings) -> None:
    path = out / SETTINGS
    current = asdict(settings)
    previous = check_settings(
        path,
        current,
        asdict(EvalSettings(suite="", model="", methods=[], preset="paper")),
        growable=("methods", "ratios", "lams", "variants", "variant_ratios"),
        target=str(out),
        remedy="choose another --out directory",
    )
    if previous is not None:
        for key in ("methods", "ratios", "lams", "variant_ratios"):
            current[key] = sorted(set(previous[key]) | set(current[key]), key=str)
        current["variants"] = previous["variants"] + [v for v in current["variants"] if v not in previous["variants"]]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2) + "\n")


def _batches(items: Sequence[Task], size: int) -> Iterable[list[Task]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def run_eval(
    aligner: Aligner | None,
    tasks: Sequence[Task],
    settings: EvalSettings,
    out: Path,
    *,
    batch_size: int = 8,
    fluency: bool = True,
    reward_model: RewardModel | None = None,
    show_progress: bool = True,
    executor: EvalExecutor | None = None,
) -> list[dict]:
    """Generate and score every task under every run of `settings`; return all records (old and new).

    `executor` runs the batches (one `Unit` each) and yields each batch's records as it finishes; by default
    they run here, one after the other, on `aligner` (`linalign.distributed` runs them on Ray replicas)."""
    _guard_settings(out, settings)
    records_path = out / RECORDS
    records = read_records(records_path)
    done = {(r["run"], r["task"]) for r in records}
    runs = settings.runs()
    todo = [(align, t) for align in runs for t in tasks if (align.label, t.id) not in done]
    units = [(align, batch) for align in runs for batch in _batches([t for a, t in todo if a is align], batch_size)]
    settings.decode()  # refused here, before any work, if the decoding settings are bad
    if executor is None:
        executor = local_evaluator(aligner, settings, fluency, reward_model)
    progress = tqdm(total=len(todo), desc="evaluating", unit="reply", disable=not show_progress)
    with open_for_append(records_path) as sink:
        for batch_records in executor(units):
            for record in batch_records:
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                records.append(record)
            sink.flush()  # written as they are produced: an interruption loses at most the batches in flight
            progress.update(len(batch_records))
    progress.close()
    return records


Unit = tuple[AlignConfig, list[Task]]  # one batch of tasks under one run
EvalExecutor = Callable[[list[Unit]], Iterable[list[dict]]]


def local_evaluator(
    aligner: Aligner, settings: EvalSettings, fluency: bool, reward_model: RewardModel | None
) -> EvalExecutor:
    """Every batch on `aligner`, here, one after the other."""

    def execute(units: list[Unit]) -> Iterator[list[dict]]:
        config = settings.decode()
        for align, batch in {id(align): (align, batch) for align, batch in units}.values():
            aligner.prepare_batch(**_request(align, batch[:1], config, settings))  # the model's checks, up front
        for align, batch in units:
            yield _evaluate_batch(aligner, align, batch, config, settings, fluency, reward_model)

    return execute


def _request(align: AlignConfig, batch: list[Task], config: DecodeConfig, settings: EvalSettings) -> dict:
    """The arguments of `Aligner.generate` (and `prepare_batch`) for one batch under one run."""
    extras = settings.extra_principles if align.method == "la" else []
    return {
        "prompts": [t.prompt for t in batch],
        "align": align,
        "config": config,
        "system": settings.system,
        "principles": [[t.principle, *extras] for t in batch],
        "seeds": [task_seed(config.seed, t.id) for t in batch] if config.do_sample else None,
    }


def _evaluate_batch(
    aligner: Aligner,
    align: AlignConfig,
    batch: list[Task],
    config: DecodeConfig,
    settings: EvalSettings,
    fluency: bool,
    reward_model: RewardModel | None,
) -> list[dict]:
    generations = aligner.generate(**_request(align, batch, config, settings))
    ppl: list[float | None] = [None] * len(batch)
    if fluency:
        eos = set(aligner.tokenizer.all_special_ids)
        contexts = [build_ids(aligner.tokenizer, t.prompt, None, settings.system) for t in batch]
        outputs = [[i for i in g.token_ids if i not in eos] for g in generations]
        ppl = perplexities(aligner.main, contexts, outputs)
    rewards: list[float | None] = [None] * len(batch)
    if reward_model is not None:
        rewards = reward_model.score([t.question for t in batch], [g.text for g in generations])
    return [
        {
            "run": align.label,
            "method": align.method,
            **{k: v for k, v in align.strength.items()},
            **align.quality_options,
            "task": t.id,
            "group": t.group,
            **g.to_dict(("text", "new_tokens", "finish_reason")),
            "score": t.score(g.text),
            "perplexity": p,
            "distinct2": distinct_n(g.text, 2),
            "repeat4": repeated_ngram_rate(g.text, 4),
            "reward": r,
        }
        for t, g, p, r in zip(batch, generations, ppl, rewards, strict=True)
    ]


JUDGMENTS = "judgments.jsonl"


def judge_runs(
    records: list[dict], tasks: Sequence[Task], first: str, second: str, complete, out: Path, batch_size: int = 8
) -> dict:
    """Win rate of run `first` over run `second` by a judge, over the tasks both have; resumable."""
    from linalign.evaluation.judges import judge_pairs

    texts = {(r["run"], r["task"]): r["text"] for r in records}
    missing = [label for label in (first, second) if not any(r["run"] == label for r in records)]
    if missing:
        known = sorted({r["run"] for r in records})
        raise LinalignError(f"no results for run(s) {missing} to judge; runs present: {known}")
    path = out / JUDGMENTS
    pair = f"{first} vs {second}"
    judged = [j for j in read_records(path) if j["pair"] == pair]
    done = {j["task"] for j in judged}
    todo = [t for t in tasks if (first, t.id) in texts and (second, t.id) in texts and t.id not in done]
    with open_for_append(path) as sink:
        for batch in tqdm(list(_batches(todo, batch_size)), desc=f"judging {pair}", unit="batch"):
            verdicts = judge_pairs(
                complete,
                [t.principle for t in batch],
                [t.question for t in batch],
                [texts[first, t.id] for t in batch],
                [texts[second, t.id] for t in batch],
            )
            for t, v in zip(batch, verdicts, strict=True):
                record = {"pair": pair, "task": t.id, "outcome": v.outcome, "verdicts": list(v.verdicts)}
                sink.write(json.dumps(record) + "\n")
                judged.append(record)
            sink.flush()
    counts = {k: sum(j["outcome"] == k for j in judged) for k in ("win", "loss", "tie")}
    total = sum(counts.values())
    return {**counts, "win_rate": (counts["win"] + counts["tie"] / 2) / total if total else None}
