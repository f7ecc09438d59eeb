"""Every method as one configuration of the same thing: weighted (model, context) terms.

A `Plan` lists the terms whose next-token logits are combined as `sum_k w_k l_k`, which term is the
sequence's own context (its `anchor`: the principled one where there is one) and the plausibility nucleus
kept from the anchor's distribution (Linear Alignment's mask; `None`: no mask).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from linalign.config import AlignConfig


@dataclass(frozen=True)
class Term:
    """Next-token logits of `model` (0: the main model, 1: DeRa's reference) given the prompt with
    `principle` placed as the plan's `principle_placement` says (`None`: without any principle), weighted by
    `weight`."""

    model: int
    principle: str | None
    weight: float


@dataclass(frozen=True)
class Plan:
    terms: tuple[Term, ...]
    # The term whose context is the sequence's own: logits processors read its tokens as the history, and
    # its distribution gives the plausibility mask and the fallback when the mask leaves nothing.
    anchor: int = 0
    mask_top_p: float | None = None
    # Quality options (AlignConfig): the mask's kind and min-p threshold, the trust region's KL budget, the
    # repeat guard's n-gram size; the defaults leave the paper's step untouched.
    mask_kind: str = "top_p"
    mask_min_p: float = 0.1
    kl_budget: float | None = None
    repeat_guard: int = 0
    # The soft loop penalty (AlignConfig's dry_*; multiplier 0: off), acting on the choice like the guard.
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_breakers: tuple[str, ...] = ()
    # Where the principled terms' contexts tell the principle (linalign.prompts.place_principle).
    principle_placement: str = "system"

    @property
    def models(self) -> tuple[int, ...]:
        return tuple(sorted({t.model for t in self.terms}))

    @property
    def plain(self) -> int | None:
        """The term without any principle, if the plan contrasts against one."""
        return next((k for k, t in enumerate(self.terms) if t.principle is None and len(self.terms) > 1), None)


def _la_terms(config: AlignConfig) -> tuple[list[Term], int]:
    weights = config.resolved_weights()
    principled = [Term(0, p, w) for p, w in zip(config.principles, weights, strict=True) if w != 0]
    plain = Term(0, None, 1.0 - sum(t.weight for t in principled))
    # The anchor is the first principle pulled towards; with none, the plain context.
    positive = [i for i, t in enumerate(principled) if t.weight > 0]
    if plain.weight == 0 and principled:
        return principled, positive[0] if positive else 0
    terms = principled + [plain]
    return terms, positive[0] if positive else len(terms) - 1


def make_plan(config: AlignConfig) -> Plan:
    """Translate an `AlignConfig` into the terms the decode loop evaluates."""
    # The repeat guard and the loop penalty act on any method's choice, so prompting can be compared with them.
    return replace(
        _plan(config),
        repeat_guard=config.repeat_guard,
        dry_multiplier=config.loop_multiplier,
        dry_base=config.dry_base,
        dry_allowed_length=config.dry_allowed_length,
        dry_breakers=tuple(config.dry_breakers),
        principle_placement=config.principle_placement,
    )


def told_principle(config: AlignConfig) -> str | None:
    """The principle text of the methods that tell the model their principles (`prompt`, `amulet`, DeRa's
    shared context): the principles with a positive weight, joined. A principle weighted 0 or below is what
    Linear Alignment pushes away from, never an instruction (`None`: no principle is told)."""
    weights = config.weights if config.weights is not None else [1.0] * len(config.principles)
    told = [p for p, w in zip(config.principles, weights, strict=True) if w > 0]
    return "\n\n".join(told) or None


def _plan(config: AlignConfig) -> Plan:
    principle = told_principle(config)
    if config.method == "base" or (config.method in ("prompt", "amulet") and principle is None):
        return Plan((Term(0, None, 1.0),))
    if config.method == "prompt":
        return Plan((Term(0, principle, 1.0),))
    if config.method == "dera":
        terms = [Term(0, principle, config.lam), Term(1, principle, 1.0 - config.lam)]
        return Plan(tuple(t for t in terms if t.weight != 0) or (terms[0],))
    if config.method == "amulet":
        a, b = config.amulet_coefficients
        terms = [t for t in (Term(0, principle, a), Term(0, None, b)) if t.weight != 0]
        return Plan(tuple(terms))
    terms, anchor = _la_terms(config)
    return Plan(
        tuple(terms),
        anchor,
        config.plausibility_top_p if config.mask_enabled else None,
        mask_kind=config.mask,
        mask_min_p=config.plausibility_min_p,
        kl_budget=config.kl_budget,
    )
