"""Shared set-up of the GIST parity tests: crafted embeddings, fake encoders, the rank-1 gather simulation and a
second tiny model whose tokenizer differs from MiniLM's (the re-tokenization path)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STOCK_MODULES = (
    "sentence_transformers.sentence_transformer.losses.gist_embed",
    "sentence_transformers.sentence_transformer.losses.cached_gist_embed",
)

# (margin_strategy, margin)
MARGINS = [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.0), ("relative", 0.1)]
# (contrast_anchors, contrast_positives)
CONTRASTS = [(True, True), (False, False), (True, False), (False, True)]


def gist_columns(batch: int, dim: int, guide_dim: int, columns: int, seed: int):
    """(model columns, guide columns), float32, each (batch, dim) / (batch, guide_dim); model columns require grad.

    The guide's anchor-positive coupling runs from negative to strongly positive over the rows, so that the
    thresholds t_i = cos(a'_i, p'_i) include negative values and the guide masks some in-batch entries and keeps
    others (``guide_statistics`` checks it).
    """
    generator = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    model = [anchor] + [
        0.6 * anchor + torch.randn(batch, dim, generator=generator, dtype=torch.float64) for _ in range(columns - 1)
    ]
    anchor_guide = torch.randn(batch, guide_dim, generator=generator, dtype=torch.float64)
    coupling = torch.linspace(-0.8, 2.5, batch, dtype=torch.float64)[torch.randperm(batch, generator=generator)]
    positive_guide = coupling[:, None] * anchor_guide + torch.randn(batch, guide_dim, generator=generator).double()
    guide = [anchor_guide, positive_guide] + [
        0.7 * anchor_guide + torch.randn(batch, guide_dim, generator=generator, dtype=torch.float64)
        for _ in range(columns - 2)
    ]
    return [x.float().requires_grad_() for x in model], [x.float() for x in guide]


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1, eps=1e-8) @ F.normalize(y.double(), dim=-1, eps=1e-8).T


def guide_statistics(guide: list[torch.Tensor], offset: int, strategy: str, margin: float, contrast=(True, True)):
    """(smallest |guide sim - threshold| over the maskable entries, fraction masked, smallest threshold) in float64;
    ``guide`` holds the gathered candidate columns (anchors local)."""
    anchors, candidates = guide[0], guide[1:]
    batch = anchors.shape[0]
    rows = torch.arange(batch)
    ap = _cos(anchors, candidates[0])
    t = ap[rows, offset + rows][:, None]
    threshold = t - margin if strategy == "absolute" else t - t.abs() * margin
    ap[rows, offset + rows] = float("nan")  # the CE target is never masked
    blocks = [ap] + [_cos(anchors, c) for c in candidates[1:]]
    if contrast[0]:
        blocks.append(_cos(anchors, anchors))
    if contrast[1]:
        blocks.append(_cos(candidates[0][offset : offset + batch], candidates[0]))
    gaps = torch.cat([(b - threshold).flatten() for b in blocks])
    gaps = gaps[~gaps.isnan()]
    return float(gaps.abs().min()), float((gaps > 0).double().mean()), float(threshold.min())


class PrecomputedEncoder(nn.Module):
    """Stand-in for a SentenceTransformer (as upstream's GIST tests): ``features["column"]`` selects one of the
    precomputed ``columns`` as the sentence embedding. Has the tokenizer and max_seq_length GIST checks."""

    def __init__(self, tokenizer, max_seq_length: int = 32) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.columns: list[torch.Tensor] = []
        self.identity = nn.Identity()

    def __getitem__(self, index: int) -> nn.Module:
        return self.identity

    def forward(self, features: dict) -> dict:
        features["sentence_embedding"] = self.columns[int(features["column"])]
        return features


def column_features(columns: int) -> list[dict]:
    return [{"column": torch.tensor(j)} for j in range(columns)]


class FakeGather:
    """``all_gather_with_grad`` as seen by rank 1 of 2: rank 0's block of the gathered tensor, found by value
    (stock GIST and CachedGIST gather model and guide candidates in different orders), then the local tensor."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = [(local.detach().double(), other.detach()) for local, other in pairs]
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        for local, other in self.pairs:
            if local.shape == tensor.shape and torch.equal(local, tensor.detach().double()):
                return torch.cat([other.to(tensor.dtype), tensor], dim=0)
        raise AssertionError("gathered a tensor that is not one of the candidate columns")


def simulate_rank1(monkeypatch, gather: FakeGather) -> None:
    """Rank 1 of 2 as stock sees it; the fused losses look their helpers up in the same stock modules."""
    for name in STOCK_MODULES:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "all_gather_with_grad", gather)
        monkeypatch.setattr(module, "get_rank", lambda: 1)


def permuted_vocab_model(minilm_path: str, target: Path, *, hidden_size: int = 32, seed: int = 1):
    """A tiny random BERT + mean pooling SentenceTransformer whose WordPiece vocabulary lists MiniLM's tokens in
    another order (word pieces reversed, special tokens kept): a different ``get_vocab()``, so GIST must re-tokenize
    for it as a guide. Offline and small: MiniLM's tokenizer files with a permuted vocab.txt (the fast tokenizer is
    rebuilt from it; tokenizer.json is left out) and a freshly initialized 2-layer BERT saved next to them."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    source = Path(minilm_path)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, target / name)
    tokens = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    head = 1000  # [PAD], [unusedN], [UNK], [CLS], [SEP], [MASK] keep their ids; every other token still exists
    (target / "vocab.txt").write_text("\n".join(tokens[:head] + tokens[head:][::-1]) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokens), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden_size, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(target)
    transformer = Transformer(str(target), max_seq_length=32)
    return SentenceTransformer(modules=[transformer, Pooling(hidden_size, pooling_mode="mean")], device="cpu")
