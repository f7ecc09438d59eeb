"""Dataset-scale generation: a JSONL file of prompts in, one answer record per (prompt, method) out.

`linalign generate --input prompts.jsonl --output answers.jsonl`. Each input line is a JSON object with

- `prompt` (a question, taken as it is) or `messages` (a conversation, `[{"role", "content"}, ...]`);
- `id` (a string or an integer, unique in the file; default: the line number);
- optionally `principle` (one text) or `principles` (several), `weights`, `ratio`, `method`, `max_tokens` and
  `seed`, which replace the job's own options for this record (a record with its own principles takes its own
  `weights` or none);
- anything else, passed through to the output.

Each output line is the input record followed by `run`, `method`, the strength (`ratio`, `lam`, ...), the
quality options set, `text`, `new_tokens`, `prompt_tokens` and `finish_reason`: the fields of `eval`'s
generations where they mean the same. One record per method of the job (`--method`), or of the record.

Records are written as their batch finishes. A rerun skips every (id, method) already written, cuts off a last
line an interruption left unfinished, and refuses an output that another job wrote: the job's settings are kept
beside the output (`OUTPUT.job.json`) and compared, as `eval` does with its directory. A malformed input line is
reported with its line number and skipped; the job goes on.

The work is planned once, whatever runs it: records are grouped by what one `Aligner.generate` call shares (the
method, its strength and options, the token budget) and cut into batches of `batch_size` in input order. The
local executor runs the batches one after the other; the Ray executor (`linalign.distributed`) runs the same
batches on its replicas, so both write the same records batch for batch, in another order.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from linalign.config import AlignConfig, DecodeConfig
from linalign.errors import LinalignError
from linalign.evaluation.runner import check_settings, open_for_append, read_records, task_seed
from linalign.generation import Generation
from linalign.params import for_method
from linalign.prompts import to_conversation
from linalign.resolve import parse_methods

Item = dict[str, Any]  # {"line", "id", "method", "record"}: one record under one method, JSON all through
Batch = list[Item]
Result = dict[str, list]  # {"records": [...], "errors": [{"line", "error"}]}: what one batch gave
Executor = Callable[[list[Batch]], Iterable[Result]]


@dataclass
class JobSettings:
    """Everything that decides what an output record means; stored beside the output to guard resumes."""

    input: str
    model: str = "smollm2"
    ref_model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    compile: bool = False
    methods: list[str] = field(default_factory=lambda: ["la"])
    principles: list[str] = field(default_factory=list)  # for records that bring none
    knobs: dict = field(default_factory=dict)  # AlignConfig's knobs, each given to the methods that read it
    decode: dict = field(default_factory=dict)  # DecodeConfig fields
    system: str | None = None
    raw: bool = False

    def __post_init__(self) -> None:
        self.methods = parse_methods(self.methods)
        self.knobs = {k: v for k, v in self.knobs.items() if v is not None}  # unset: AlignConfig's default
        self.decode = asdict(DecodeConfig(**self.decode))  # checked, every field spelled out
        if any(m == "dera" for m in self.methods) and self.ref_model is None:
            raise LinalignError("method 'dera' needs --ref-model")

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(**self.decode)


@dataclass
class Resolved:
    """What one record asks for under one method, checked."""

    prompt: str | list[dict]
    align: AlignConfig
    config: DecodeConfig
    seed: int | None

    @property
    def batch_key(self) -> str:
        """What the records of one `Aligner.generate` call share: everything but the principles and the seed."""
        align = {k: v for k, v in asdict(self.align).items() if k != "principles"}
        return json.dumps([align, self.config.max_new_tokens], sort_keys=True)


def _typed(record: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LinalignError(f"{key!r} must be {what}, got {json.dumps(value)[:60]}")
    return value


def resolve(settings: JobSettings, record: dict, method: str, record_id: str | int) -> Resolved:
    """The prompt, alignment, decoding settings and seed of `record` under `method`; raises on bad values."""
    if ("prompt" in record) == ("messages" in record):
        raise LinalignError(f"needs a 'prompt' or a 'messages' key, exactly one (keys present: {sorted(record)})")
    if "prompt" in record:
        prompt = _typed(record, "prompt", str, "a string")
        if not prompt.strip():
            raise LinalignError("'prompt' is empty")
    else:
        prompt = to_conversation(_typed(record, "messages", list, "a list of {role, content} messages"))
    knobs = for_method(method, settings.knobs)  # the job's knobs that this method reads; the record's own as given
    principles = settings.principles
    if "principle" in record and "principles" in record:
        raise LinalignError("give 'principle' or 'principles', not both")
    if "principle" in record:
        principles = [_typed(record, "principle", str, "a string")]
    elif "principles" in record:
        principles = _typed(record, "principles", list, "a list of strings")
    if "principle" in record or "principles" in record:
        knobs.pop("weights", None)  # the job's weights go with the job's principles
    if "weights" in record:
        knobs["weights"] = _typed(record, "weights", list, "a list of numbers")
    if "ratio" in record:
        knobs["ratio"] = _typed(record, "ratio", (int, float), "a number")
    align = AlignConfig(method=method, principles=list(principles), **knobs)
    config = settings.decode_config()
    if "max_tokens" in record:
        config = replace(config, max_new_tokens=_typed(record, "max_tokens", int, "an integer"))
    seed = task_seed(config.seed, str(record_id))  # the same whichever batch the record lands in
    if "seed" in record:
        seed = replace(config, seed=_typed(record, "seed", int, "an integer")).seed
    return Resolved(prompt, align, config, seed if config.do_sample else None)


def _record_id(record: dict, line: int) -> str | int:
    if "id" not in record:
        return line
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise LinalignError(f"'id' must be a non-empty string or an integer, got {json.dumps(value)[:60]}")
    return value


def read_input(path: Path, settings: JobSettings) -> tuple[list[Item], list[str]]:
    """Every (record, method) of the input file in order, and one message per malformed line."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise LinalignError(f"input file {str(path)!r} does not exist") from None
    except OSError as err:
        raise LinalignError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    items: list[Item] = []
    problems: list[str] = []
    first_line: dict[str | int, int] = {}
    with handle:
        for line, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise LinalignError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
                except json.JSONDecodeError as err:
                    raise LinalignError(f"bad JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise LinalignError(f"expected a JSON object, got {type(record).__name__}")
                record_id = _record_id(record, line)
                if record_id in first_line:
                    raise LinalignError(f"duplicate id {json.dumps(record_id)} (first on line {first_line[record_id]})")
                methods = settings.methods
                if "method" in record:
                    methods = parse_methods([_typed(record, "method", str, "a method name")])
                    if methods[0] == "dera" and settings.ref_model is None:
                        raise LinalignError("method 'dera' needs --ref-model")
                for method in methods:
                    resolve(settings, record, method, record_id)
            except (LinalignError, TypeError, ValueError) as err:
                problems.append(f"{path} line {line}: {err}")
                continue
            first_line[record_id] = line
            items += [{"line": line, "id": record_id, "method": m, "record": record} for m in methods]
    return items, problems


def plan(settings: JobSettings, items: list[Item], batch_size: int) -> list[Batch]:
    """Items cut into batches of at most `batch_size` that share one `generate` call, in input order: a batch
    is emitted when it is full, the partial ones at the end in the order their first item came."""
    if batch_size < 1:
        raise LinalignError(f"batch size must be >= 1, got {batch_size}")
    open_batches: dict[str, Batch] = {}
    batches: list[Batch] = []
    for item in items:
        key = resolve(settings, item["record"], item["method"], item["id"]).batch_key
        batch = open_batches.setdefault(key, [])
        batch.append(item)
        if len(batch) == batch_size:
            batches.append(batch)
            open_batches[key] = []
    return batches + [b for b in open_batches.values() if b]


def output_record(item: Item, align: AlignConfig, generation: Generation) -> dict:
    """The input record (its id first), then what the job made of it under `align`."""
    record = {"id": item["id"], **{k: v for k, v in item["record"].items() if k != "id"}}
    record.update(run=align.label, method=align.method, **align.strength, **align.quality_options)
    record.update(generation.to_dict(("text", "new_tokens", "prompt_tokens", "finish_reason")))
    return record


def run_batch(aligner, settings: JobSettings, batch: Batch) -> Result:
    """One planned batch through one `generate` call; a record the model refuses (a prompt beyond its
    context, say) becomes an error of its line and the others go on."""
    ready, errors = [], []
    for item in batch:
        try:
            r = resolve(settings, item["record"], item["method"], item["id"])
            aligner.prepare(r.prompt, r.align, r.config, system=settings.system, raw=settings.raw, seed=r.seed)
        except LinalignError as err:
            errors.append({"line": item["line"], "error": str(err)})
            continue
        ready.append((item, r))
    records = []
    if ready:
        first = ready[0][1]
        generations = aligner.generate(
            [r.prompt for _, r in ready],
            first.align,
            first.config,
            system=settings.system,
            raw=settings.raw,
            principles=[r.align.principles for _, r in ready],
            seeds=[r.seed for _, r in ready],
        )
        records = [output_record(i, r.align, g) for (i, r), g in zip(ready, generations, strict=True)]
    return {"records": records, "errors": errors}


def load_aligner(settings: JobSettings, threads: int | None = None):
    """The job's model(s); `threads` caps the threads decoding uses (one Ray replica's CPUs)."""
    return capped_aligner(
        threads,
        model=settings.model,
        reference=settings.ref_model,
        dtype=settings.dtype,
        device=settings.device,
        backend=settings.backend,
        compile=settings.compile,
    )


def capped_aligner(threads: int | None, **options):
    """`Aligner(**options)` decoding on at most `threads` threads (torch's and llama.cpp's); None: all cores."""
    from linalign.engine import Aligner

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    aligner = Aligner(**options)
    if threads is not None:
        for loaded in (aligner.main, aligner.reference):
            if loaded is not None and loaded.runner is not None:
                loaded.runner.threads = threads  # read when a context opens, i.e. at every batch
    return aligner


def local_executor(
    settings: JobSettings, status: Callable[[str], None] = lambda _: None, threads: int | None = None
) -> Executor:
    """Every batch in this process, one after the other; the model loads only if there is work."""

    def execute(batches: list[Batch]) -> Iterator[Result]:
        if not batches:
            return
        status(f"loading {settings.model}")
        aligner = load_aligner(settings, threads=threads)
        status("")
        for batch in batches:
            yield run_batch(aligner, settings, batch)

    return execute


def job_file(output: Path) -> Path:
    """Where the settings of the job that writes `output` are kept."""
    return output.with_name(output.name + ".job.json")


def _flat(settings: JobSettings) -> dict:
    """The settings with their nested options spelled out ("decode.max_new_tokens"), so a refusal names them."""
    flat: dict = {}
    for key, value in asdict(settings).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def guard_output(output: Path, settings: JobSettings) -> dict:
    """Refuse an output that another job wrote; return the settings to keep beside it once this job writes
    (a job may add methods). Nothing is written here: a job that fails to start claims no output."""
    current = _flat(settings)
    remedy = "choose another --output (or delete both files to start over)"
    previous = check_settings(
        job_file(output),
        current,
        _flat(JobSettings(input="")),
        growable=("methods",),
        target=str(output),
        remedy=remedy,
    )
    if previous is None and output.exists() and output.stat().st_size > 0:
        raise LinalignError(
            f"{output} already holds lines this job did not write (no {job_file(output).name}); {remedy}"
        )
    if previous is not None:
        current["methods"] = previous["methods"] + [m for m in current["methods"] if m not in previous["methods"]]
    return current


@dataclass
class JobReport:
    written: int = 0  # records written by this run
    already: int = 0  # (id, method) pairs found done in the output
    malformed: int = 0  # input lines skipped before any work
    failed: int = 0  # records the model refused (their lines are reported)


def run_job(
    settings: JobSettings,
    output: Path,
    executor: Executor,
    *,
    batch_size: int = 8,
    report: Callable[[str], None] = print,
    show_progress: bool = True,
) -> JobReport:
    """Plan the job, run it with `executor` and append its records to `output` as batches finish."""
    if batch_size < 1:
        raise LinalignError(f"batch size must be >= 1, got {batch_size}")
    input_path = Path(settings.input)
    if not input_path.is_file():
        raise LinalignError(f"input file {str(input_path)!r} does not exist")
    if output.resolve() == input_path.resolve():
        raise LinalignError("--output must not be the input file")
    claim = guard_output(output, settings)
    items, problems = read_input(input_path, settings)
    for problem in problems:
        report(problem)
    done = {(r.get("id"), r.get("method")) for r in read_records(output)}
    todo = [i for i in items if (i["id"], i["method"]) not in done]
    summary = JobReport(already=len(items) - len(todo), malformed=len(problems))
    progress = tqdm(total=len(todo), desc="generating", unit="record", disable=not show_progress or not todo)
    results = iter(executor(plan(settings, todo, batch_size)))
    first = next(results, None)  # the replicas are up and the first batch is done: the output is this job's
    if first is None:
        progress.close()
        return summary
    output.parent.mkdir(parents=True, exist_ok=True)
    job_file(output).write_text(json.dumps(claim, indent=2) + "\n")
    with open_for_append(output) as sink:
        for result in itertools.chain([first], results):
            for record in result["records"]:
                key = (record["id"], record["method"])
                if key in done:  # a batch run twice (a retried task) is written once
                    continue
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                done.add(key)
                summary.written += 1
            sink.flush()  # an interruption loses at most the batches in flight
            for error in result["errors"]:
                report(f"{input_path} line {error['line']}: {error['error']}")
            summary.failed += len(result["errors"])
            progress.update(len(result["records"]) + len(result["errors"]))
    progress.close()
    return summary


def generate_job(
    settings: JobSettings,
    output: Path | None,
    *,
    batch_size: int = 8,
    ray: bool = False,
    ray_address: str | None = None,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float = 0.0,
) -> JobReport:
    """`linalign generate --input ... --output ...`, locally or on Ray; prints what it did to stderr."""
    import sys

    from rich.markup import escape

    from linalign.options import err_console

    def note(text: str) -> None:
        if text:
            tqdm.write(text, file=sys.stderr)

    if output is None:
        raise LinalignError("a batch job (--input) needs --output FILE for its answers")
    if (ray or ray_address) or (replicas, cpus_per_replica, gpus_per_replica) != (1, 1.0, 0.0):
        from linalign.distributed import RayPlacement, ray_executor

        placement = RayPlacement(ray_address, replicas, cpus_per_replica, gpus_per_replica)
        if not (ray or ray_address):
            raise LinalignError("--replicas and --cpus/--gpus-per-replica place Ray replicas: add --ray")
        executor = ray_executor(settings, placement, status=note)
    else:
        executor = local_executor(settings, status=note)
    summary = run_job(
        settings,
        output,
        executor,
        batch_size=batch_size,
        report=lambda text: err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True),
    )
    parts = [f"{summary.written} records written to {output}"]
    if summary.already:
        parts.append(f"{summary.already} were there already")
    if summary.malformed:
        parts.append(f"{summary.malformed} malformed input lines skipped")
    if summary.failed:
        parts.append(f"{summary.failed} records refused by the model")
    err_console.print("; ".join(parts), highlight=False, soft_wrap=True)
    return summary
