"""Recognizing the similarity functions the fused kernels implement, and the one-time fallback warning."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from sentence_transformers import util

logger = logging.getLogger(__name__)

_FUSED_SIMILARITIES: dict[Callable, str] = {util.cos_sim: "cos", util.dot_score: "dot"}
_warned: set[tuple[str, str]] = set()


def fused_similarity_name(similarity_fct: Callable) -> str | None:
    """``"cos"`` / ``"dot"`` for sentence-transformers' cos_sim / dot_score (or an argument-free partial of them),
    None for anything else (which the fused losses leave to the stock implementation)."""
    while isinstance(similarity_fct, functools.partial) and not similarity_fct.args and not similarity_fct.keywords:
        similarity_fct = similarity_fct.func
    try:
        return _FUSED_SIMILARITIES.get(similarity_fct)
    except TypeError:  # unhashable callable objects
        return None


def warn_fallback_once(loss_name: str, similarity_fct: Callable) -> None:
    key = (loss_name, util.similarity_fct_name(similarity_fct) if hasattr(util, "similarity_fct_name") else "")
    if key in _warned:
        return
    _warned.add(key)
    logger.warning(
        "st_fast %s: similarity_fct=%s has no fused kernel (only cos_sim and dot_score do); "
        "using the stock sentence-transformers computation for this loss.",
        loss_name,
        key[1] or repr(similarity_fct),
    )
