"""Loaders for the evaluation data (principles, questions, persona items, open-question files) and choice parsing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from linalign.errors import LinalignError

LETTERS = "ABCD"
PERSONA_ANSWER_KEYS = tuple(f"answer_{c}" for c in "abcd")
PERSONA_PREFERENCE_KEYS = tuple(f"preference_{c}" for c in "abcd")


class DatasetError(LinalignError):
    """A data file is missing or has a malformed row; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class Principle:
    id: str
    principle: str
    check: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PersonaItem:
    question: str
    answers: tuple[str, ...]  # in letter order A..D
    personas: tuple[str, ...]  # personas[i] is the user answers[i] is written for
    domain: str


# ---------------------------------------------------------------------------------------------------------------------
# Reading rows


def _shipped(name: str) -> Any:
    return files("linalign.evaluation") / "data" / name


def _read_text(path: Any) -> tuple[str, str]:
    """Return (display name, text) for a local path or a package resource."""
    name = str(path)
    try:
        return name, path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{name}: is a directory, expected a JSON or JSONL file") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DatasetError(f"{name}: cannot read ({e.strerror or e})") from None


def _rows(path: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, row) pairs from a JSON array or a JSONL file; location reads 'FILE line N' or 'FILE item N'."""
    name, text = _read_text(path)
    # The suffix decides, except that a ".json" file holding one object per line is read as JSONL.
    if not name.endswith(".jsonl") and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{name} line {e.lineno}: bad JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{name}: expected a JSON array of objects, got {type(data).__name__}")
        for i, row in enumerate(data, 1):
            yield _object(f"{name} item {i}", row)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
        yield _object(where, row)


def _object(where: str, row: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return where, row


def _get(row: dict[str, Any], key: str, kind: type, where: str, *, required: bool = True, default: Any = None) -> Any:
    if key not in row:
        if required:
            raise DatasetError(f"{where}: missing key {key!r} (keys present: {sorted(row)})")
        return default
    value = row[key]
    # bool is a subclass of int, but a flag is never what a str/dict field means.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetError(f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__}")
    if kind is str and not value.strip():
        raise DatasetError(f"{where}: key {key!r} is empty")
    return value


def _non_empty(items: list[Any], path: Any) -> list[Any]:
    if not items:
        raise DatasetError(f"{path}: no rows")
    return items


# ---------------------------------------------------------------------------------------------------------------------
# Loaders


PRINCIPLE_SETS = {"main": "principles.jsonl", "heldout": "principles_heldout.jsonl"}


def load_principles(path: str | Path | None = None, principle_set: str = "main") -> list[Principle]:
    """Rows {"id", "principle", "check", "params"?}; ids must be unique. Defaults to the shipped principles of
    `principle_set`: "main" (the set methods are tuned on) or "heldout" (kept out of tuning)."""
    source = Path(path) if path is not None else _shipped(PRINCIPLE_SETS[principle_set])
    out: list[Principle] = []
    seen: set[str] = set()
    for where, row in _rows(source):
        pid = _get(row, "id", str, where)
        if pid in seen:
            raise DatasetError(f"{where}: duplicate principle id {pid!r}")
        seen.add(pid)
        params = _get(row, "params", dict, where, required=False, default={})
        out.append(Principle(pid, _get(row, "principle", str, where), _get(row, "check", str, where), dict(params)))
    return _non_empty(out, source)


@dataclass(frozen=True)
class StructuredTask:
    id: str
    principle: str
    prompt: str
    check: str
    params: dict[str, Any] = field(default_factory=dict)


def load_structured(path: str | Path | None = None) -> list[StructuredTask]:
    """Rows {"id", "principle", "prompt", "check", "params"} of the structured-output suite; ids must be unique."""
    source = Path(path) if path is not None else _shipped("structured.jsonl")
    out: list[StructuredTask] = []
    for where, row in _rows(source):
        task = StructuredTask(
            *(_get(row, key, str, where) for key in ("id", "principle", "prompt", "check")),
            params=dict(_get(row, "params", dict, where, required=False, default={})),
        )
        if any(t.id == task.id for t in out):
            raise DatasetError(f"{where}: duplicate task id {task.id!r}")
        out.append(task)
    return _non_empty(out, source)


def load_questions(path: str | Path | None = None) -> list[str]:
    """Rows {"id"?, "question"}; returns the question texts in file order. Defaults to the shipped questions."""
    source = Path(path) if path is not None else _shipped("questions.jsonl")
    return _non_empty([_get(row, "question", str, where).strip() for where, row in _rows(source)], source)


def load_persona(path: str | Path | None = None) -> list[PersonaItem]:
    """Rows in the Linear Alignment persona format: question, answer_a..d, preference_a..d, domain (optional)."""
    source = Path(path) if path is not None else _shipped("persona.jsonl")
    out = []
    for where, row in _rows(source):
        out.append(
            PersonaItem(
                question=_get(row, "question", str, where).strip(),
                answers=tuple(_get(row, k, str, where).strip() for k in PERSONA_ANSWER_KEYS),
                personas=tuple(_get(row, k, str, where).strip() for k in PERSONA_PREFERENCE_KEYS),
                domain=_get(row, "domain", str, where, required=False, default="general").strip(),
            )
        )
    return _non_empty(out, source)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def _is_hh(text: str) -> bool:
    return text.lstrip().startswith("Human:") or "\n\nHuman:" in text


def parse_hh(text: str, where: str = "text") -> list[dict[str, str]]:
    """Messages from an Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ..."), up to the last Human turn."""
    body = text.rstrip()
    marks = list(_HH_TURN.finditer(body))
    if not marks:
        raise DatasetError(f"{where}: no 'Human:' turn found in the transcript")
    turns = []
    ends = [m.start() for m in marks[1:]] + [len(body)]
    for m, end in zip(marks, ends, strict=True):
        content = body[m.end() : end].strip()
        turns.append({"role": "user" if m.group(1) == "Human" else "assistant", "content": content})
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last_user is None:
        raise DatasetError(f"{where}: no 'Human:' turn found in the transcript")
    turns = turns[: last_user + 1]
    if not turns[-1]["content"]:
        raise DatasetError(f"{where}: the last Human turn is empty")
    return turns


def _messages(value: list[Any], where: str) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if not out or out[-1]["role"] != "user":
        raise DatasetError(f"{where}: 'messages' must end with a user message")
    return out


def load_open_questions(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations for the 'files' suite, from a JSON array or JSONL file.

    Each row has one of: `question` or `prompt` (a string: one user message, or an HH transcript), `chosen` (an
    Anthropic HH transcript: the turns up to and including the last Human turn, final Assistant answer removed), or
    `messages` (a list of {"role", "content"} ending with a user message).
    """
    source = Path(path)
    out = []
    for where, row in _rows(source):
        for key in ("question", "prompt"):
            if key in row:
                text = _get(row, key, str, where)
                out.append(parse_hh(text, where) if _is_hh(text) else [{"role": "user", "content": text.strip()}])
                break
        else:
            if "chosen" in row:
                out.append(parse_hh(_get(row, "chosen", str, where), where))
            elif "messages" in row:
                out.append(_messages(_get(row, "messages", list, where), where))
            else:
                raise DatasetError(
                    f"{where}: needs a 'question', 'prompt', 'chosen' or 'messages' key (keys present: {sorted(row)})"
                )
    return _non_empty(out, source)


# ---------------------------------------------------------------------------------------------------------------------
# Persona prompts and answers


def persona_prompt(item: PersonaItem, letter_for_user: str) -> tuple[str, str]:
    """(principle, question text) asking the model to pick the answer written for the persona at `letter_for_user`.

    The principle describes the user (that persona); the question text lists the options "A. ..." to "D. ..." and asks
    for the letter only, so the expected reply is `letter_for_user`.
    """
    letter = letter_for_user.upper()
    if len(letter) != 1 or letter not in LETTERS[: len(item.personas)]:
        raise LinalignError(f"persona letter must be one of {', '.join(LETTERS[: len(item.personas)])}, got {letter!r}")
    persona = item.personas[LETTERS.index(letter)].rstrip()
    if persona.startswith(("A ", "An ", "The ")):
        persona = persona[0].lower() + persona[1:]  # reads on after the colon: "talking to: a nurse ..."
    if not persona.endswith((".", "!", "?")):
        persona += "."
    principle = f"The user you are talking to: {persona} Pick the answer that suits this user best."
    options = "\n".join(f"{c}. {a}" for c, a in zip(LETTERS, item.answers, strict=False))
    question = f"{item.question}\n\n{options}\n\nReply with the letter of the best answer only."
    return principle, question


_MARKUP = re.compile(r"[*_`#>]+")
# After an explicit cue such as "answer is", "option" or "I choose", the letter the model names.
_CUE = re.compile(
    r"\b(?:answers?|choices?|options?|letter|picks?|choose|chose|select(?:ed)?|go(?:ing)? with|opt for)"
    r"\s*(?:(?:would|should)\s+be|is|was|=)?\s*[:=-]?\s*(?:option|letter|choice|answer)?\s*"
    r"(\(\s*[A-Da-d]\s*\)|\[\s*[A-Da-d]\s*\]|[A-Da-d])(?![\w'])",
    re.IGNORECASE,
)
_LEADING = re.compile(r"^\s*(\(\s*[A-Da-d]\s*\)|\[\s*[A-Da-d]\s*\]|[A-Da-d])(?![\w'])")
# Lines such as "B. Refresh your portfolio": two or more of them with different letters echo the option list.
_OPTION_LINE = re.compile(r"^[ \t]*\(?([A-D])[.):][ \t]+\S", re.MULTILINE)
_STANDALONE = re.compile(r"(?<![\w'])(\(\s*[A-Da-d]\s*\)|\[\s*[A-Da-d]\s*\]|[A-D])(?![\w'])")
# Words that may follow a capital "A" that names an option ("A is best") rather than the article ("A good idea").
_A_VERBS = {
    *("is", "because", "since", "as", "seems", "fits", "suits", "would", "best", "sounds", "works", "looks"),
    *("and", "or", "vs", "versus", "over", "than", "then", "nor"),
}
# "B or C", "B/C", "B and D" at the start: two letters in the decisive position.
_ALTERNATIVE = re.compile(
    r"\s*(?:,|/|&|\bor\b|\band\b|\bvs\.?)\s*(?:\(\s*[A-Da-d]\s*\)|\[\s*[A-Da-d]\s*\]|[A-D])(?![\w'])"
)


def _letter(token: str, rest: str, *, cued: bool) -> str | None:
    """The letter in `token` if it reads as a choice given the text `rest` that follows it, else None."""
    bare = token.strip("()[] \t")
    if token[0] in "([":
        return bare.upper()
    nxt = rest.lstrip()
    if not (rest[:1].isspace() and nxt[:1].isalpha()):
        return bare.upper()  # followed by punctuation, a line end or nothing
    if cued:
        # "Option A suits her" names A; "the answer is a good one" is the article.
        return bare if bare.isupper() else None
    if bare in "Aa":
        word = re.match(r"[A-Za-z]+", nxt)
        return "A" if word is not None and word.group(0).lower() in _A_VERBS else None
    return bare.upper()


def parse_choice(text: str) -> str | None:
    """The letter A-D the model chose, or None.

    Rule, after dropping markdown emphasis (`**C**` reads as `C`), first match wins:
    0. Echo: two or more lines that start like options with different letters ("A. ...\\nB. ...") -> None.
    1. Leading letter: the reply starts with a lone letter, optionally bracketed or followed by punctuation
       ("B", "b.", "(c)", "A) ...", "D because ..."). A capital or lower-case "a" followed by an ordinary word is the
       article ("A good choice is B"), so it is skipped. "B or C" / "B/C" at the start -> None.
    2. Cues: letters after "answer", "option", "choice", "letter", "I pick/choose/select/go with" anywhere in the
       reply ("Answer: C", "The answer is D because", "Option A"). One distinct letter wins; different letters -> None.
    3. Stand-alone letters: capital A-D standing as their own word, or any letter in brackets, first in the first
       non-empty line and then in the whole reply. One distinct letter wins; different letters -> None.
    Lower-case letters count only when bracketed, followed by punctuation or at the end, never before a word.
    """
    if not text or not text.strip():
        return None
    clean = _MARKUP.sub("", text).strip()
    if len(set(_OPTION_LINE.findall(clean))) > 1:
        return None

    m = _LEADING.match(clean)
    if m:
        letter = _letter(m.group(1), clean[m.end() :], cued=False)
        if letter is not None:
            return None if _ALTERNATIVE.match(clean, m.end()) else letter

    cued = {_letter(m.group(1), clean[m.end() :], cued=True) for m in _CUE.finditer(clean)} - {None}
    if len(cued) == 1:
        return cued.pop()
    if len(cued) > 1:
        return None

    first_line = next((line for line in clean.splitlines() if line.strip()), "")
    for scope in (first_line, clean):
        found = {_letter(m.group(1), scope[m.end() :], cued=False) for m in _STANDALONE.finditer(scope)} - {None}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    return None
