"""Command-line options and error handling shared by every `linalign` command."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer ships its own copy of click from 0.2x on
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer, on click itself
    from click import exceptions as click_errors

from linalign.errors import LinalignError
from linalign.params import KNOBS, Knob
from linalign.resolve import unescape

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
SystemOpt = Annotated[str | None, typer.Option(help="A base system prompt kept in every context.")]
RawOpt = Annotated[bool, typer.Option("--raw", help="Plain text prompts, no chat template (base models).")]


def knob_option(knob: Knob) -> Any:
    """A knob's option (`linalign.params`): its flags and help; unset (`None`) where it is optional or a list."""
    kind = list[knob.type] if knob.many else knob.type
    return Annotated[kind | None if knob.optional or knob.many else kind, typer.Option(*knob.cli_flags, help=knob.help)]


def knob_options(knobs: Sequence[Knob]) -> Callable[[Callable], Callable]:
    """One option per knob added to a command, handed to it as one dict, `knobs`, in which list knobs' texts
    have their C escapes read (`--stop "\\n"`)."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "knobs"]
        keyword = inspect.Parameter.KEYWORD_ONLY
        added = [
            inspect.Parameter(k.name, keyword, default=None if k.many else k.default, annotation=knob_option(k))
            for k in knobs
        ]

        @wraps(command)
        def with_knobs(*args, **kwargs):
            values = {k.name: kwargs.pop(k.name) for k in knobs}
            for k in knobs:
                if k.many and k.type is str and values[k.name]:
                    values[k.name] = [unescape(text) for text in values[k.name]]
            return command(*args, knobs=values, **kwargs)

        with_knobs.__signature__ = signature.replace(parameters=[*own, *added])
        return with_knobs

    return decorate


RatioOpt = knob_option(KNOBS["ratio"])
PresetOpt = knob_option(KNOBS["preset"])
MaskOpt = knob_option(KNOBS["plausibility_top_p"])
MaxNewOpt = knob_option(KNOBS["max_new_tokens"])
TemperatureOpt = Annotated[float | None, typer.Option(help=KNOBS["temperature"].help)]  # eval's: None is greedy


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
