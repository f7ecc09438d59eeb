"""The deterministic checkers behind the principles suite, and the shipped principles that use them."""

from __future__ import annotations

import pytest

from linalign.errors import LinalignError
from linalign.evaluation import checkers, datasets

PASS_FAIL = [
    ("lowercase_only", {}, "sure, here is an answer in lowercase.", "Sure, here is an answer."),
    ("lowercase_only", {}, "no caps here, 42 times", ""),
    ("uppercase_only", {}, "THIS IS LOUD, 100%!", "THIS IS mostly LOUD"),
    ("uppercase_only", {}, "OK", "12345"),
    ("max_words", {"n": 5}, "one two three four five", "one two three four five six"),
    ("max_words", {"n": 30}, "Short answer.", "   "),
    ("no_commas", {}, "No commas here. None at all.", "Well, there is one."),
    ("bullet_list", {}, "- first\n- second", "- only one item"),
    ("bullet_list", {}, "* a\n\n• b\n- c", "Intro line\n- a\n- b"),
    ("starts_with", {"phrase": "Sure thing"}, '  "sure thing, here you go', "Here you go, sure thing"),
    ("starts_with", {"phrase": "Sure thing"}, "**Sure thing!** Ok.", "Sure, thing"),
    ("ends_with", {"phrase": "Hope this helps!"}, "Drink water. Hope this helps!  \n", "Hope this helps! Bye."),
    ("ends_with", {"phrase": "Hope this helps!"}, "Drink water. hope this helps.", "Drink water."),
    ("include_keyword", {"keyword": "honestly"}, "Honestly, it depends.", "It is dishonestly cheap."),
    ("avoid_keyword", {"keyword": "you"}, "Your plan works; yours too.", "You should try it."),
    ("avoid_keyword", {"keyword": "you"}, "It works.", "Thank you!"),
    ("valid_json", {}, '{"answer": "yes"}', '{"answer": "yes"} and more'),
    ("valid_json", {}, "```json\n[1, 2]\n```", '"just a string"'),
    ("valid_json", {}, '  \n{"a": {"b": null}}\n', "```json\n{bad}\n```"),
    ("positive_tone", {}, "This is wonderful, I love it! Great idea.", "This is terrible and I hate it."),
    ("negative_tone", {}, "This is awful, sad and hopeless.", "What a lovely, happy day!"),
    ("simple_vocabulary", {}, "The sun is hot. Drink cold water and rest in the shade.", ""),
    (
        "simple_vocabulary",
        {},
        "Go to bed at the same time each night.",
        "Photosynthesis necessitates chlorophyll-mediated electromagnetic absorption.",
    ),
    ("no_digits", {}, "Twenty two apples.", "22 apples."),
    ("no_digits", {}, "None at all.", "Room ٣ please"),
    # the held-out set's kinds (tests/test_quality.py checks them on that set's own principles)
    ("numbered_list", {}, "1. a\n2) b", "1. a"),
    ("single_paragraph", {}, "One line only.", "- a list item"),
    ("wrapped_in", {"left": '"', "right": '"'}, '"quoted"', '""'),
    ("avoid_chars", {"chars": "!"}, "Calm.", "Wow!"),
    ("include_any", {"keywords": ["arr", "matey"]}, "Ahoy matey", "Arrow"),
    ("ends_with_question", {}, "Why not?", "Why? Because."),
    ("max_sentences", {"n": 1}, "One sentence.", "One. Two."),
    ("include_digit", {}, "In 1999.", "In nineteen ninety-nine."),
    # the structured-output suite's kinds (tests/test_structured.py checks each way they fail)
    ("json_list", {"n": 1, "keys": ["a"]}, '[{"a": 1}]', '[{"a": 1}, {"a": 2}]'),
    ("numbered_items", {"n": 2}, "1. a\n2. b", "1. a\n3. b"),
    ("markdown_table", {"n": 1, "columns": ["a"]}, "| a |\n|---|\n| x |", "| a |\n| x |"),
    ("csv_rows", {"n": 1, "header": ["a", "b"]}, "a,b\nx,y", "a,b\nx"),
    ("python_function", {"name": "f", "n": 0}, "def f():\n    for _ in []:\n        pass", "def f():\n    pass"),
]


@pytest.mark.parametrize(("kind", "params", "good", "bad"), PASS_FAIL)
def test_checker_pass_and_fail(kind: str, params: dict, good: str, bad: str) -> None:
    assert checkers.check(kind, good, params) is True
    assert checkers.check(kind, bad, params) is False


def test_every_registered_checker_is_exercised() -> None:
    assert {kind for kind, *_ in PASS_FAIL} == set(checkers.CHECKERS)
    assert len(checkers.CHECKERS) >= 12


def test_unknown_kind_names_it_and_lists_known() -> None:
    with pytest.raises(LinalignError) as info:
        checkers.check("shouting", "HI", {})
    message = str(info.value)
    assert "shouting" in message
    assert "lowercase_only" in message and "no_digits" in message


def test_simple_vocabulary_counts_three_syllable_words_as_long() -> None:
    """Two syllables is the cut: with three, ordinary adult prose passes and the principle would not discriminate."""
    assert checkers.check("simple_vocabulary", "The cat sat on the mat and ate some fish.", {})
    assert not checkers.check("simple_vocabulary", "Every family remembers another beautiful holiday together.", {})


def test_params_default_to_none() -> None:
    assert checkers.check("no_commas", "fine", None) is True


def test_decorator_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError):
        checkers.checker("no_commas")(lambda text: True)


def test_shipped_principles_name_known_checkers_and_run() -> None:
    principles = datasets.load_principles()
    sample = "Sure thing, honestly this is a simple answer. Hope this helps!"
    for p in principles:
        assert p.check in checkers.CHECKERS, p.id
        assert isinstance(checkers.check(p.check, sample, p.params), bool)


@pytest.mark.parametrize("principle", datasets.load_principles(), ids=lambda p: p.id)
def test_shipped_principle_is_satisfiable(principle: datasets.Principle) -> None:
    """Each shipped constraint has a reply that passes, so a model can reach it."""
    answers = {
        "lowercase_only": "drink water and rest.",
        "uppercase_only": "DRINK WATER AND REST.",
        "max_words": "Drink water and rest.",
        "no_commas": "Drink water. Rest well.",
        "bullet_list": "- Drink water\n- Rest well",
        "starts_with": "Sure thing! Drink water.",
        "ends_with": "Drink water. Hope this helps!",
        "include_keyword": "Honestly, drink water.",
        "avoid_keyword": "Water and rest work best.",
        "valid_json": '{"answer": "Drink water."}',
        "positive_tone": "Great question! Drinking water is a wonderful, happy habit.",
        "negative_tone": "Sadly, most people fail, and it is a terrible, painful struggle.",
        "simple_vocabulary": "Drink lots of water and go to bed on time.",
        "no_digits": "Drink eight cups of water.",
    }
    assert checkers.check(principle.check, answers[principle.check], principle.params)
