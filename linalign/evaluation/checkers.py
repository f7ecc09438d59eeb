"""Deterministic checkers for verifiable principles: `check(kind, text, params)` says whether a reply complies."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from linalign.errors import LinalignError

CHECKERS: dict[str, Callable[..., bool]] = {}

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_JSON_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
_BULLETS = ("- ", "* ", "• ")
_LEADING = " \t\r\n\"'“”‘’`*_"
_TRAILING_PUNCT = " \t\r\n.!?,;:\"'“”‘’`*_)"


def checker(name: str) -> Callable[[Callable[..., bool]], Callable[..., bool]]:
    """Register a checker under `name` in `CHECKERS`."""

    def register(fn: Callable[..., bool]) -> Callable[..., bool]:
        if name in CHECKERS:
            raise ValueError(f"checker {name!r} registered twice")
        CHECKERS[name] = fn
        return fn

    return register


def check(kind: str, text: str, params: dict[str, Any] | None = None) -> bool:
    """Run the checker `kind` on `text` with `params`; raise LinalignError for an unknown kind."""
    fn = CHECKERS.get(kind)
    if fn is None:
        raise LinalignError(f"unknown checker kind {kind!r}; known kinds: {', '.join(sorted(CHECKERS))}")
    return bool(fn(text, **(params or {})))


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _syllables(word: str) -> int:
    """Vowel groups, minus a silent final 'e' (so 'make' counts one), never below one."""
    w = word.lower().replace("'", "")
    count = len(_VOWEL_GROUP.findall(w))
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and count > 1:
        count -= 1
    return max(count, 1)


def _contains_word(text: str, keyword: str) -> bool:
    # Lookarounds instead of \b so keywords that start or end with punctuation still match as whole words.
    pattern = r"(?<!\w)" + re.escape(keyword.strip()) + r"(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


@lru_cache(maxsize=1)
def _vader() -> Any:
    # Imported lazily: VADER loads its lexicon on construction, which most callers never need.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _compound(text: str) -> float:
    return float(_vader().polarity_scores(text)["compound"])


@checker("lowercase_only")
def lowercase_only(text: str) -> bool:
    """Has at least one letter and no uppercase letter."""
    return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)


@checker("uppercase_only")
def uppercase_only(text: str) -> bool:
    """Has at least one letter and every cased letter is a capital."""
    return any(c.isalpha() for c in text) and not any(c.islower() for c in text)


@checker("max_words")
def max_words(text: str, n: int) -> bool:
    """Non-empty and at most `n` whitespace-separated words."""
    count = len(text.split())
    return 0 < count <= int(n)


@checker("no_commas")
def no_commas(text: str) -> bool:
    """Non-empty and no comma (ASCII or full-width)."""
    return bool(text.strip()) and "," not in text and "，" not in text


@checker("bullet_list")
def bullet_list(text: str) -> bool:
    """Every non-empty line starts with '- ', '* ' or '• ', and there are at least two items."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 2 and all(line.startswith(_BULLETS) for line in lines)


@checker("starts_with")
def starts_with(text: str, phrase: str) -> bool:
    """Starts with `phrase`, case-insensitively, after leading whitespace, quotes and markdown emphasis."""
    return text.lstrip(_LEADING).lower().startswith(phrase.strip().lower())


@checker("ends_with")
def ends_with(text: str, phrase: str) -> bool:
    """Ends with `phrase`, case-insensitively, ignoring trailing whitespace and final punctuation on both."""
    target = phrase.strip().rstrip(_TRAILING_PUNCT).lower()
    return bool(target) and text.rstrip(_TRAILING_PUNCT).lower().endswith(target)


@checker("include_keyword")
def include_keyword(text: str, keyword: str) -> bool:
    """Contains `keyword` as a whole word, case-insensitively."""
    return _contains_word(text, keyword)


@checker("avoid_keyword")
def avoid_keyword(text: str, keyword: str) -> bool:
    """Non-empty and never contains `keyword` as a whole word, case-insensitively."""
    return bool(text.strip()) and not _contains_word(text, keyword)


@checker("valid_json")
def valid_json(text: str) -> bool:
    """The whole text (stripped, optionally inside a ```json fence) parses as a JSON object or array."""
    body = text.strip()
    fenced = _JSON_FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, (dict, list))


@checker("positive_tone")
def positive_tone(text: str) -> bool:
    """VADER compound score >= 0.3."""
    return _compound(text) >= 0.3


@checker("negative_tone")
def negative_tone(text: str) -> bool:
    """VADER compound score <= -0.3."""
    return _compound(text) <= -0.3


@checker("simple_vocabulary")
def simple_vocabulary(text: str) -> bool:
    """At least 90% of words have at most two syllables and the average word is at most 5.5 letters."""
    words = _words(text)
    if not words:
        return False
    short = sum(_syllables(w) <= 2 for w in words)
    avg_len = sum(len(w.replace("'", "")) for w in words) / len(words)
    return short / len(words) >= 0.9 and avg_len <= 5.5


@checker("no_digits")
def no_digits(text: str) -> bool:
    """Non-empty and no digit characters (Unicode digits included)."""
    return bool(text.strip()) and not any(c.isdigit() for c in text)


# Checkers of the held-out principle set (data/principles_heldout.jsonl): kinds the tuned-on set does not use.

_NUMBERED = re.compile(r"^\d+[.)]\s")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


@checker("numbered_list")
def numbered_list(text: str) -> bool:
    """Every non-empty line starts with '1. ' or '1) ' (any number), and there are at least two items."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 2 and all(_NUMBERED.match(line) for line in lines)


@checker("single_paragraph")
def single_paragraph(text: str) -> bool:
    """Non-empty, one line (no line break inside), and not a list item or a heading."""
    body = text.strip()
    return bool(body) and "\n" not in body and not body.startswith((*_BULLETS, "#")) and not _NUMBERED.match(body)


@checker("wrapped_in")
def wrapped_in(text: str, left: str, right: str) -> bool:
    """The stripped text starts with `left` and ends with `right`, with something in between."""
    body = text.strip()
    return len(body) > len(left) + len(right) and body.startswith(left) and body.endswith(right)


@checker("avoid_chars")
def avoid_chars(text: str, chars: str) -> bool:
    """Non-empty and none of the characters in `chars`."""
    return bool(text.strip()) and not any(c in text for c in chars)


@checker("include_any")
def include_any(text: str, keywords: list[str]) -> bool:
    """Contains at least one of `keywords` as a whole word or phrase, case-insensitively."""
    return any(_contains_word(text, k) for k in keywords)


@checker("ends_with_question")
def ends_with_question(text: str) -> bool:
    """The last visible character, after closing quotes and emphasis, is a question mark."""
    return text.rstrip(" \t\r\n\"'”’`*_)").endswith(("?", "？"))


@checker("max_sentences")
def max_sentences(text: str, n: int) -> bool:
    """Non-empty and at most `n` sentences (runs of text ended by '.', '!' or '?' before a space or the end,
    a trailing fragment counting as one)."""
    body = text.strip()
    if not body:
        return False
    fragment = not body.endswith((".", "!", "?"))
    return len(_SENTENCE_END.findall(body)) + fragment <= int(n)


@checker("include_digit")
def include_digit(text: str) -> bool:
    """Contains at least one digit character."""
    return any(c.isdigit() for c in text)


# Checkers of the structured-output suite (data/structured.jsonl): the structure parses and holds the count asked
# for. Prose around it is tolerated (small models often add a sentence); the structure itself must be exact.

_FENCE = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:\n```|$)", re.DOTALL)
_ITEM = re.compile(r"^\s*(\d+)[.)]\s+\S")
_RULE_CELL = re.compile(r"^:?-+:?$")


def _block(text: str) -> str:
    """The first fenced block's content, else the whole text, stripped."""
    fenced = _FENCE.search(text)
    return (fenced.group(1) if fenced else text).strip()


def _filled(value: Any) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or (
        isinstance(value, (int, float)) and not isinstance(value, bool)
    )


@checker("json_list")
def json_list(text: str, n: int, keys: list[str]) -> bool:
    """A JSON array (the fenced block, or from the first '[' to the last ']') of exactly `n` objects, each with
    exactly the keys `keys` and a non-empty string or number under each."""
    body = _block(text)
    start, end = body.find("["), body.rfind("]")
    if start < 0 or end < start:
        return False
    try:
        value = json.loads(body[start : end + 1])
    except ValueError:
        return False
    return (
        isinstance(value, list)
        and len(value) == int(n)
        and all(isinstance(v, dict) and set(v) == set(keys) and all(map(_filled, v.values())) for v in value)
    )


@checker("numbered_items")
def numbered_items(text: str, n: int) -> bool:
    """Numbered items ('1. ' or '1) ' at the start of a line) numbered exactly 1, 2, ..., `n`."""
    numbers = [int(m.group(1)) for m in map(_ITEM.match, text.splitlines()) if m]
    return numbers == list(range(1, int(n) + 1))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@checker("markdown_table")
def markdown_table(text: str, n: int, columns: list[str]) -> bool:
    """The first run of lines starting with '|': a header naming `columns` (case-insensitively), a rule row of
    dashes, then exactly `n` rows of as many non-empty cells."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip().startswith("|")), None)
    if first is None:
        return False
    table = []
    for line in lines[first:]:
        if not line.strip().startswith("|"):
            break
        table.append(_cells(line))
    if len(table) < 2 or [c.lower() for c in table[0]] != [c.lower() for c in columns]:
        return False
    if not all(_RULE_CELL.match(c) for c in table[1]) or len(table[1]) != len(columns):
        return False
    rows = table[2:]
    return len(rows) == int(n) and all(len(r) == len(columns) and all(r) for r in rows)


@checker("csv_rows")
def csv_rows(text: str, n: int, header: list[str]) -> bool:
    """A header line with the fields `header` (case-insensitively) followed by exactly `n` non-empty lines of as
    many non-empty fields (inside a fenced block where there is one)."""
    import csv

    lines = _block(text).splitlines()
    wanted = [h.lower() for h in header]
    start = next((i for i, line in enumerate(lines) if [c.strip().lower() for c in line.split(",")] == wanted), None)
    if start is None:
        return False
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line)
    parsed = list(csv.reader(rows, skipinitialspace=True))
    return len(parsed) == int(n) and all(len(r) == len(header) and all(c.strip() for c in r) for r in parsed)


@checker("python_function")
def python_function(text: str, name: str, n: int) -> bool:
    """The code (the fenced block, else the whole text) parses with `ast` and defines `name` with `n` parameters
    and a `for` or `while` loop in its body."""
    import ast

    try:
        tree = ast.parse(_block(text))
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name and len(node.args.args) == int(n):
            return any(isinstance(inner, (ast.For, ast.While)) for inner in ast.walk(node))
    return False
