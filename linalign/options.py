"""Command-line options and error handling shared by every `linalign` command."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer ships its own copy of click from 0.2x on
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer, on click itself
    from click import exceptions as click_errors

from linalign.errors import LinalignError

err_console = Console(stderr=True)

# Options shared by every command that loads a model or decodes.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hugging Face id, local directory or .gguf file.")]
RefModelOpt = Annotated[str | None, typer.Option("--ref-model", help="DeRa's reference model (same vocabulary).")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")]
BackendOpt = Annotated[
    str, typer.Option(help="auto (llama.cpp for .gguf files when installed), transformers or llamacpp.")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto (device_map='auto').")]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="A static KV cache and a torch.compile'd decode step (CUDA graphs on CUDA); models it cannot handle "
        "are refused before decoding.",
    ),
]
PrincipleOpt = Annotated[
    list[str] | None, typer.Option("--principle", "-p", help="The preference to follow; repeat for several.")
]
WeightOpt = Annotated[
    list[float] | None,
    typer.Option("--weight", help="One weight per --principle, scaling the ratio: c = w (1 + ratio); default 1."),
]
RatioOpt = Annotated[float, typer.Option(help="Linear Alignment step size r in l_p + r (l_p - l_0).")]
LamOpt = Annotated[float, typer.Option("--lam", help="DeRa weight of the aligned model (1 - lam on the reference).")]
AmuletItersOpt = Annotated[int, typer.Option(help="Amulet: iterations per token (0 is plain prompting).")]
AmuletEtaOpt = Annotated[float, typer.Option(help="Amulet: learning rate eta.")]
AmuletAlphaOpt = Annotated[float, typer.Option(help="Amulet: reward scale alpha.")]
AmuletLambdaOpt = Annotated[float, typer.Option(help="Amulet: multiplier lambda of the pull to the principled policy.")]
MaskOpt = Annotated[float, typer.Option(help="Nucleus of the principled distribution kept; 0 or 1 disables.")]
MaxNewOpt = Annotated[int, typer.Option(help="Tokens to generate at most.")]
SystemOpt = Annotated[str | None, typer.Option(help="A base system prompt kept in every context.")]
RawOpt = Annotated[bool, typer.Option("--raw", help="Plain text prompts, no chat template (base models).")]
TemperatureOpt = Annotated[float | None, typer.Option(help="Sample at this temperature (> 0); greedy without it.")]
TopPOpt = Annotated[float | None, typer.Option(help="Sampling nucleus (with --temperature).")]
TopKOpt = Annotated[int | None, typer.Option(help="Sampling top-k (with --temperature).")]
SeedOpt = Annotated[int | None, typer.Option(help="Sampling seed; prompt i gets seed + i (with --temperature).")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help=r"Stop string, C escapes read (\n); repeatable.")]
RepetitionOpt = Annotated[float, typer.Option(help="transformers' repetition penalty on the combined logits.")]
# The soft loop penalty (DRY, docs/quality.md): any method, on the combined logits.
DryMultiplierOpt = Annotated[
    float | None, typer.Option(help="Loop penalty: a repeat of L >= allowed tokens costs m * base^(L - allowed).")
]
DryBaseOpt = Annotated[float | None, typer.Option(help="Loop penalty's base (default 1.75).")]
DryAllowedOpt = Annotated[int | None, typer.Option(help="Loop penalty's allowed repeat length (default 2).")]
DryBreakerOpt = Annotated[
    list[str] | None,
    typer.Option("--dry-breaker", help="Ends a repeat (default: newline, colon, double quote, asterisk); repeatable."),
]


def exits_cleanly(command: Callable) -> Callable:
    """Bad input ends with one sentence and exit code 2, never a traceback."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LinalignError as err:
            print_error(str(err))
            raise typer.Exit(2) from None

    return wrapper


def print_error(message: str) -> None:
    """One line on stderr, 'error: ' first, never wrapped: how every command reports bad input."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


RAY_TAKES_NO_ADDRESS = "--ray takes no address: it starts a local Ray cluster, and --ray-address HOST:PORT joins one"


class OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type) reported as every other error is:
    'error: …' in one line naming the command's --help, exit code 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # noqa: ANN201 (click's signature)
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.ClickException as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # typer has shown the help already
                sys.exit(err.exit_code)
            context = getattr(err, "ctx", None)
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            if context is not None and context.params.get("ray") is True and "unexpected extra" in str(err):
                hint = f"; {RAY_TAKES_NO_ADDRESS}"  # `--ray HOST:PORT`: typer has no option with an optional value
            print_error(err.format_message() + hint)
            sys.exit(err.exit_code)
        except click_errors.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
