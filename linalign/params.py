"""Every knob of alignment and decoding, declared once: name, type, default, bounds, help, the methods that read it.

What is derived from these declarations, so that a new knob is one `Knob` here (and its use in `linalign.step`):

- the fields of `AlignConfig` and `DecodeConfig` (`configured`) and their per-value validation (`check`), whose
  errors name the knob (`LinalignError.param`);
- the command line's options (`linalign.options.knob_options`), with `flags` where the spelling differs;
- the server's request schema (`request_type`: pydantic constraints, with the request `limits` that bound what a
  small body can cost) and the server's name of each field (`request`);
- eval's quality-option variants and bench's extra rows (`variant_keys`, `parse_options`).

Rules that relate several knobs (a trust region needs a mask, ...) stay with the configurations; rules that need
the model (DeRa's reference model, the context length) stay with the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import Field

from linalign.errors import LinalignError

METHODS = ("base", "prompt", "la", "dera", "amulet")
PRINCIPLED = ("prompt", "la", "dera", "amulet")  # the methods that read principles
MASKS = ("top_p", "min_p", "intersect")
# Where a principled context tells the model its principle: the system message (the paper's), prefixed to the
# last user turn (near the question), or both.
PLACEMENTS = ("system", "user", "both")
DRY_BREAKERS = ("\n", ":", '"', "*")  # the soft loop penalty's default sequence breakers (DRY's)
# The loop penalty's multiplier a preset gives Linear Alignment where `dry_multiplier` is unset (other methods: 0).
# "default" passed the rule of docs/quality.md; "paper" is the authors' recipe exactly (r = 2, top-p 0.8, nothing
# else), the one the equivalence tests hold to their code.
PRESETS = {"default": 2.0, "paper": 0.0}
MAX_SEED = 2**63
MAX_STRENGTH = 100.0  # the most a request may ask of a strength: a request's cost must not grow with a number
MAX_PRINCIPLES = 16


@dataclass(frozen=True)
class Knob:
    """One knob. `type` is `float`, `int` or `str` (of each element where `many`); the bounds `ge`/`gt`/`le`/`lt`
    are pydantic's, checked with a message that names the knob and the rule (and `note`, where a bound has a
    meaning); `limits` are the server's extra request limits (pydantic `Field` constraints on a value, or on each
    element where `many`, whose list holds at most `max_items`)."""

    name: str
    type: type
    default: Any
    help: str
    methods: tuple[str, ...] = METHODS
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is a value: unset
    many: bool = False
    flags: tuple[str, ...] = ()  # the command line's spellings, where they are not --name-with-dashes
    request: str | None = None  # the server's name, where it is not `name`
    limits: Mapping[str, Any] = field(default_factory=dict)
    max_items: int | None = None
    cli: bool = True  # an option of `linalign generate`

    @property
    def rule(self) -> str:
        """'>= 0', '> 0', 'in [0, 1]', 'in (0, 1]', 'an integer in [1, 65)': the bounds, as messages state them."""
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else ""
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else ""
        if low and high:
            rule = f"in {low}, {high}"
        elif low:
            rule = f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        elif high:
            rule = f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        else:
            rule = "a text" if self.type is str else ""
        return f"an integer {rule}".strip() if self.type is int else rule

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def annotation(self) -> Any:
        kind = list[self.type] if self.many else self.type
        return kind | None if self.optional else kind


def _fails(knob: Knob, value: Any) -> bool:
    if knob.type is float:
        return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if knob.type is int:
        return isinstance(value, bool) or not isinstance(value, int)
    return not isinstance(value, str) or bool(knob.choices) and value not in knob.choices


def _outside(knob: Knob, value: float) -> bool:
    return (
        (knob.ge is not None and value < knob.ge)
        or (knob.gt is not None and value <= knob.gt)
        or (knob.le is not None and value > knob.le)
        or (knob.lt is not None and value >= knob.lt)
    )


def check(knob: Knob, value: Any, name: str | None = None) -> None:
    """Refuse a value of `knob` (one element, named `name`, where the knob is a list) that its type or bounds
    forbid, with a message that names it and the rule."""
    name = name or knob.name
    if knob.choices and _fails(knob, value):
        raise LinalignError(f"unknown {name} {value!r}; choose one of {', '.join(knob.choices)}", param=knob.name)
    if _fails(knob, value) or knob.type is not str and _outside(knob, value):
        what = "a finite number" if knob.type is float and _fails(knob, value) else knob.rule
        note = f" {knob.note}" if knob.note and what == knob.rule else ""
        raise LinalignError(f"{name} must be {what}{note}, got {value!r}", param=knob.name)


def check_all(values: Mapping[str, Any], knobs: Sequence[Knob]) -> None:
    """Each knob's own rule on the values given of it (`None` passes where a knob is optional; a list knob's
    rules on the list as a whole, beyond each element's, are its configuration's)."""
    for knob in knobs:
        value = values.get(knob.name)
        if knob.name not in values or value is None and knob.optional or knob.many and knob.type is str:
            continue
        for element in value if knob.many else [value]:
            check(knob, element, knob.name.removesuffix("s") if knob.many else None)


def configured(knobs: Sequence[Knob]) -> Callable[[type], type]:
    """A dataclass with one field per knob after the class's own, of the knob's type and default."""

    def decorate(cls: type) -> type:
        annotations = cls.__dict__.get("__annotations__", {})
        for knob in knobs:
            annotations[knob.name] = knob.annotation
            if knob.many and knob.default is not None:  # a list: each instance its own
                setattr(cls, knob.name, field(default_factory=partial(list, knob.default)))
            else:
                setattr(cls, knob.name, knob.default)
        cls.__annotations__ = annotations
        return dataclass(cls)

    return decorate


def request_type(knob: Knob) -> Any:
    """The knob as a field of the server's request (unset: `None`): its type under pydantic's constraints (finite
    numbers, the choices, the request limits)."""
    element: Any = Literal[knob.choices] if knob.choices else knob.type
    constraints = dict(knob.limits) | ({"allow_inf_nan": False} if knob.type is float else {})
    if constraints:
        element = Annotated[element, Field(**constraints)]
    if knob.many:
        return Annotated[list[element] | None, Field(max_length=knob.max_items, description=knob.help)]
    return Annotated[element | None, Field(description=knob.help)]


ALIGN = (
    Knob(
        "ratio",
        float,
        2.0,
        "Linear Alignment step size r in l_p + r (l_p - l_0).",
        ("la",),
        ge=0,
        note="(0 is plain principle prompting)",
        limits={"ge": 0, "le": MAX_STRENGTH},
    ),
    Knob(
        "weights",
        float,
        None,
        "One weight per principle, scaling the ratio: c = w (1 + ratio); default 1.",
        PRINCIPLED,
        optional=True,
        many=True,
        flags=("--weight",),
        limits={"ge": -MAX_STRENGTH, "le": MAX_STRENGTH},
        max_items=MAX_PRINCIPLES,
    ),
    Knob(
        "lam",
        float,
        1.0,
        "DeRa weight of the aligned model (1 - lam on the reference).",
        ("dera",),
        flags=("--lam",),
        limits={"ge": -MAX_STRENGTH, "le": MAX_STRENGTH},
    ),
    Knob(
        "plausibility_top_p",
        float,
        0.8,
        "Nucleus of the principled distribution kept; 0 or 1 disables.",
        ("la",),
        ge=0,
        le=1,
        note="(0 or 1 disables the mask)",
    ),
    Knob(
        "amulet_iterations",
        int,
        60,
        "Amulet: iterations per token (0 is plain prompting).",
        ("amulet",),
        ge=0,
        limits={"ge": 0, "le": 1000},
    ),
    Knob("amulet_eta", float, 10.0, "Amulet: learning rate eta.", ("amulet",), gt=0),
    Knob("amulet_alpha", float, 2.0, "Amulet: reward scale alpha.", ("amulet",), gt=0),
    Knob(
        "amulet_lambda",
        float,
        2.0,
        "Amulet: multiplier lambda of the pull to the principled policy.",
        ("amulet",),
        gt=0,
    ),
    # Options that trade compliance for fluent text (docs/quality.md); their defaults are the paper's recipe, but
    # for the loop penalty, whose multiplier the preset gives Linear Alignment.
    Knob(
        "kl_budget",
        float,
        None,
        "Trust region: per token, the largest ratio <= --ratio within this KL (nats).",
        ("la",),
        gt=0,
        note="(nats; leave it unset for a fixed ratio)",
        optional=True,
    ),
    Knob(
        "repeat_guard",
        int,
        0,
        "Exclude tokens that would repeat an n-gram of the reply (0: off).",
        ge=0,
        limits={"ge": 0, "le": 16},
    ),
    Knob(
        "mask",
        str,
        "top_p",
        "Plausibility mask: top_p (paper), min_p or intersect.",
        ("la",),
        choices=MASKS,
        flags=("--mask",),
    ),
    Knob(
        "plausibility_min_p",
        float,
        0.1,
        "Threshold of --mask min_p, relative to the top token.",
        ("la",),
        gt=0,
        le=1,
        flags=("--plausibility-min-p", "--min-p"),
    ),
    Knob(
        "preset",
        str,
        "default",
        "default (Linear Alignment with the loop penalty at 2, docs/quality.md) or paper (the authors' recipe).",
        ("la",),
        choices=tuple(PRESETS),
    ),
    Knob(
        "principle_placement",
        str,
        "system",
        "Where the principle is told: system (the system message), user (prefixed to the last user turn) or both.",
        PRINCIPLED,
        choices=PLACEMENTS,
    ),
    # The soft loop penalty (DRY): any method, on the combined logits.
    Knob(
        "dry_multiplier",
        float,
        None,
        "Loop penalty: a repeat of L >= allowed tokens costs m * base^(L - allowed) (unset: the preset's).",
        ge=0,
        le=100,
        note="(0 turns the penalty off)",
        optional=True,
    ),
    Knob("dry_base", float, 1.75, "Loop penalty's base.", ge=1, le=10),
    Knob("dry_allowed_length", int, 2, "Loop penalty's allowed repeat length.", ge=1, lt=65),
    Knob(
        "dry_breakers",
        str,
        DRY_BREAKERS,
        "Ends a repeat (default: newline, colon, double quote, asterisk); C escapes read (\\n); repeatable.",
        many=True,
        flags=("--dry-breaker",),
        limits={"min_length": 1, "max_length": 16},
        max_items=16,
    ),
)

DECODE = (
    Knob("max_new_tokens", int, 128, "Tokens to generate at most.", ge=1, request="max_tokens", limits={"ge": 1}),
    Knob("min_new_tokens", int, 0, "Tokens to generate at least.", ge=0),
    Knob(
        "temperature",
        float,
        0.0,
        "Sample at this temperature (> 0); greedy without it.",
        ge=0,
        note="(0 is greedy decoding)",
        limits={"ge": 0, "le": MAX_STRENGTH},
    ),
    Knob("top_k", int, 0, "Sampling top-k (with --temperature).", ge=0),
    Knob("top_p", float, 1.0, "Sampling nucleus (with --temperature).", gt=0, le=1),
    Knob("repetition_penalty", float, 1.0, "transformers' repetition penalty on the combined logits.", gt=0),
    Knob("no_repeat_ngram_size", int, 0, "transformers' n-gram size that may not repeat (0: off).", ge=0),
    Knob("stop", str, (), r"Stop string, C escapes read (\n); repeatable.", many=True),
    Knob(
        "seed",
        int,
        None,
        "Sampling seed; prompt i gets seed + i (with --temperature).",
        ge=0,
        lt=MAX_SEED,
        optional=True,
        limits={"ge": 0, "lt": MAX_SEED},
    ),
    Knob(
        "logprobs",
        int,
        None,
        "Log-probabilities of each chosen token and that many top alternatives.",
        ge=0,
        lt=21,
        optional=True,
        request="top_logprobs",
        cli=False,  # the command line's records carry no log-probabilities
        limits={"ge": 0, "le": 20},
    ),
)

KNOBS = {knob.name: knob for knob in (*ALIGN, *DECODE)}
# Which method a configuration decodes with: not a knob of the others, but checked and served as one.
METHOD = Knob("method", str, "la", "The method: " + ", ".join(METHODS) + ".", choices=METHODS)


def variant_keys(knobs: Sequence[Knob] = ALIGN, method: str = "la") -> tuple[str, ...]:
    """The options an eval variant of `method` may set: the one-valued knobs it reads, but the mask's nucleus,
    which is a setting of the whole evaluation."""
    return tuple(k.name for k in knobs if method in k.methods and not k.many and k.name != "plausibility_top_p")


def parse_options(text: str, knobs: Sequence[Knob] = ALIGN, method: str = "la") -> dict[str, Any]:
    """'kl_budget=1,repeat_guard=3,mask=min_p' (any of `variant_keys`): options typed as text (eval's variants,
    bench's extra rows), each value a choice or a number, an integer where the knob's is."""
    keys = variant_keys(knobs, method)
    options: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = (x.strip() for x in part.partition("="))
        if key not in keys or not value:
            raise LinalignError(f"options are {'=, '.join(keys)}=, got {part!r}")
        knob = next(k for k in knobs if k.name == key)
        options[key] = value if knob.type is str else _number(knob, value)
    return options


def _number(knob: Knob, text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise LinalignError(f"{knob.name} must be a number, got {text!r}", param=knob.name) from None
    return int(value) if knob.type is int else value


def for_method(method: str, values: Mapping[str, Any], knobs: Sequence[Knob] = ALIGN) -> dict[str, Any]:
    """The values of the knobs that `method` reads."""
    return {k.name: values[k.name] for k in knobs if k.name in values and method in k.methods}


def unread(methods: Sequence[str], values: Mapping[str, Any], knobs: Sequence[Knob] = ALIGN) -> None:
    """Refuse a knob set away from its default that none of `methods` reads: it would silently do nothing."""
    for k in knobs:
        if k.name in values and values[k.name] not in (None, k.default) and not set(methods) & set(k.methods):
            raise LinalignError(
                f"{k.name} is read by method {' or '.join(k.methods)} only, not by {', '.join(methods)}",
                param=k.name,
            )
