"""What the installed sentence-transformers does where supported versions differ (6.0.x, 6.2.x, 6.3.x), decided by
running the stock code, so tests compare st_fast with the stock behaviour of the version under test."""

from __future__ import annotations

import torch
from datasets import Dataset
from sentence_transformers.base.sampler import NoDuplicatesBatchSampler as StockSampler
from torch.utils.data import ConcatDataset


def multi_sampler_forwards_set_epoch(multi_cls: type) -> bool:
    """Whether the stock multi-dataset sampler ``multi_cls`` passes ``set_epoch`` on to its per-dataset samplers
    (RoundRobinBatchSampler: from 6.1 on; before, its children keep epoch 0 and repeat their order every epoch)."""
    data = Dataset.from_dict({"text": [f"t{i}" for i in range(8)]})
    children = [StockSampler(data, batch_size=2, drop_last=False) for _ in range(2)]
    multi = multi_cls(ConcatDataset([data, data]), batch_samplers=children, generator=torch.Generator())
    multi.set_epoch(3)
    return all(child.epoch == 3 for child in children)


def shrink_normalizes_16bit_in_float32() -> bool:
    """Whether stock MatryoshkaLoss's ``shrink`` normalizes float16 / bfloat16 embeddings in float32 and casts back
    (sentence-transformers >= 6.3), rather than in their own dtype (before)."""
    import torch.nn.functional as F
    from sentence_transformers.sentence_transformer.losses import matryoshka

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).half()
    in_float32 = F.normalize(x[..., :40].float(), p=2, dim=-1).half()
    return torch.equal(matryoshka.shrink(x, 40), in_float32) and not torch.equal(
        in_float32, F.normalize(x[..., :40], p=2, dim=-1)
    )


def matryoshka_decorates_a_wrapped_cached_loss(model) -> bool:
    """Whether stock MatryoshkaLoss accepts a loss that reports gradient caching but only wraps the cached loss (here
    another MatryoshkaLoss), decorating the ``calculate_loss`` of the cached loss inside
    (``gradcache.resolve_gradient_cache_loss``: sentence-transformers >= 6.3); before, it looks ``calculate_loss`` up
    on the wrapper itself and fails."""
    from sentence_transformers.sentence_transformer import losses

    cached = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    wrapper = losses.MatryoshkaLoss(model, cached, [8])
    try:
        losses.MatryoshkaLoss(model, wrapper, [8])
    except AttributeError:
        return False
    return True


def matryoshka_accepts_dims_above_the_truncate_dim(model) -> bool:
    """Whether stock MatryoshkaLoss checks ``matryoshka_dims`` against the model's untruncated embedding dimension
    (``_get_untruncated_embedding_dimension``: sentence-transformers >= 6.3), so that a model with a smaller
    ``truncate_dim`` still trains its full dimension; before, ``get_embedding_dimension()`` (the truncated one)."""
    from sentence_transformers.sentence_transformer import losses

    full = model.get_embedding_dimension()
    saved = model.truncate_dim
    model.truncate_dim = full // 2
    try:
        losses.MatryoshkaLoss(model, losses.MultipleNegativesRankingLoss(model), [full, full // 2])
    except ValueError:
        return False
    finally:
        model.truncate_dim = saved
    return True
