"""st_fast: fused kernels and a fast duplicate-free sampler for sentence-transformers training.

Adopt it by changing one import (``from st_fast import SentenceTransformerTrainer``) or by using the drop-in losses
in :mod:`st_fast.losses`. ``st_fast.native_info()`` tells which compiled parts this installation has.
"""

from __future__ import annotations

import importlib

from st_fast._native import native_info

__version__ = "0.1.0"

__all__ = [
    "MultiVectorEncoderTrainer",
    "NoDuplicatesBatchSampler",
    "SentenceTransformerTrainer",
    "StFastConfig",
    "__version__",
    "is_patched",
    "native_info",
    "patch",
    "unpatch",
]


def __getattr__(name: str):
    # Lazy exports: `import st_fast` stays light (no sentence-transformers import until a sampler, the trainer or
    # patch is asked for).
    if name == "NoDuplicatesBatchSampler":
        from st_fast.sampler import NoDuplicatesBatchSampler

        return NoDuplicatesBatchSampler
    if name in ("SentenceTransformerTrainer", "MultiVectorEncoderTrainer"):
        return getattr(importlib.import_module("st_fast.trainer"), name)
    if name == "StFastConfig":
        return importlib.import_module("st_fast.config").StFastConfig
    if name in ("patch", "unpatch", "is_patched"):
        return getattr(importlib.import_module("st_fast._patching"), name)
    if name in ("losses", "ops"):  # `import st_fast; st_fast.losses.MultipleNegativesRankingLoss(...)`
        return importlib.import_module(f"st_fast.{name}")
    raise AttributeError(f"module 'st_fast' has no attribute {name!r}")
