"""Configuration objects: how to decode (`DecodeConfig`) and how to align (`AlignConfig`).

Both validate on construction so that bad input fails before any model work, with a message
that names the value and the rule. Their knobs, and each knob's own rule, are declared in `linalign.params`;
the rules that relate several knobs are here.

The sampling rule, the same for the API, the CLI, the server and the evaluation: decoding is greedy unless
`temperature > 0`; then it samples at that temperature. `top_p`, `top_k` and `seed` shape sampling only and
are ignored (reset to their neutral values) under greedy decoding, where the plausibility mask is computed at
temperature 1.
"""

from __future__ import annotations

from dataclasses import field

from linalign.amulet import amulet_weights
from linalign.errors import LinalignError
from linalign.params import (
    ALIGN,
    DECODE,
    DRY_BREAKERS,
    MASKS,
    MAX_SEED,
    METHOD,
    METHODS,
    PRESETS,
    check,
    check_all,
    configured,
)

__all__ = ["DRY_BREAKERS", "MASKS", "METHODS", "AlignConfig", "DecodeConfig", "row_seed"]


def row_seed(seed: int | None, row: int) -> int | None:
    """Row `row`'s own sampling seed: `seed + row`, so a row's sample never depends on its companions."""
    return None if seed is None else (seed + row) % MAX_SEED


@configured(DECODE)
class DecodeConfig:
    """Decoding parameters (`linalign.params.DECODE`), with the meaning they have in
    `transformers.GenerationConfig`; see the module docstring for when decoding samples. `logprobs` asks for the
    log-probability of each chosen token and that many top alternatives (0: the chosen token's only)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check_all(vars(self), DECODE)
        if self.min_new_tokens > self.max_new_tokens:
            raise LinalignError(
                f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens!r}",
                param="min_new_tokens",
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LinalignError("stop strings must be non-empty strings", param="stop")
        if not self.do_sample:  # the sampling rule: these shape sampling only
            self.top_p, self.top_k, self.seed = 1.0, 0, None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def mask_temperature(self) -> float:
        """Temperature of the distribution the plausibility mask is taken from."""
        return self.temperature if self.do_sample else 1.0


@configured(ALIGN)
class AlignConfig:
    """Which method to decode with and its strength.

    - `base`: the prompt without any principle, plain decoding.
    - `prompt`: the principle told to the model (as system message by default), plain decoding.
    - `la`: Linear Alignment, `l_0 + sum_i c_i (l_{p_i} - l_0)` with `c_i = w_i (1 + ratio)`; one principle
      with weight 1 (the default) is the paper's `l_p + ratio (l_p - l_0)`. Weights scale the ratio per
      principle; below zero they push away from a principle.
    - `dera`: `lam * l_aligned + (1 - lam) * l_ref` across two models that share a vocabulary.
    - `amulet`: per-token online optimisation between the principled and plain distributions
      (`amulet_iterations`, learning rate `amulet_eta`, reward scale `amulet_alpha`, multiplier `amulet_lambda`;
      the authors' defaults).

    Options that trade compliance for fluent text (docs/quality.md); their defaults are the paper's recipe, but for
    the loop penalty that `preset` gives Linear Alignment:

    - `kl_budget`: a per-token trust region. Each token uses the largest fraction `s` (on a grid of 1/64) of
      the contrast, `l_p + s (l - l_p)`, whose distribution stays within `kl_budget` nats of the principled
      one, `KL(pi_s || pi_p) <= kl_budget` on the mask's support: full strength where the principle and the
      text agree, less where it would break the sentence. Linear Alignment only.
    - `repeat_guard`: n; a token that would repeat an n-gram the reply already contains is excluded from the
      aligned choice (0: off), so greedy decoding cannot loop.
    - `dry_multiplier`, `dry_base`, `dry_allowed_length`, `dry_breakers`: the soft loop penalty (DRY; 0: off).
      A token that would extend a repeat of an earlier span of the reply that is already `dry_allowed_length`
      tokens or longer (length L) loses `dry_multiplier * dry_base ** (L - dry_allowed_length)` from the
      combined logits and from the distribution the mask is taken from; matches stop at tokens containing a
      breaker, and a newline only where the line it closes is not a whole repeat (`linalign.step.LoopPenalty`).
      Any method.
    - `mask`: the plausibility mask's kind: "top_p" (the paper: the principled distribution's nucleus at
      `plausibility_top_p`), "min_p" (tokens with at least `plausibility_min_p` times the principled
      distribution's top probability) or "intersect" (the principled nucleus within the plain
      distribution's nucleus, the principled top token always kept).
    - `principle_placement`: where every principled context tells its principle: "system" (the system message,
      the paper's), "user" (prefixed to the last user turn, nearest the question) or "both"
      (`linalign.prompts.place_principle`). The plain context never holds it. Any method that reads principles.

    `preset`: what Linear Alignment runs with where `dry_multiplier` is left unset: "default" adds the loop
    penalty at multiplier 2 (DRY's base, allowed length and breakers), which on the built-in model passed the rule
    of docs/quality.md on both principle sets, greedy and sampled, and on the structured suite; "paper" is the
    authors' recipe exactly.

    Principles must not be blank: a blank one is an error wherever it comes from. `principles=None` makes a
    configuration whose principles come with each prompt (`Aligner.generate(principles=...)`: eval's runs).
    """

    method: str = "la"
    principles: list[str] | None = field(default_factory=list)  # None: given with each prompt (eval's runs)

    def __post_init__(self) -> None:
        check(METHOD, self.method)
        if isinstance(self.principles, str):
            self.principles = [self.principles]
        if isinstance(self.dry_breakers, str):
            self.dry_breakers = [self.dry_breakers]
        check_all(vars(self), ALIGN)
        if self.principles is not None:
            self._check_principles()
        self._check_quality_options()

    def _check_principles(self) -> None:
        for i, p in enumerate(self.principles):
            if not isinstance(p, str) or not p.strip():
                raise LinalignError(
                    f"principle {i + 1} is blank; give a non-empty text or leave it out", param="principles"
                )
        if self.method in ("prompt", "la", "amulet") and not self.principles:
            raise LinalignError(f"method {self.method!r} needs a principle", param="principles")
        if self.method == "amulet" and len(self.principles) > 1:
            raise LinalignError(f"method 'amulet' takes one principle, got {len(self.principles)}", param="principles")
        if self.weights is not None and len(self.weights) != len(self.principles):
            raise LinalignError(
                f"got {len(self.weights)} weights for {len(self.principles)} principles; give one weight each",
                param="weights",
            )

    def _check_quality_options(self) -> None:
        if self.kl_budget is not None and self.method != "la":
            raise LinalignError(
                f"kl_budget applies to Linear Alignment (method 'la'), not {self.method!r}", param="kl_budget"
            )
        if self.kl_budget is not None and not self.mask_enabled:
            raise LinalignError(
                "kl_budget is measured on the plausibility mask's tokens; it needs a plausibility_top_p in "
                f"(0, 1), got {self.plausibility_top_p!r}",
                param="kl_budget",
            )
        if self.repeat_guard == 1:
            raise LinalignError("repeat_guard must be 0 (off) or an n-gram size >= 2, got 1", param="repeat_guard")
        if self.mask != "top_p" and not self.mask_enabled:
            raise LinalignError(
                f"mask {self.mask!r} contradicts plausibility_top_p={self.plausibility_top_p!r}, which turns the "
                "mask off; give a plausibility_top_p in (0, 1) or leave the mask at 'top_p'",
                param="mask",
            )
        if self.mask == "intersect" and self.method != "la":
            raise LinalignError(
                f"mask 'intersect' needs the plain context of Linear Alignment, not {self.method!r}", param="mask"
            )
        self.dry_breakers = list(self.dry_breakers)
        if len(self.dry_breakers) > 16 or any(
            not isinstance(b, str) or not b or len(b) > 16 for b in self.dry_breakers
        ):
            raise LinalignError(
                "dry_breakers must be at most 16 non-empty strings of at most 16 characters", param="dry_breakers"
            )

    @property
    def quality_options(self) -> dict[str, float | int | str]:
        """The quality options set away from the paper's recipe, for labels and records."""
        options: dict[str, float | int | str] = {}
        if self.kl_budget is not None:
            options["kl"] = self.kl_budget
        if self.repeat_guard:
            options["guard"] = self.repeat_guard
        if self.mask == "min_p":
            options["mask"] = f"min_p{self.plausibility_min_p:g}"
        elif self.mask != "top_p":
            options["mask"] = self.mask
        if self.loop_multiplier:
            options["dry"] = self.dry_label
        if self.principle_placement != "system":
            options["placement"] = self.principle_placement
        return options

    @property
    def loop_multiplier(self) -> float:
        """The loop penalty's multiplier that decoding uses: `dry_multiplier` where given, else the preset's for
        Linear Alignment and 0 for the other methods. Resolved here, not stored, so that `dataclasses.replace`
        with another preset or method resolves again."""
        if self.dry_multiplier is not None:
            return self.dry_multiplier
        return PRESETS[self.preset] if self.method == "la" else 0.0

    @property
    def dry_label(self) -> str:
        """'0.8' at DRY's base, allowed length and breakers; '0.8/b2/a4/breakers=\\n|:' where they differ."""
        parts = [f"{self.loop_multiplier:g}"]
        if self.dry_base != 1.75:
            parts.append(f"b{self.dry_base:g}")
        if self.dry_allowed_length != 2:
            parts.append(f"a{self.dry_allowed_length}")
        if tuple(self.dry_breakers) != DRY_BREAKERS:
            parts.append("breakers=" + "|".join(b.encode("unicode_escape").decode() for b in self.dry_breakers))
        return "/".join(parts)

    def resolved_weights(self) -> list[float]:
        """Each principle's coefficient `c_i = w_i (1 + ratio)` in Linear Alignment."""
        weights = self.weights if self.weights is not None else [1.0] * len(self.principles)
        return [w * (1.0 + self.ratio) for w in weights]

    @property
    def amulet_coefficients(self) -> tuple[float, float]:
        return amulet_weights(self.amulet_iterations, self.amulet_eta, self.amulet_alpha, self.amulet_lambda)

    @property
    def strength(self) -> dict[str, float | list[float] | None]:
        """The knobs a user turned, for records: `lam` for DeRa, `iterations` for Amulet, else `ratio`
        (0 for plain prompting) and, where given, the principles' `weights`."""
        if self.method == "dera":
            return {"lam": self.lam}
        if self.method == "amulet":
            return {"iterations": self.amulet_iterations}
        strength: dict = {"ratio": {"base": None, "prompt": 0.0}.get(self.method, self.ratio)}
        if self.method == "la" and self.weights is not None:
            strength["weights"] = list(self.weights)
        return strength

    @property
    def label(self) -> str:
        """'prompt', 'la ratio=2', 'la ratio=2 weights=1,-0.5', 'dera lam=0.5', 'prompt placement=user': the method,
        its strength and its quality options."""
        strength = {} if self.method in ("base", "prompt") else self.strength
        parts = [
            f"{k}=" + (",".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}") for k, v in strength.items()
        ]
        parts += [f"{k}={v:g}" if not isinstance(v, str) else f"{k}={v}" for k, v in self.quality_options.items()]
        return " ".join([self.method, *parts])

    @property
    def mask_enabled(self) -> bool:
        return 0 < self.plausibility_top_p < 1
