"""The loop penalty on the built-in model: a Linear Alignment reply that loops at the paper's setting stops
looping (under the default too), and structured replies keep their structure."""

from __future__ import annotations

from collections import Counter

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.evaluation.datasets import load_questions
from linalign.evaluation.suites import build_tasks


def most_repeated_4gram(text: str) -> int:
    words = text.split()
    counts = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
    return max(counts.values(), default=0)


def _decode(aligner: Aligner, prompts: list[str], aligns: list[AlignConfig], config: DecodeConfig) -> list[str]:
    """The replies of one batch, each prompt with its own configuration."""
    prepared = [aligner.prepare(p, a, config) for p, a in zip(prompts, aligns, strict=True)]
    texts: dict[int, str] = dict.fromkeys(range(len(prepared)), "")
    for events in aligner.decode(prepared):
        for e in events:
            texts[e.key] += e.text
    return [texts[i] for i in range(len(prepared))]


def test_a_looping_reply_stops_looping(smollm2):
    """The first 24 shipped questions under the demo's principle, one batch, at the paper's setting: some
    replies loop ("consider their breed size breed weight temperament breed size temperament temperament ...",
    a sentence said again and again). With the penalty at DRY's recommended multiplier no reply repeats a
    4-gram more than three times (a phrase opening differing lines, such as "make sure to", may come back), and
    under the default (the penalty at multiplier 2) none more than twice."""
    aligner, config = Aligner(smollm2), DecodeConfig(max_new_tokens=64)
    questions = load_questions()[:24]
    brief = "Keep every answer very short: no more than 30 words in total."
    aligns = [AlignConfig(principles=[brief], preset="paper", **o) for o in ({}, {"dry_multiplier": 0.8})]
    paper, soft, default = (
        [most_repeated_4gram(t) for t in _decode(aligner, questions, [align] * 24, config)]
        for align in (*aligns, AlignConfig(principles=[brief]))
    )
    assert max(paper) >= 10, paper
    assert max(soft) <= 3 and sum(soft) < sum(paper), (paper, soft)
    assert max(default) <= 2, default


def test_structured_replies_keep_their_structure(smollm2):
    """DRY's known failure is structured output, which repeats its frame. Two tasks of the structured suite (a
    numbered list of three; a function with a loop that repeats `count`, `vowels` and its indentation), decoded
    together: every reply valid at the paper's setting stays valid with the penalty at DRY's recommended
    multiplier."""
    wanted = ("numbered_list/concise/0", "python/lowercase/1")
    tasks = [t for t in build_tasks("structured") if t.id in wanted]
    aligner, config = Aligner(smollm2), DecodeConfig(max_new_tokens=96)
    aligns = [AlignConfig(principles=[t.principle], dry_multiplier=m) for m in (0.0, 0.8) for t in tasks]
    texts = _decode(aligner, [t.prompt for t in tasks] * 2, aligns, config)
    valid = [t.score(texts[i + k * len(tasks)]) for k in range(2) for i, t in enumerate(tasks)]
    paper, soft = valid[: len(tasks)], valid[len(tasks) :]
    assert len(tasks) == 2 and any(paper), texts
    assert all(s for p, s in zip(paper, soft, strict=True) if p), texts
