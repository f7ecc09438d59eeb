"""What linalign leaves as it found it: torch's and transformers' globals when it is imported, and the user's
model between linalign's own calls."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from linalign import AlignConfig, Aligner, DecodeConfig, kernels

SNAPSHOT = """
import os
import torch
import torch._dynamo.config
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import logging as hf_logging

def snapshot():
    return {
        "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "default dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul precision": torch.get_float32_matmul_precision(),
        "dynamo config": repr(sorted(torch._dynamo.config.get_config_copy().items())),
        "nn.Linear.forward": nn.Linear.forward,
        "F.linear": F.linear,
        "attention functions": sorted(AttentionInterface._global_mapping),
        "attention masks": sorted(AttentionMaskInterface._global_mapping),
        "transformers verbosity": hf_logging.get_verbosity(),
        "transformers progress bars": hf_logging.is_progress_bar_enabled(),
        "environment": dict(os.environ),
    }

before = snapshot()
import linalign, linalign.cli, linalign.serve.app, linalign.backends.compiled, linalign.backends.row_attention
after = snapshot()
changed = [name for name in before if before[name] != after[name]]
assert not changed, changed
"""


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: seconds
def test_importing_linalign_changes_no_global_of_torch_or_transformers():
    subprocess.run([sys.executable, "-c", SNAPSHOT], check=True)


def test_the_users_model_is_routed_during_linalign_steps_only(tiny, monkeypatch):
    """The batch-invariant products reach the model's linear layers while a step runs, and the layers are the
    user's own again once the call returns."""
    calls: list[int] = []
    original = kernels.transposed_linear

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "transposed_linear", counting)
    monkeypatch.setenv("LINALIGN_KERNEL", "transposed")
    align = AlignConfig(method="la", principles=["Answer in lowercase letters only."])
    Aligner(tiny).generate(["Name a fruit."], align, DecodeConfig(max_new_tokens=4, min_new_tokens=4))
    assert calls  # the steps took the routed products
    assert not [name for name, module in tiny.model.named_modules() if "forward" in vars(module)]
