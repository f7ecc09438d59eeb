"""One resolver from what a user typed (CLI options, an HTTP body, a job's records) to configurations.

The CLI, the server and the batch jobs all build their `AlignConfig`s and `DecodeConfig` here, so the
method names, the sampling rule (`linalign.config`), the blank-principle policy, the defaults and which method
reads which knob (`linalign.params`) are the same everywhere; errors name the knob (`LinalignError.param`).
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence
from typing import Any

from linalign.config import AlignConfig, DecodeConfig
from linalign.errors import LinalignError
from linalign.params import ALIGN, METHOD, METHODS, check, check_all, for_method, unread


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """'base,prompt,la' (or a list) -> the method names, each checked."""
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise LinalignError(f"name at least one method: {', '.join(METHODS)}")
    for name in names:
        check(METHOD, name)
    return names


def align_configs(
    methods: Sequence[str], principles: Sequence[str] | None, knobs: Mapping[str, Any]
) -> list[AlignConfig]:
    """One `AlignConfig` per method with the same principles, each with the knobs its method reads (`None`
    knobs take the defaults); a knob set away from its default that none of the methods reads is refused."""
    values = {k: v for k, v in knobs.items() if v is not None}
    check_all(values, ALIGN)
    unread(methods, values)
    return [AlignConfig(method=m, principles=list(principles or []), **for_method(m, values)) for m in methods]


def unescape(text: str) -> str:
    r"""C-style escapes (`\n`, `\t`, `\\`, `\u00e9`) as a shell passes them literally, e.g. `--stop "\n\n"`."""
    try:
        return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")
    except UnicodeDecodeError as err:
        raise LinalignError(f"bad escape in {text!r}: {err.reason}") from None


def decode_config(max_new_tokens: int, **knobs: Any) -> DecodeConfig:
    """`DecodeConfig` from the decoding knobs given (`linalign.params.DECODE`; unset, `None`: the default);
    greedy unless `temperature > 0` (the sampling rule)."""
    return DecodeConfig(max_new_tokens=max_new_tokens, **{k: v for k, v in knobs.items() if v is not None})
