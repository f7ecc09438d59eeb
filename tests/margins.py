"""Comparing results of different kernels (another CPU's llama.cpp build, another backend, another batch shape
on `transformers`): logits agree within a tolerance, and tokens only where the reference decided by more than it.

Bit-for-bit equality is asserted only between runs of one kernel on one machine; everything else goes through
these helpers, so the suite holds on any x86 CPU.
"""

from __future__ import annotations

import torch


def decided(reference: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Rows whose top-2 logit margin exceeds `2 * tolerance`: any logits within `tolerance` of them pick the
    same token."""
    top = reference.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) > 2 * tolerance


def assert_close_and_same_where_decided(reference: torch.Tensor, other: torch.Tensor, tolerance: float) -> None:
    difference = (reference.float() - other.float()).abs().max().item()
    assert difference <= tolerance, f"logits differ by {difference:.3g}, more than {tolerance}"
    keep = decided(reference, tolerance)
    assert torch.equal(reference.argmax(-1)[keep], other.argmax(-1)[keep])
