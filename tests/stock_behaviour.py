"""What the installed sentence-transformers does where supported versions differ (6.0.x vs 6.2.x), decided by
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
