"""Amulet (Zhang et al., ICLR 2025, arXiv 2502.19148): per-token online optimisation between the
principled distribution `pi_p` and the plain one `pi_0`, as the authors' code iterates it:

    log pi_1     = log pi_p
    u_t          = alpha (log pi_t - log pi_0)                                   (utility of iterate t)
    log pi_{t+1} = [lambda log pi_1 + (1/t) sum_{i<=t} u_i + log pi_t / (eta t)] / (lambda + 1/(eta t))

renormalised after every step; the token is taken from the last iterate. Every step is affine in
`(log pi_p, log pi_0)` up to a per-row constant, and softmax ignores such constants, so the last iterate is
exactly `a log pi_p + b log pi_0` (with `a + b = 1`): two scalars found by running the recursion on the
coefficients instead of the vocabulary. Amulet is therefore one more weighting of the same two contexts
that Linear Alignment uses, at the cost of plain Linear Alignment.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=256)  # a server asks for the same few settings request after request
def amulet_weights(iterations: int, eta: float, alpha: float, lam: float) -> tuple[float, float]:
    """Coefficients `(a, b)` of `log pi_p` and `log pi_0` in Amulet's final iterate."""
    a, b = 1.0, 0.0  # pi_1 = pi_p
    utility_a = utility_b = 0.0  # running sum of the utilities' coefficients
    for t in range(1, iterations + 1):
        utility_a += alpha * a
        utility_b += alpha * (b - 1.0)
        denominator = lam + 1.0 / (eta * t)
        a = (lam + utility_a / t + a / (eta * t)) / denominator
        b = (utility_b / t + b / (eta * t)) / denominator
    return a, b
