"""Align a language model with a principle at decoding time: Linear Alignment, DeRa and friends."""

from linalign.config import AlignConfig, DecodeConfig
from linalign.engine import Aligner
from linalign.errors import LinalignError
from linalign.generation import Generation, TextDelta
from linalign.hf import LinearAlignmentLogitsProcessor
from linalign.models import LoadedModel, load_model

__all__ = [
    "AlignConfig",
    "Aligner",
    "DecodeConfig",
    "Generation",
    "LinalignError",
    "LinearAlignmentLogitsProcessor",
    "LoadedModel",
    "TextDelta",
    "load_model",
]
