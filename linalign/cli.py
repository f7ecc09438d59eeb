"""The `linalign` command line: generate, and the commands of evaluation, benchmarking and serving."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from linalign.errors import LinalignError
from linalign.kernels import describe
from linalign.options import (
    RAY_TAKES_NO_ADDRESS,
    BackendOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    MaskOpt,
    MaxNewOpt,
    ModelOpt,
    OneLineErrors,
    PresetOpt,
    PrincipleOpt,
    RatioOpt,
    RawOpt,
    RefModelOpt,
    SystemOpt,
    TemperatureOpt,
    exits_cleanly,
    knob_options,
)
from linalign.params import ALIGN, DECODE, KNOBS, METHOD, check, parse_options
from linalign.prompts import Conversation, parse_conversations
from linalign.resolve import align_configs, decode_config, parse_methods
from linalign.serve.bench import serve_bench
from linalign.serve.cli import serve
from linalign.serve.playground import playground

if TYPE_CHECKING:
    from linalign.config import AlignConfig
    from linalign.generation import Generation

app = typer.Typer(
    cls=OneLineErrors, help="Align a language model with a principle at decoding time.", no_args_is_help=True
)


def _show_side_by_side(console: Console, prompts: list[str], results: dict[str, list]) -> None:
    for i, prompt in enumerate(prompts):
        table = Table(title=prompt if len(prompt) < 200 else prompt[:197] + "...", show_lines=True, expand=True)
        for label in results:
            table.add_column(label, overflow="fold")
        table.add_row(*(results[label][i].text for label in results))
        table.add_row(*(f"{g.new_tokens} tokens, {g.seconds:.1f}s" for g in (results[lb][i] for lb in results)))
        console.print(table)


def _read_prompts(prompts: list[str], messages: str | None) -> list[str | Conversation]:
    """Questions from the arguments (or stdin lines for '-'), or conversations from `--messages`."""
    if messages is not None:
        if prompts:
            raise LinalignError("give questions or --messages, not both")
        if messages == "-":
            return parse_conversations(sys.stdin, "stdin")
        path = Path(messages)
        if not path.is_file():
            raise LinalignError(f"--messages file {messages!r} does not exist")
        return parse_conversations(path.read_text().splitlines(), messages)
    if prompts == ["-"]:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise LinalignError("give at least one question ('-' reads them from stdin) or --messages FILE")
    return list(prompts)


@app.command()
@exits_cleanly
@knob_options([k for k in (*ALIGN, *DECODE) if k.cli])
def generate(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Questions, taken as they are; '-' reads one per line of stdin.")
    ] = None,
    messages: Annotated[
        str | None,
        typer.Option(help="JSON lines of conversations ([{role, content}, ...] per line); '-' reads stdin."),
    ] = None,
    principle: PrincipleOpt = None,
    method: Annotated[
        str, typer.Option("--method", "--methods", help="Comma-separated: base,prompt,la,dera,amulet.")
    ] = "prompt,la",
    model: ModelOpt = "smollm2",
    ref_model: RefModelOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    backend: BackendOpt = "auto",
    compile: CompileOpt = False,
    system: SystemOpt = None,
    raw: RawOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of tables.")] = False,
    input_path: Annotated[
        Path | None, typer.Option("--input", help="A batch job: JSONL records (prompt or messages, id, ...).")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="The batch job's JSONL answers; a rerun resumes it.")] = None,
    batch_size: Annotated[int, typer.Option(help="Records decoded together in a batch job.")] = 8,
    ray: Annotated[bool, typer.Option("--ray", help="Run the batch job on a local Ray cluster (127.0.0.1).")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Run the batch job on this Ray cluster (HOST:PORT).")] = None,
    replicas: Annotated[int, typer.Option(help="Ray replicas, each with its own model.")] = 1,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs a Ray replica reserves (its threads).")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs a Ray replica reserves.")] = 0.0,
    *,
    knobs: dict,
) -> None:
    """Generate with each method, side by side, for every prompt (one batch per method); with --input, a
    resumable batch job over a JSONL file, on this machine or on Ray replicas (docs/scaling.md)."""
    from linalign.engine import Aligner

    methods = parse_methods(method)
    config = decode_config(**{k.name: knobs[k.name] for k in DECODE if k.cli})
    if input_path is not None:
        from linalign.jobs import JobSettings, generate_job

        if prompts or messages is not None:
            hint = f" ({RAY_TAKES_NO_ADDRESS})" if ray and prompts else ""  # `--ray HOST:PORT` read as a question
            raise LinalignError("give questions, --messages or --input, one of them" + hint)
        settings = JobSettings(
            input=str(input_path.resolve()),
            model=model,
            ref_model=ref_model,
            dtype=dtype,
            device=device,
            backend=backend,
            compile=compile,
            methods=methods,
            principles=list(principle or []),
            knobs={k.name: knobs[k.name] for k in ALIGN},
            decode=vars(config),
            system=system,
            raw=raw,
        )
        generate_job(
            settings,
            output,
            batch_size=batch_size,
            ray=ray,
            ray_address=ray_address,
            replicas=replicas,
            cpus_per_replica=cpus_per_replica,
            gpus_per_replica=gpus_per_replica,
        )
        return
    if output is not None or ray or ray_address is not None:
        raise LinalignError("--output and --ray belong to a batch job: give its records with --input FILE")
    inputs = _read_prompts(prompts or [], messages)
    aligns = align_configs(methods, principle, {k.name: knobs[k.name] for k in ALIGN})
    console = Console(stderr=as_json)
    if not config.do_sample and any(knobs.get(k) not in (None, KNOBS[k].default) for k in ("top_p", "top_k", "seed")):
        console.print("note: --top-p, --top-k and --seed shape sampling only; without --temperature decoding is greedy")
    with console.status(f"loading {model}", spinner="dots"):
        aligner = Aligner(model, reference=ref_model, dtype=dtype, device=device, backend=backend, compile=compile)
    for align in aligns:  # the model's own checks (DeRa's reference, the context) before any decoding
        aligner.prepare_batch(inputs, align, config, system=system, raw=raw)
    results = {}
    for align in aligns:
        label = align.label
        with console.status(f"decoding {label}", spinner="dots"):
            results[label] = aligner.generate(inputs, align, config, system=system, raw=raw)
        if as_json:
            for g in results[label]:
                print(json.dumps(record(g, align), ensure_ascii=False), flush=True)
    if not as_json:
        _show_side_by_side(console, [_title(p) for p in inputs], results)


def record(generation: Generation, align: AlignConfig) -> dict:
    """A generation's JSON record, with the weight of each principle (1 unless given) for every method that
    reads principles, so that it states what was decoded: only positively weighted principles are told to the
    model (`linalign.methods.told_principle`)."""
    out = generation.to_dict()
    if align.method != "base" and align.principles:
        out.setdefault("weights", list(align.weights or [1.0] * len(align.principles)))
    return out


def _variants(kl_budgets: str | None, repeat_guards: str | None, masks: str | None, variant: list[str]) -> list[dict]:
    """Quality-option variants for the eval sweep: one per listed value, and one per --variant, given as
    'kl_budget=1,repeat_guard=3,mask=min_p,plausibility_min_p=0.05' (`linalign.params.parse_options`)."""
    variants = [{"kl_budget": x} for x in _floats(kl_budgets or "", "--kl-budgets")]
    variants += [{"repeat_guard": int(x)} for x in _floats(repeat_guards or "", "--repeat-guards")]
    for m in (masks or "").split(","):
        if m.strip():
            kind, _, threshold = m.strip().partition(":")
            variants.append({"mask": kind} | ({"plausibility_min_p": float(threshold)} if threshold else {}))
    return variants + [_variant(text) for text in variant]


def _variant(text: str) -> dict:
    """'dry_multiplier=2' (Linear Alignment's) or 'prompt:principle_placement=user' (another method's)."""
    method, colon, options = text.partition(":") if ":" in text.partition("=")[0] else ("la", "", text)
    check(METHOD, method.strip())
    return parse_options(options, method=method.strip()) | ({"method": method.strip()} if colon else {})


def _title(prompt: str | Conversation) -> str:
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


@app.command()
@exits_cleanly
def bench(
    model: ModelOpt = "smollm2",
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes; repeatable.")] = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens forced per sequence.")] = 128,
    ratio: RatioOpt = 2.0,
    repeats: Annotated[int, typer.Option(help="Runs per method; the best counts.")] = 2,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("runs/bench.json"),
    compile: CompileOpt = False,
    random_init: Annotated[
        str | None, typer.Option(help="Measure a shipped config's shape (llama-3.2-1b, ...) with random weights.")
    ] = None,
    options: Annotated[
        str | None,
        typer.Option(help="Quality options priced as extra rows, e.g. 'repeat_guard=4' or 'mask=min_p,kl_budget=1'."),
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="Rows to measure, comma-separated (generate always runs: the floor).")
    ] = None,
) -> None:
    """Tokens/s and peak memory of Linear Alignment vs plain generate, HF CFG and two separate passes."""
    from linalign.bench import run_benchmark, write_report
    from linalign.config import AlignConfig

    extra = parse_options(options) if options else None
    if extra is not None:
        AlignConfig(method="la", principles=None, **extra)  # bad values are refused before anything loads

    console = Console()
    with console.status("benchmarking", spinner="dots") as status:
        report = run_benchmark(
            model,
            tuple(batch or (1, 8)),
            new_tokens,
            ratio,
            repeats,
            device,
            dtype,
            progress=status.update,
            compile=compile,
            random_init=random_init,
            methods=tuple(m.strip() for m in methods.split(",")) if methods else None,
            options=extra,
        )
    write_report(report, out)
    table = Table(
        title=f"{report['model']} on {report['device']} ({report['threads']} threads), "
        f"greedy, {new_tokens} new tokens, ratio {ratio}"
    )
    for column in ("method", "batch", "tokens/s", "× generate", "peak MB", "× generate mem", "extra MB"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for r in report["results"]:
        table.add_row(
            r["method"],
            str(r["batch"]),
            f"{r['tokens_per_s']:.1f}",
            f"{r['speed_vs_generate']:.2f}",
            f"{r['peak_mb']:.0f}",
            f"{r['memory_vs_generate']:.2f}",
            f"{r['extra_mb']:.0f}",
        )
    console.print(table)
    if report["compile_seconds"]:
        console.print(f"first run of each compiled method (compilation included), s: {report['compile_seconds']}")
    if report["llamacpp_step_ms"]:
        one, two = report["llamacpp_step_ms"][1], report["llamacpp_step_ms"][2]
        console.print(
            f"llama.cpp decode step: 1 row {one:.1f} ms, 2 rows {two:.1f} ms: on these weights Linear Alignment "
            f"(2 rows a sequence) can reach at most {one / two:.2f}x llama.cpp's plain decoding at batch 1"
        )
    for backend, rows in report["invariance"].items():
        for row in rows:
            prefill, decode = (
                row[f"{k}_tokens_per_s_invariant"] / row[f"{k}_tokens_per_s_stock"] for k in ("prefill", "decode")
            )
            console.print(
                f"batch invariance on {backend}, batch {row['batch']}: prefill "
                f"{row['prefill_tokens_per_s_invariant']:.0f} vs {row['prefill_tokens_per_s_stock']:.0f} tokens/s "
                f"stock ({prefill:.2f}x), decode "
                f"{row['decode_tokens_per_s_invariant']:.1f} vs {row['decode_tokens_per_s_stock']:.1f} ({decode:.2f}x)",
                soft_wrap=True,
            )
    console.print(f"model load: {report['model_load_seconds']} s; report written to {out}", soft_wrap=True)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LinalignError(f"{name} must be comma-separated numbers, got {text!r}") from None


@app.command("eval")
@exits_cleanly
def evaluate(
    suite: Annotated[
        str, typer.Option(help="principles, principles-heldout, persona, files or structured.")
    ] = "principles",
    methods: Annotated[
        str, typer.Option("--methods", "--method", help="Comma-separated methods to compare.")
    ] = "base,prompt,la",
    ratios: Annotated[str, typer.Option("--ratios", "--ratio", help="Ratios swept for la, comma-separated.")] = "2",
    lams: Annotated[
        str, typer.Option("--lams", "--lam", help="λ values swept for dera, comma-separated.")
    ] = "0,0.5,1,1.5",
    model: ModelOpt = "smollm2",
    ref_model: RefModelOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    backend: BackendOpt = "auto",
    max_new_tokens: MaxNewOpt = 64,
    plausibility_top_p: MaskOpt = 0.8,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 8,
    limit: Annotated[
        int | None,
        typer.Option(help="Questions (principles), items (persona, files) or tasks per format (structured) used."),
    ] = None,
    only: Annotated[str | None, typer.Option(help="Principle ids to keep, comma-separated.")] = None,
    file: Annotated[str | None, typer.Option(help="Data file: persona rows, or questions for 'files'.")] = None,
    principle: Annotated[str | None, typer.Option("--principle", "-p", help="Principle for 'files'.")] = None,
    extra_principle: Annotated[
        list[str] | None, typer.Option(help="Principle added to every task's in 'la'; repeatable.")
    ] = None,
    extra_weight: Annotated[list[float] | None, typer.Option(help="Weight of each --extra-principle.")] = None,
    system: SystemOpt = None,
    temperature: TemperatureOpt = None,
    seed: Annotated[
        int | None, typer.Option(help="Sampling seed; each task's own is derived from it and the task's id.")
    ] = None,
    samples: Annotated[int, typer.Option(help="Replies per question (with --temperature).")] = 1,
    preset: PresetOpt = KNOBS["preset"].default,
    fluency: Annotated[bool, typer.Option(help="Perplexity of each reply under the plain model.")] = True,
    judge: Annotated[str | None, typer.Option(help="Local judge model (id, directory or .gguf).")] = None,
    judge_base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible judge endpoint.")] = None,
    judge_model: Annotated[str, typer.Option(help="Model name sent to the judge endpoint.")] = "gpt-4o-mini",
    judge_api_key_env: Annotated[str, typer.Option(help="Environment variable holding its key.")] = "OPENAI_API_KEY",
    against: Annotated[str, typer.Option(help="Run every other run is judged against.")] = "prompt",
    reward_model: Annotated[str | None, typer.Option(help="Sequence-classification reward model.")] = None,
    out: Annotated[Path | None, typer.Option(help="Results directory (default runs/eval-SUITE).")] = None,
    kl_budgets: Annotated[str | None, typer.Option(help="Trust-region budgets swept as la variants.")] = None,
    repeat_guards: Annotated[str | None, typer.Option(help="Repeat-guard n-gram sizes swept as la variants.")] = None,
    masks: Annotated[str | None, typer.Option(help="Mask kinds swept as la variants: min_p[:T],intersect.")] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="A combined la variant, e.g. 'kl_budget=1,repeat_guard=3', or another method's, "
            "'prompt:principle_placement=user'; repeatable."
        ),
    ] = None,
    variant_ratios: Annotated[
        str | None, typer.Option(help="Ratios the variants run at (default: --ratios), comma-separated.")
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Generate and score on a local Ray cluster.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Generate and score on the Ray cluster at HOST:PORT.")] = None,
    replicas: Annotated[int, typer.Option(help="Ray replicas, each with its own model.")] = 1,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs a Ray replica reserves (its threads).")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs a Ray replica reserves.")] = 0.0,
) -> None:
    """Evaluate methods and ratios on a suite; results stream to JSONL and a rerun resumes."""
    from linalign.engine import Aligner
    from linalign.evaluation.judges import RewardModel, endpoint_judge, local_judge
    from linalign.evaluation.report import PLOT, REPORT, write_reports
    from linalign.evaluation.runner import EvalSettings, judge_runs, run_eval
    from linalign.evaluation.suites import build_tasks, sampled

    if batch_size < 1:
        raise LinalignError(f"batch_size must be >= 1, got {batch_size}")
    settings = EvalSettings(
        suite=suite,
        model=model,
        methods=parse_methods(methods),
        ratios=_floats(ratios, "--ratios"),
        lams=_floats(lams, "--lams"),
        max_new_tokens=max_new_tokens,
        plausibility_top_p=plausibility_top_p,
        system=system,
        seed=seed,
        temperature=temperature,
        extra_principles=list(extra_principle or []),
        extra_weights=list(extra_weight or []),
        variants=_variants(kl_budgets, repeat_guards, masks, list(variant or [])),
        variant_ratios=_floats(variant_ratios or "", "--variant-ratios"),
        samples=samples,
        preset=preset,
    )
    if len(settings.extra_weights) != len(settings.extra_principles):
        raise LinalignError("give one --extra-weight for each --extra-principle")
    runs = settings.runs()  # validates methods and strengths before anything loads
    settings.decode()
    tasks = build_tasks(
        suite, file=file, principle=principle, limit=limit, only=[x.strip() for x in only.split(",")] if only else None
    )
    tasks = sampled(tasks, samples)
    out = out or Path("runs") / f"eval-{suite}"
    console = Console()
    aligner, scorer, executor = None, None, None
    if ray or ray_address is not None:  # generation and scoring on Ray replicas (docs/scaling.md)
        from linalign.distributed import RayPlacement, expected_kernel, ray_evaluator

        settings.kernel = expected_kernel(model, backend, device, dtype)
        placement = RayPlacement(ray_address, replicas, cpus_per_replica, gpus_per_replica)
        options = {"model": model, "reference": ref_model, "dtype": dtype, "device": device, "backend": backend}
        executor = ray_evaluator(placement, options, reward_model, settings, fluency)
    elif (replicas, cpus_per_replica, gpus_per_replica) != (1, 1.0, 0.0):
        raise LinalignError("--replicas and --cpus/--gpus-per-replica place Ray replicas: add --ray")
    else:
        with console.status(f"loading {model}", spinner="dots"):
            aligner = Aligner(model, reference=ref_model, dtype=dtype, device=device, backend=backend)
            if aligner.main.backend == "llamacpp":
                settings.kernel = "llamacpp"
            else:
                weight = next(aligner.main.model.parameters())
                settings.kernel = describe(weight.device, weight.dtype)
            scorer = RewardModel(reward_model, device=device) if reward_model else None
    console.print(f"{len(tasks)} tasks x {len(runs)} runs -> {out}", soft_wrap=True)
    records = run_eval(
        aligner, tasks, settings, out, batch_size=batch_size, fluency=fluency, reward_model=scorer, executor=executor
    )
    judgments = {}
    if judge or judge_base_url:
        complete = (
            endpoint_judge(judge_base_url, judge_model, judge_api_key_env)
            if judge_base_url
            else (local_judge(judge, device=device, dtype=dtype))
        )
        for run in (r.label for r in runs):
            if run != against:
                judgments[f"{run} vs {against}"] = judge_runs(records, tasks, run, against, complete, out, batch_size)
    summary = write_reports(out, records, f"linalign eval: {suite} suite, {model}", judgments)
    table = Table(title=f"{suite} suite ({model})")
    for column in ("run", "n", "score", "median ppl", "tokens", "distinct-2", "rep-4"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for label, r in summary["runs"].items():
        cells = (r["score"], r["perplexity_median"], r["new_tokens_mean"], r["distinct2_mean"], r["repeat4_mean"])
        table.add_row(label, str(r["n"]), *("–" if v is None else f"{v:.3g}" for v in cells))
    console.print(table)
    for pair, j in judgments.items():
        console.print(f"judge {pair}: win rate {j['win_rate']}, {j['win']}/{j['loss']}/{j['tie']} win/loss/tie")
    plot = f", plot: {out / PLOT}" if (out / PLOT).exists() else " (a plot needs two or more ratios or lams)"
    if (out / "pareto.png").exists():
        plot += f", Pareto view: {out / 'pareto.png'}"
    console.print(f"report: {out / REPORT}{plot}", soft_wrap=True)  # paths unwrapped, to copy whole


app.command()(serve)
app.command()(playground)
app.command("serve-bench")(serve_bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
