"""``mask_duplicates`` of the drop-in MNRL-family losses: the option, the texts of the call being computed and their
labels for the fused op (see :mod:`st_fast.ops.layout` for the rule and :mod:`st_fast.ops.text_labels` for the
labels).

The loss's ``forward`` receives the features (token ids) before the model embeds them: :func:`remembering_texts`
keeps the texts of that call (one (M, L) int64 matrix, :func:`st_fast.ops.text_labels.token_rows`) on the loss for
the duration of the call, and the loss stage (``compute_loss_from_embeddings`` or the cached ``calculate_loss``, also
when a wrapper such as MatryoshkaLoss calls it several times per call) takes their labels with :func:`batch_labels`.
With ``gather_across_devices`` the texts are gathered like the embeddings (every rank's token ids, padded to the
longest, through the stock module's ``all_gather_with_grad``; no gradient) and every rank computes the labels of all
W·(k+1) texts, so that equal texts on different ranks are masked too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from st_fast.losses.stock_contract import BoolOption
from st_fast.ops.text_labels import exact_labels, text_keys, token_rows

_TEXTS = "_st_fast_texts"  # the loss __dict__ entry holding the current call's token rows
_OPTION = "_st_fast_mask_duplicates"


class MaskDuplicatesOption(BoolOption):
    """The ``mask_duplicates`` attribute of the fused MNRL-family losses: a bool, False until set (also on instances
    built without ``__init__``, e.g. by :func:`st_fast.losses.fuse`), stored under a private name."""

    def __init__(self) -> None:
        super().__init__("mask_duplicates", _OPTION, False)


@contextlib.contextmanager
def remembering_texts(loss: Any, sentence_features: Sequence[dict[str, torch.Tensor]]) -> Iterator[None]:
    """Keep the texts of ``sentence_features`` (the loss's input columns) on ``loss`` while the block runs.
    Raises ValueError for features without ``input_ids`` (:func:`st_fast.ops.text_labels.token_rows`)."""
    previous = loss.__dict__.get(_TEXTS)
    loss.__dict__[_TEXTS] = token_rows(sentence_features)
    try:
        yield
    finally:
        if previous is None:
            loss.__dict__.pop(_TEXTS, None)
        else:
            loss.__dict__[_TEXTS] = previous


def batch_labels(
    loss: Any,
    batch_size: int,
    columns: int,
    device: torch.device,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query labels (W,), doc labels ((columns - 1)·W,)) int64 on ``device`` for the current call's texts, W = B
    times the number of ranks when ``gather`` (the stock all-gather) is given, else B.

    Raises:
        RuntimeError: no texts are known (the loss stage was called directly, e.g.
            ``compute_loss_from_embeddings``, instead of through the loss's ``forward`` with the features).
        ValueError: the texts do not match the embeddings (another number of columns or rows).
    """
    rows = loss.__dict__.get(_TEXTS)
    if rows is None:
        raise RuntimeError(
            "mask_duplicates compares the texts' token ids, which the loss only sees in forward(sentence_features, "
            "labels); call the loss itself, not compute_loss_from_embeddings / calculate_loss, or set "
            "mask_duplicates=False"
        )
    if rows.shape[0] != columns * batch_size:
        raise ValueError(
            f"mask_duplicates: the features hold {rows.shape[0]} texts, the embeddings {columns} columns of "
            f"{batch_size} rows"
        )
    rows = rows.to(device)
    if gather is not None:
        longest = int(gather(torch.tensor([rows.shape[1]], device=device)).max())
        rows = torch.nn.functional.pad(rows, (0, longest - rows.shape[1]), value=-1)
        gathered = gather(rows)  # (world · columns · B, L), rank-major
        world = gathered.shape[0] // rows.shape[0]
        rows = gathered.view(world, columns, batch_size, longest).transpose(0, 1).reshape(-1, longest)
    labels = exact_labels(rows, text_keys(rows))
    width = rows.shape[0] // columns
    return labels[:width], labels[width:]
