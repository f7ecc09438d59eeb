"""Quality options of Linear Alignment and the held-out principle set they are judged on.

The held-out checkers get a complying and a violating reply each; every engine option is held to a plain
reference loop (batch 1, uncached, written from the option's definition) token for token under greedy decoding.
"""

from __future__ import annotations

import pytest

from linalign.evaluation import checkers
from linalign.evaluation.datasets import load_principles, load_questions
from linalign.evaluation.suites import build_tasks

HELDOUT_CASES = {
    "numbered": ("1. Grind fresh beans.\n2. Use hot water.", "1. Grind fresh beans.\nThen use hot water."),
    "one_paragraph": ("Grind fresh beans and use water just off the boil.", "Grind fresh beans.\n\nUse hot water."),
    "quoted": ('"Grind fresh beans and brew."', 'Grind fresh beans and brew."'),
    "calm": ("Grind fresh beans.", "Grind fresh beans!"),
    "polite": ("Thank you for asking: grind fresh beans.", "Grind fresh beans, thankfully."),
    "ask_back": ("Grind fresh beans. Do you own a grinder?", "Do you own a grinder? Grind fresh beans."),
    "three_sentences": ("Grind beans. Brew them. Enjoy", "Grind beans. Brew them. Pour. Enjoy."),
    "with_digits": ("Use 15 grams of coffee.", "Use fifteen grams of coffee."),
    "pirate": ("Arr, matey, grind the beans!", "Grind the beans, my friend. Arrange the cups."),
    "robot": ("Beep boop! Grind the beans.", "Grind the beans. Beep boop."),
}


def test_heldout_set_is_new_and_every_principle_has_twenty_questions():
    heldout, main = load_principles(principle_set="heldout"), load_principles()
    assert len(heldout) >= 8
    assert not {p.id for p in heldout} & {p.id for p in main}
    assert not {p.principle for p in heldout} & {p.principle for p in main}
    assert len(load_questions()) >= 20
    tasks = build_tasks("principles-heldout", limit=20)
    assert len(tasks) == 20 * len(heldout)
    assert all(t.check in checkers.CHECKERS for t in tasks)


@pytest.mark.parametrize("pid", sorted(HELDOUT_CASES))
def test_heldout_checker_passes_and_fails(pid):
    principle = {p.id: p for p in load_principles(principle_set="heldout")}[pid]
    good, bad = HELDOUT_CASES[pid]
    assert checkers.check(principle.check, good, principle.params)
    assert not checkers.check(principle.check, bad, principle.params)
    assert not checkers.check(principle.check, "", principle.params)


def test_every_heldout_principle_has_a_case():
    assert {p.id for p in load_principles(principle_set="heldout")} == set(HELDOUT_CASES)
