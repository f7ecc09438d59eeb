"""The evaluation suites as lists of `Task`s: a prompt, the principle to follow, and how to score the reply."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from linalign.errors import LinalignError
from linalign.evaluation import checkers, datasets
from linalign.prompts import Conversation

SUITES = ("principles", "principles-heldout", "persona", "files", "structured")
LETTERS = "ABCD"


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str | Conversation
    principle: str
    group: str  # the principle's id, the persona item's domain, or the file's name
    question: str  # the request as a judge or reward model should read it
    check: str | None = None  # a checker kind (principles suite)
    params: dict = field(default_factory=dict)
    answer: str | None = None  # the expected letter (persona suite)

    def score(self, text: str) -> bool | None:
        """Whether the reply complies (principles) or picks the right answer (persona); None if unscored."""
        if self.check is not None:
            return checkers.check(self.check, text, self.params)
        if self.answer is not None:
            return datasets.parse_choice(text) == self.answer
        return None


def principle_tasks(
    questions_limit: int | None = None, only: list[str] | None = None, principle_set: str = "main"
) -> list[Task]:
    """Every principle of `principle_set` x the shipped questions: "main", or "heldout", a second set of
    other kinds of principle that method options are judged on without being tuned on it."""
    principles = datasets.load_principles(principle_set=principle_set)
    if only:
        unknown = set(only) - {p.id for p in principles}
        if unknown:
            raise LinalignError(f"unknown principle ids {sorted(unknown)}; known: {[p.id for p in principles]}")
        principles = [p for p in principles if p.id in only]
    questions = datasets.load_questions()[:questions_limit]
    return [
        Task(f"{p.id}/{i}", q, p.principle, p.id, q, check=p.check, params=dict(p.params))
        for p in principles
        for i, q in enumerate(questions)
    ]


def persona_tasks(path: str | None = None, limit: int | None = None) -> list[Task]:
    tasks = []
    for n, item in enumerate(datasets.load_persona(path)[:limit]):
        for letter in LETTERS:
            principle, question = datasets.persona_prompt(item, letter)
            tasks.append(Task(f"{n}/{letter}", question, principle, item.domain, question, answer=letter))
    return tasks


def structured_tasks(limit: int | None = None) -> list[Task]:
    """The structured-output suite: JSON lists, numbered lists, Markdown tables, CSV blocks and Python functions,
    each under a principle; the score is whether the structure is valid and holds the count asked for. `limit`
    keeps the first tasks of each format (group)."""
    tasks, kept = [], {}
    for t in datasets.load_structured():
        group = t.id.split("/")[0]
        kept[group] = kept.get(group, 0) + 1
        if limit is None or kept[group] <= limit:
            tasks.append(Task(t.id, t.prompt, t.principle, group, t.prompt, check=t.check, params=dict(t.params)))
    return tasks


def file_tasks(path: str, principle: str | None, limit: int | None = None) -> list[Task]:
    if not principle:
        raise LinalignError("the files suite needs --principle")
    conversations = datasets.load_open_questions(path)[:limit]
    name = Path(path).name
    return [Task(f"{name}/{i}", c, principle, name, c[-1]["content"]) for i, c in enumerate(conversations)]


def build_tasks(
    suite: str,
    *,
    file: str | None = None,
    principle: str | None = None,
    limit: int | None = None,
    only: list[str] | None = None,
) -> list[Task]:
    if suite == "principles":
        return principle_tasks(limit, only)
    if suite == "principles-heldout":
        return principle_tasks(limit, only, "heldout")
    if suite == "persona":
        return persona_tasks(file, limit)
    if suite == "structured":
        return structured_tasks(limit)
    if suite == "files":
        if not file:
            raise LinalignError("the files suite needs --file PATH (JSON or JSONL)")
        return file_tasks(file, principle, limit)
    raise LinalignError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")


def sampled(tasks: Sequence[Task], samples: int) -> list[Task]:
    """Each task `samples` times, as `id#0`, `id#1`, ... (the tasks themselves for one sample)."""
    if samples == 1:
        return list(tasks)
    return [replace(t, id=f"{t.id}#{k}") for t in tasks for k in range(samples)]


def question_of(task_id: str) -> str:
    """The question a (possibly repeated) task asks: its id without the sample number."""
    return task_id.rsplit("#", 1)[0]
