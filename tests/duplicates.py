"""Test helpers of mask_duplicates: the PyTorch reference (stock's MNRL math on an explicit score matrix, with the
duplicate entries set to -inf) and batches whose texts repeat among anchors, positives and hard negatives."""

from __future__ import annotations

import torch

from st_fast.ops.layout import DIRECTION_TO_KIND


def reference_masked_loss(
    queries: torch.Tensor,
    docs: list[torch.Tensor],
    labels: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    row_offset: int = 0,
    batch_size: int | None = None,
    scale: float = 20.0,
    similarity: str = "cos",
    directions: tuple[str, ...] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
) -> torch.Tensor:
    """sentence-transformers 6.2's MultipleNegativesRankingLoss.compute_loss_from_embeddings, for the gathered
    operands queries (W, D) and docs k x (W, D) and the local rows row_offset .. row_offset + batch_size, with
    mask_duplicates' rule on top (None: stock's loss): entry (i, c) of a direction's score matrix is -inf when
    label[c] == label[g] and c != g, label being the query labels for query_to_query / doc_to_query, the doc labels
    for query_to_doc / doc_to_doc (st_fast/ops/layout.py). Computed in the embeddings' dtype."""
    assert set(directions) <= set(DIRECTION_TO_KIND)
    width = queries.shape[0]
    batch_size = width if batch_size is None else batch_size
    local = torch.arange(row_offset, row_offset + batch_size)
    rows = torch.arange(batch_size)

    def sim(a, b):
        if similarity == "cos":
            a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
        return a @ b.T

    docs_all = torch.cat(docs)
    positives = docs[0][local]
    matrices = {"query_to_doc": sim(queries[local], docs_all)}
    if "query_to_query" in directions:
        matrices["query_to_query"] = sim(queries[local], queries)
        matrices["query_to_query"][rows, local] = -torch.inf
    if "doc_to_query" in directions:
        matrices["doc_to_query"] = sim(positives, queries)
    if "doc_to_doc" in directions:
        matrices["doc_to_doc"] = sim(positives, docs_all)
        own = torch.eye(width, dtype=torch.bool)[local].repeat(1, len(docs))
        matrices["doc_to_doc"] = matrices["doc_to_doc"].masked_fill(own, -torch.inf)
    penalty = None
    if hardness_mode is not None and hardness_strength > 0.0:
        penalty = hardness_strength * matrices["query_to_doc"].detach()
        own = torch.eye(width, dtype=torch.bool)[local].repeat(1, len(docs))
        if hardness_mode == "hard_negatives":
            exclude = ~own
            exclude[:, :width] = True
        elif hardness_mode == "in_batch_negatives":
            exclude = own
        else:
            exclude = own.clone()
            exclude[:, width:] = False
        penalty = penalty.masked_fill(exclude, 0.0)
    logits = {key: value * scale for key, value in matrices.items()}
    if penalty is not None:
        logits["query_to_doc"] = logits["query_to_doc"] + penalty
    if labels is not None:
        query_labels, doc_labels = labels
        for key in logits:
            column_labels = query_labels if key in ("query_to_query", "doc_to_query") else doc_labels
            columns = torch.arange(column_labels.shape[0])
            duplicate = (column_labels[None, :] == column_labels[local][:, None]) & (columns[None, :] != local[:, None])
            logits[key] = logits[key].masked_fill(duplicate, -torch.inf)
    positive = logits["query_to_doc"][rows, local]
    ordered = [logits[d] for d in ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc") if d in logits]
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(ordered, dim=1), dim=1)
    else:
        log_z = sum(torch.logsumexp(x, dim=1) for x in ordered) / len(ordered)
    return (log_z - positive).mean()


def duplicate_texts(width: int, k: int, *, seed: int, pool: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(query texts (W,), doc texts (k·W,)) int64 text ids drawn from a small pool (default about (k+1)·W/2 texts,
    so that many repeat), with row 0's first hard negative equal to its own positive (k >= 2), a positive repeated in
    another row's positive and an anchor repeated (W >= 3)."""
    generator = torch.Generator().manual_seed(seed)
    pool = pool or max(2, (k + 1) * width // 2)
    queries = torch.randint(0, pool, (width,), generator=generator)
    docs = torch.randint(0, pool, (k * width,), generator=generator)
    if width >= 3:
        queries[2] = queries[0]
        docs[2] = docs[1]
    if k >= 2:
        docs[width] = docs[0]
    return queries, docs


def embeddings_of_texts(texts: torch.Tensor, dim: int, *, seed: int, dtype=torch.float32) -> torch.Tensor:
    """One random embedding per text id (equal texts: equal rows; norm about 1, so that dot-product logits do not
    saturate), as a leaf that requires grad."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(int(texts.max()) + 1, dim, generator=generator, dtype=torch.float64) / dim**0.5
    return table[texts].to(dtype).requires_grad_()


def duplicate_batch(width: int, k: int, dim: int, *, seed: int, dtype=torch.float32):
    """(queries (W, D), docs k x (W, D), (query labels, doc labels)) for :func:`duplicate_texts`: equal texts have
    equal embeddings and labels; the labels are the text ids themselves (one label space)."""
    query_texts, doc_texts = duplicate_texts(width, k, seed=seed)
    queries = embeddings_of_texts(query_texts, dim, seed=seed + 1, dtype=dtype)
    table = embeddings_of_texts(doc_texts, dim, seed=seed + 2, dtype=dtype).detach()
    docs = [table[j * width : (j + 1) * width].clone().requires_grad_() for j in range(k)]
    return queries, docs, (query_texts, doc_texts)
