"""Recognizing the similarity functions the fused MNRL kernels implement."""

from __future__ import annotations

import functools
from collections.abc import Callable

from sentence_transformers import util

_FUSED_SIMILARITIES: dict[Callable, str] = {util.cos_sim: "cos", util.dot_score: "dot"}


def fused_similarity_name(similarity_fct: Callable) -> str | None:
    """``"cos"`` / ``"dot"`` for sentence-transformers' cos_sim / dot_score (or an argument-free partial of them),
    None for anything else (which the fused losses leave to the stock implementation)."""
    while isinstance(similarity_fct, functools.partial) and not similarity_fct.args and not similarity_fct.keywords:
        similarity_fct = similarity_fct.func
    try:
        return _FUSED_SIMILARITIES.get(similarity_fct)
    except TypeError:  # unhashable callable objects
        return None
