"""What sentence-transformers 6.3 changed in the parts st_fast wraps (MatryoshkaLoss's ``shrink`` and its decoration
of a cached loss inside a wrapper, ``gradcache.uses_gradient_cache``, the label column of the batch samplers, the
trainer's loss components under an evaluation's ``metric_key_prefix``, the ``activation_checkpointing`` argument),
each checked against the installed stock code: st_fast must do what the installed version does, whichever it is
(the tests pass under 6.0.1, 6.2.0 and 6.3.0; where versions differ, :mod:`stock_behaviour` asks the stock code).
GIST / CachedGIST's self-negatives and the multi-vector losses are tested elsewhere.
"""

from __future__ import annotations

import dataclasses

import pytest
import stock_behaviour
import torch
import torch.nn.functional as F
from conftest import make_splade_model, make_tiny_model
from datasets import Dataset
from parity import relative_error, train_step
from sentence_transformers import SentenceTransformerTrainer as StockTrainer
from sentence_transformers.base.losses import gradcache
from sentence_transformers.sentence_transformer import losses as stock_losses
from sentence_transformers.sentence_transformer.losses import matryoshka as stock_matryoshka
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from torch import nn
from transformers import TrainerCallback

import st_fast
from st_fast import losses as fast_losses
from st_fast.losses import fuse
from st_fast.losses.cached_multiple_negatives_ranking import FusedCachedLossStageMixin
from st_fast.losses.multiple_negatives_ranking import FusedMNRLMixin
from st_fast.sampler import NoDuplicatesBatchSampler

TEXTS = [
    ["a cat sat on the mat", "dogs bark at night", "rain is expected today", "tea is hot", "the sun is out", "we sing"],
    ["a kitten sits", "a dog is barking", "it will rain", "a hot drink", "sunny weather", "a song"],
]
DIMS = (32, 16, 8)


@pytest.fixture(autouse=True)
def _always_unpatched():
    yield
    st_fast.unpatch()


@pytest.fixture
def fused_calls(monkeypatch) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The embeddings every fused MNRL-family op call receives (queries, candidate columns), detached copies."""
    calls = []
    original = FusedMNRLMixin.fused_loss

    def recording(self, queries, docs):
        calls.append((queries.detach().clone(), [doc.detach().clone() for doc in docs]))
        return original(self, queries, docs)

    monkeypatch.setattr(FusedMNRLMixin, "fused_loss", recording)
    return calls


# ---------------------------------------------------------------------------------------------------------------------
# MatryoshkaLoss: `shrink` of 16-bit embeddings (6.3: normalized in float32, then cast back)
# ---------------------------------------------------------------------------------------------------------------------

MATRYOSHKA = {
    "mnrl": lambda m: stock_losses.MatryoshkaLoss(m, stock_losses.MultipleNegativesRankingLoss(m), DIMS),
    # one mini-batch: the cached embeddings are those of one forward of the batch
    "cmnrl": lambda m: stock_losses.MatryoshkaLoss(
        m, stock_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=64), DIMS
    ),
    "cmnrl-mini-batches": lambda m: stock_losses.MatryoshkaLoss(
        m, stock_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=2), DIMS
    ),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", MATRYOSHKA)
def test_matryoshka_shrinks_16bit_embeddings_as_the_installed_stock(minilm_path, dtype, name, fused_calls,
                                                                    monkeypatch):  # fmt: skip
    """A 16-bit model under MatryoshkaLoss through ``fuse()``: the fused op computes on exactly what the installed
    stock ``shrink`` returned (6.3 normalizes in float32, 6.2 in the 16-bit dtype), and the loss and gradients are
    stock's (within stock's own 16-bit error)."""
    shrunk = []  # (input, dim, output) of every call of the installed shrink, looked up where stock looks it up
    original_shrink = stock_matryoshka.shrink

    def recording_shrink(tensor, dim):
        out = original_shrink(tensor, dim)
        if tensor.dim() == 2:  # sentence embeddings (6.0 also shrinks the token embeddings)
            shrunk.append((tensor.detach().clone(), dim, out.detach().clone()))
        return out

    monkeypatch.setattr(stock_matryoshka, "shrink", recording_shrink)
    model = make_tiny_model(minilm_path).to(dtype)
    model.eval()  # the embeddings of every run are the same
    features = [model.preprocess(column) for column in TEXTS]
    stock = MATRYOSHKA[name](model)
    fused = fuse(stock)
    assert type(fused.loss).__module__.startswith("st_fast.losses")
    loss, grads = train_step(model, fused, features)

    # the calls of the step itself (rows of the batch), in order: one per dimension, after that dimension's shrinks
    calls = [(queries, docs) for queries, docs in fused_calls if queries.shape[0] == len(TEXTS[0])]
    assert len(calls) == len(DIMS), "the fused op did not compute every dimension"
    per_call = len(shrunk) // len(calls)
    for index, (queries, docs) in enumerate(calls):
        outputs = [out for _, _, out in shrunk[index * per_call : (index + 1) * per_call]]
        half = len(outputs) // 2  # column 0's pieces (its mini-batches), then column 1's
        assert torch.equal(queries, torch.cat(outputs[:half])) and torch.equal(docs[0], torch.cat(outputs[half:]))
        assert queries.dtype == dtype and queries.shape[-1] == DIMS[index]
    if stock_behaviour.shrink_normalizes_16bit_in_float32():
        # what a copy of the earlier shrink (normalizing in the 16-bit dtype) gives instead: the test tells them apart
        assert any(not torch.equal(out, F.normalize(x[..., :dim], p=2, dim=-1)) for x, dim, out in shrunk)

    reference_loss, reference_grads = train_step(model, stock, features)
    float32 = make_tiny_model(minilm_path)
    float32.eval()
    _, grads32 = train_step(float32, MATRYOSHKA[name](float32), [float32.preprocess(c) for c in TEXTS])
    assert loss.dtype == reference_loss.dtype
    assert relative_error(loss, reference_loss) <= 1e-5
    # st_fast's gradients are float32 math rounded once to the 16-bit dtype: at most stock's own distance from float32
    assert relative_error(grads, reference_grads) <= max(1e-5, relative_error(reference_grads.float(), grads32))


def _trainer_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("how", ["trainer", "patch"])
def test_matryoshka_cached_fp16_training_like_stock(minilm_path, tmp_path, how):
    """``fp16=True`` (the encoder's embeddings are float16 under autocast, shrunk by stock's ``shrink``) with
    MatryoshkaLoss(CachedMultipleNegativesRankingLoss): st_fast's trainer and ``st_fast.patch()`` train like stock."""
    from examples.debian_pairs import load_debian_pairs

    data = load_debian_pairs(limit=48).select_columns(["anchor", "positive"])
    runs = {}
    for run in ("stock", "st_fast"):
        if run == "st_fast" and how == "patch":
            st_fast.patch()
        trainer_class = st_fast.SentenceTransformerTrainer if run == "st_fast" and how == "trainer" else StockTrainer
        model = make_tiny_model(minilm_path)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / run), max_steps=3, per_device_train_batch_size=8, seed=42, fp16=True,
            batch_sampler="no_duplicates", report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
            disable_tqdm=True,
        )  # fmt: skip
        loss = stock_losses.MatryoshkaLoss(
            model, stock_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), DIMS
        )
        trainer = trainer_class(model=model, args=args, train_dataset=data, loss=loss)
        trainer.train()
        runs[run] = trainer
    assert type(runs["st_fast"].loss.loss) is fast_losses.CachedMultipleNegativesRankingLoss
    assert type(runs["stock"].loss.loss) is stock_losses.CachedMultipleNegativesRankingLoss
    stock, fast = _trainer_losses(runs["stock"]), _trainer_losses(runs["st_fast"])
    assert len(stock) == 3
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(stock), rtol=1e-4, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# MatryoshkaLoss around a wrapper of a cached loss (6.3: `resolve_gradient_cache_loss` follows `.loss`)
# ---------------------------------------------------------------------------------------------------------------------


def test_matryoshka_around_a_wrapper_decorates_the_cached_loss_inside(tiny_model, fused_calls):
    """MatryoshkaLoss(MatryoshkaLoss(CachedMultipleNegativesRankingLoss)): 6.3 decorates the cached loss's
    ``calculate_loss`` twice, one decoration around the other. The fused view must compute that loss stage with the
    fused op under both decorations (not silently with stock's method), with stock's loss and gradients."""
    if not stock_behaviour.matryoshka_decorates_a_wrapped_cached_loss(tiny_model):
        pytest.skip("the installed sentence-transformers does not accept a MatryoshkaLoss around a MatryoshkaLoss of a "
                    "cached loss (before 6.3)")  # fmt: skip
    tiny_model.eval()
    features = [tiny_model.preprocess(column) for column in TEXTS]
    cached = stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2)
    stock = stock_losses.MatryoshkaLoss(tiny_model, stock_losses.MatryoshkaLoss(tiny_model, cached, [16, 8]), [32, 24])
    assert gradcache.uses_gradient_cache(stock) and gradcache.uses_gradient_cache(stock.loss)
    fused = fuse(stock)
    assert type(fused.loss.loss) is fast_losses.CachedMultipleNegativesRankingLoss
    loss, grads = train_step(tiny_model, fused, features)
    assert sorted({queries.shape[-1] for queries, _ in fused_calls}) == [8, 16]  # inner dims of outer 32 and 24
    count = len(fused_calls)
    reference_loss, reference_grads = train_step(tiny_model, stock, features)
    assert len(fused_calls) == count  # the stock object still computes with its own method
    assert type(cached) is stock_losses.CachedMultipleNegativesRankingLoss
    assert relative_error(loss, reference_loss) < 1e-5 and relative_error(grads, reference_grads) < 1e-5


def test_fused_cached_loss_under_nested_decorations_keeps_the_stock_objects_own(tiny_model):
    """The copies of the decorations around the fused method are the fused view's: the stock object's decorations
    still wrap stock's bound method, layer for layer."""
    if not stock_behaviour.matryoshka_decorates_a_wrapped_cached_loss(tiny_model):
        pytest.skip("needs sentence-transformers >= 6.3 (nested decorations of a cached loss)")
    cached = stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2)
    stock_losses.MatryoshkaLoss(tiny_model, stock_losses.MatryoshkaLoss(tiny_model, cached, [16, 8]), [32, 24])
    fused = fuse(cached)
    outer = fused.calculate_loss
    assert outer is not cached.__dict__["calculate_loss"]
    assert outer.matryoshka_dims == (32, 24) and outer.fn.matryoshka_dims == (16, 8)
    fused_method = FusedCachedLossStageMixin.__dict__["calculate_loss"].function
    assert outer.fn.fn.__self__ is fused and outer.fn.fn.__func__ is fused_method
    stock_chain = cached.__dict__["calculate_loss"]
    assert stock_chain.fn.fn.__self__ is cached and type(stock_chain.fn.fn.__self__) is type(cached)


# ---------------------------------------------------------------------------------------------------------------------
# MatryoshkaLoss on a model with a truncate_dim (6.3: dims checked against the untruncated dimension)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["mnrl", "cmnrl"])
def test_matryoshka_on_a_truncated_model_like_stock(tiny_model, inner):
    tiny_model.eval()
    features = [tiny_model.preprocess(column) for column in TEXTS]
    tiny_model.truncate_dim = 16
    make_inner = {
        "mnrl": lambda: stock_losses.MultipleNegativesRankingLoss(tiny_model),
        "cmnrl": lambda: stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=4),
    }[inner]
    if not stock_behaviour.matryoshka_accepts_dims_above_the_truncate_dim(tiny_model):
        with pytest.raises(ValueError):  # the installed stock refuses the configuration itself: nothing to fuse
            stock_losses.MatryoshkaLoss(tiny_model, make_inner(), [32, 16])
        return
    stock = stock_losses.MatryoshkaLoss(tiny_model, make_inner(), [32, 16])
    fused = fuse(stock)
    assert type(fused.loss).__module__.startswith("st_fast.losses")
    loss, grads = train_step(tiny_model, fused, features)
    reference_loss, reference_grads = train_step(tiny_model, stock, features)
    assert relative_error(loss, reference_loss) < 1e-5 and relative_error(grads, reference_grads) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# gradcache.uses_gradient_cache / resolve_gradient_cache_loss on the fused losses
# ---------------------------------------------------------------------------------------------------------------------

GRADIENT_CACHE_CASES = {
    "mnrl": lambda m: stock_losses.MultipleNegativesRankingLoss(m),
    "cmnrl": lambda m: stock_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=2),
    "cmnsrl": lambda m: stock_losses.CachedMultipleNegativesSymmetricRankingLoss(m, mini_batch_size=2),
    "cached-gist": lambda m: stock_losses.CachedGISTEmbedLoss(m, m, mini_batch_size=2),
    "matryoshka-cmnrl": lambda m: stock_losses.MatryoshkaLoss(
        m, stock_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=2), [32, 8]
    ),
    "matryoshka-mnrl": lambda m: stock_losses.MatryoshkaLoss(m, stock_losses.MultipleNegativesRankingLoss(m), [32, 8]),
}


@pytest.mark.parametrize("name", GRADIENT_CACHE_CASES)
def test_fused_losses_report_gradient_caching_like_stock(tiny_model, name):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated symmetric alias
        stock = GRADIENT_CACHE_CASES[name](tiny_model)
    assert_gradient_caching_reported_like_stock(stock)


def assert_gradient_caching_reported_like_stock(stock) -> None:
    """fuse(stock) says whether it caches gradients as the stock object does; where the installed stock resolves the
    cached loss inside a wrapper, a wrapper built around the fused loss decorates the fused loss stage (not a stock
    object)."""
    fused = fuse(stock)
    assert fused is not stock
    assert gradcache.uses_gradient_cache(fused) is gradcache.uses_gradient_cache(stock)
    resolve = getattr(gradcache, "resolve_gradient_cache_loss", None)
    if resolve is not None and gradcache.uses_gradient_cache(stock):
        assert type(resolve(fused)).__module__.startswith("st_fast.losses")
        assert type(resolve(stock)).__module__.startswith("sentence_transformers")


def test_matryoshka_built_around_an_st_fast_cached_loss(tiny_model, fused_calls):
    """The st_fast class given to a stock MatryoshkaLoss: stock decorates the fused ``calculate_loss`` itself."""
    tiny_model.eval()
    features = [tiny_model.preprocess(column) for column in TEXTS]
    loss = stock_losses.MatryoshkaLoss(
        tiny_model, fast_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2), [32, 8]
    )
    reference = stock_losses.MatryoshkaLoss(
        tiny_model, stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2), [32, 8]
    )
    value, grads = train_step(tiny_model, loss, features)
    assert sorted({queries.shape[-1] for queries, _ in fused_calls}) == [8, 32]
    reference_value, reference_grads = train_step(tiny_model, reference, features)
    assert relative_error(value, reference_value) < 1e-5 and relative_error(grads, reference_grads) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# The trainer: loss components of an evaluation logged under its metric_key_prefix (6.3)
# ---------------------------------------------------------------------------------------------------------------------


class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


class ComponentsLoss(nn.Module):
    """A loss returning a dict of components (the trainer logs each), around a stock MNRL."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.ranking = stock_losses.MultipleNegativesRankingLoss(model)

    def forward(self, features, labels):
        embeddings = [self.model(dict(f))["sentence_embedding"] for f in features]
        return {
            "ranking": self.ranking.compute_loss_from_embeddings(embeddings, labels),
            "norm": 0.01 * embeddings[0].norm(dim=-1).mean(),
        }


def _evaluation_logs(trainer) -> list[dict]:
    recorder = LogRecorder()
    trainer.add_callback(recorder)
    trainer.evaluate(metric_key_prefix="foo")
    trainer.evaluate()
    trainer.evaluate(metric_key_prefix="bar")
    timings = ("_runtime", "_per_second", "_time")
    return [{k: v for k, v in logs.items() if not k.endswith(timings)} for logs in recorder.logs]


def _assert_same_logs(fast: list[dict], stock: list[dict]) -> None:
    assert len(fast) == len(stock) >= 3  # one log per evaluation (per dataset of a dict)
    for got, want in zip(fast, stock, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=2e-4), key  # (components are rounded to 4 places)


def _pair_data(rows: int, offset: int = 0) -> Dataset:
    return Dataset.from_dict({
        "anchor": [f"question number {i}" for i in range(offset, offset + rows)],
        "positive": [f"the answer to question {i} is {i * 7 % 13}" for i in range(offset, offset + rows)],
    })  # fmt: skip


@pytest.mark.parametrize("eval_data", ["one", "dict"])
def test_evaluation_loss_components_under_the_metric_key_prefix_like_stock(minilm_path, tmp_path, eval_data):
    """st_fast's trainer logs an evaluation's loss components where the installed stock trainer does (6.3: under
    ``metric_key_prefix``, accumulated per evaluation; before: only under ``eval_``), also per dataset of a dict."""
    data = _pair_data(24)
    evaluation = _pair_data(12, 100) if eval_data == "one" else {"a": _pair_data(8, 100), "b": _pair_data(12, 200)}
    logs = {}
    for run, trainer_class in (("stock", StockTrainer), ("st_fast", st_fast.SentenceTransformerTrainer)):
        model = make_tiny_model(minilm_path)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / run), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
            disable_tqdm=True, batch_sampler="no_duplicates",
        )  # fmt: skip
        trainer = trainer_class(
            model=model, args=args, train_dataset=data, eval_dataset=evaluation, loss=ComponentsLoss(model)
        )
        logs[run] = _evaluation_logs(trainer)
    _assert_same_logs(logs["st_fast"], logs["stock"])
    assert any(key.startswith("foo_") for key in logs["stock"][0])


def test_patched_sparse_trainer_logs_fused_splade_components_like_stock(minilm_path, tmp_path):
    """``st_fast.patch()`` with a SparseEncoderTrainer and SpladeLoss (a dict of components; its
    SparseMultipleNegativesRankingLoss fused): the evaluation logs are the unpatched stock trainer's."""
    from sentence_transformers import SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder import losses as sparse_losses

    data, evaluation = _pair_data(16), _pair_data(8, 100)
    logs = {}
    for run in ("stock", "st_fast"):
        if run == "st_fast":
            st_fast.patch()
        model = make_splade_model(minilm_path)
        model.eval()
        args = SparseEncoderTrainingArguments(
            output_dir=str(tmp_path / run), per_device_eval_batch_size=4, report_to="none", use_cpu=True,
            disable_tqdm=True,
        )  # fmt: skip
        loss = sparse_losses.SpladeLoss(
            model, sparse_losses.SparseMultipleNegativesRankingLoss(model),
            document_regularizer_weight=3e-5, query_regularizer_weight=5e-5,
        )  # fmt: skip
        trainer = SparseEncoderTrainer(model=model, args=args, train_dataset=data, eval_dataset=evaluation, loss=loss)
        if run == "st_fast":
            assert type(trainer.loss.loss) is fast_losses.SparseMultipleNegativesRankingLoss
        logs[run] = _evaluation_logs(trainer)
    _assert_same_logs(logs["st_fast"], logs["stock"])


# ---------------------------------------------------------------------------------------------------------------------
# The training arguments: activation_checkpointing (6.3's name; gradient_checkpointing before)
# ---------------------------------------------------------------------------------------------------------------------


def _checkpointing_flag() -> str:
    """The name the installed training arguments take (6.3 adds ``activation_checkpointing``, also on transformers
    versions without it; newer transformers have it anyway)."""
    names = {field.name for field in dataclasses.fields(SentenceTransformerTrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


@pytest.mark.parametrize("loss_name", ["mnrl", "cmnrl"])
def test_activation_checkpointing_trains_like_stock(minilm_path, tmp_path, loss_name):
    make_loss = {
        "mnrl": stock_losses.MultipleNegativesRankingLoss,
        "cmnrl": lambda m: stock_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4),
    }[loss_name]
    data = _pair_data(32)
    runs, errors = {}, {}
    for run, trainer_class in (("stock", StockTrainer), ("st_fast", st_fast.SentenceTransformerTrainer)):
        model = make_tiny_model(minilm_path)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / run), max_steps=3, per_device_train_batch_size=8, seed=42, report_to="none",
            save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, batch_sampler="no_duplicates",
            **{_checkpointing_flag(): True},
        )  # fmt: skip
        trainer = trainer_class(model=model, args=args, train_dataset=data, loss=make_loss(model))
        runs[run] = trainer
        try:
            trainer.train()
        except Exception as exc:  # noqa: BLE001 (e.g. 6.0's model against a newer transformers' checkpointing call)
            errors[run] = type(exc)
            continue
        assert model[0].model.is_gradient_checkpointing  # the argument reached the encoder
    assert type(runs["st_fast"].loss).__module__.startswith("st_fast.losses")
    if "stock" in errors:  # the installed stock trainer cannot do it: st_fast fails the same way
        assert errors.get("st_fast") is errors["stock"]
        return
    assert not errors
    stock, fast = _trainer_losses(runs["stock"]), _trainer_losses(runs["st_fast"])
    assert len(stock) == 3
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(stock), rtol=1e-4, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# The samplers: a label column that is not a list (6.3 reads it through `_to_list`)
# ---------------------------------------------------------------------------------------------------------------------


def _labelled(rows: int = 48) -> Dataset:
    return Dataset.from_dict({
        "anchor": [f"q{i % 20}" for i in range(rows)], "positive": [f"p{i % 11}" for i in range(rows)],
        "label": [i % 4 for i in range(rows)],
    })  # fmt: skip


@pytest.mark.parametrize("batch_sampler", ["no_duplicates", "group_by_label"])
@pytest.mark.parametrize("dataset_format", [None, "numpy", "pandas"])
def test_trainer_samplers_with_a_formatted_label_column_like_stock(tiny_model, tmp_path, batch_sampler,
                                                                   dataset_format):  # fmt: skip
    """The batches of st_fast's trainer (its sampler for no_duplicates; stock's, left as it is, for group_by_label)
    are the stock trainer's when the label column comes out of the dataset as an array, not a list."""
    data = _labelled()
    batches = {}
    for run, trainer_class in (("stock", StockTrainer), ("st_fast", st_fast.SentenceTransformerTrainer)):
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / run), per_device_train_batch_size=4, seed=7, report_to="none", use_cpu=True,
            batch_sampler=batch_sampler, dataloader_drop_last=True,
        )  # fmt: skip
        loss = stock_losses.BatchHardSoftMarginTripletLoss(tiny_model)
        trainer = trainer_class(model=tiny_model, args=args, train_dataset=data, loss=loss)
        # formatted after construction (the stock model card reads the columns as lists), before the dataloader
        trainer.train_dataset = data.with_format(dataset_format)
        sampler = trainer.get_train_dataloader().batch_sampler
        sampler = getattr(sampler, "batch_sampler", sampler)
        if run == "st_fast":
            assert isinstance(sampler, NoDuplicatesBatchSampler) is (batch_sampler == "no_duplicates")
        batches[run] = [list(batch) for batch in sampler]
    assert batches["stock"] and batches["st_fast"] == batches["stock"]


# ---------------------------------------------------------------------------------------------------------------------
# The multi-vector losses: gradient caching, 6.3's nested wrappers and the model's similarity read at call time
# (the rest of their 6.3 behaviour, similarity_fct=None and one MultiVectorMatryoshkaLoss, is in
# tests/losses/test_multi_vector_losses.py; the wrappers built the ways users build them in test_drop_in_contract.py)
# ---------------------------------------------------------------------------------------------------------------------

MV_TEXTS = [
    ["what is a cat?", "who won the 1998 world cup", "red apples, green pears!", "how tall is it", "why"],
    ["a cat is a small furry animal", "France won the 1998 world cup", "fruit: apples and pears", "two metres", "so"],
]


@pytest.fixture
def mv_model(minilm_path):
    from conftest import make_tiny_multi_vector_model

    return make_tiny_multi_vector_model(minilm_path).eval()


def _mv_stock():
    return pytest.importorskip("sentence_transformers.multi_vector_encoder.losses")


def _mv_wrapper(name: str):
    wrapper = getattr(_mv_stock(), name, None)
    if wrapper is None:
        pytest.skip(f"the installed sentence-transformers has no {name} (added in 6.3)")
    return wrapper


def _pooled(model, inner):
    """MultiVectorTokenPoolingLoss around ``inner`` (a parameter-free pooler, as cached losses need, and no pooling)."""
    from sentence_transformers.multi_vector_encoder.modules.token_pooling import HierarchicalTokenPooling

    wrapper = _mv_wrapper("MultiVectorTokenPoolingLoss")
    return wrapper(model, inner, token_poolings=[HierarchicalTokenPooling(pool_factor=2), None], weights=[1.0, 0.5])


MV_GRADIENT_CACHE_CASES = {
    "mv-mnrl": lambda m: _mv_stock().MultiVectorMultipleNegativesRankingLoss(m),
    "cached-mv-mnrl": lambda m: _mv_stock().CachedMultiVectorMultipleNegativesRankingLoss(m, mini_batch_size=2),
    "matryoshka-cached-mv-mnrl": lambda m: _mv_wrapper("MultiVectorMatryoshkaLoss")(
        m, _mv_stock().CachedMultiVectorMultipleNegativesRankingLoss(m, mini_batch_size=2), [16, 8]
    ),
    "token-pooling-cached-mv-mnrl": lambda m: _pooled(
        m, _mv_stock().CachedMultiVectorMultipleNegativesRankingLoss(m, mini_batch_size=2)
    ),
}


@pytest.mark.parametrize("name", MV_GRADIENT_CACHE_CASES)
def test_fused_multi_vector_losses_report_gradient_caching_like_stock(mv_model, name):
    assert_gradient_caching_reported_like_stock(MV_GRADIENT_CACHE_CASES[name](mv_model))


@pytest.fixture
def fused_maxsim_stages(monkeypatch) -> list[str]:
    """The backends of the fused cached MaxSim loss stages (one per call with gradients)."""
    from st_fast.losses import cached_multi_vector_multiple_negatives_ranking as cached_module

    calls, original = [], cached_module.resolve_backend

    def resolving(*args, **kwargs):
        backend = original(*args, **kwargs)
        calls.append(backend.name)
        return backend

    monkeypatch.setattr(cached_module, "resolve_backend", resolving)
    return calls


def _mv_step(model, loss) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, flat model gradients) of one forward + backward on MV_TEXTS."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    value = loss([dict(model.preprocess(texts)) for texts in MV_TEXTS], None)
    value.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def test_nested_multi_vector_wrappers_decorate_the_fused_cached_loss_stage(mv_model, fused_maxsim_stages):
    """MultiVectorTokenPoolingLoss(MultiVectorMatryoshkaLoss(CachedMultiVectorMNRL)) through ``fuse()`` (6.3: both
    wrappers decorate the cached loss's ``calculate_loss``, one decoration around the other): the fused loss stage
    computes every (pooling, dimension) variant under both decorations, with stock's loss and gradients, and the
    stock object still computes with its own method."""
    stock_losses_mv = _mv_stock()
    cached = stock_losses_mv.CachedMultiVectorMultipleNegativesRankingLoss(mv_model, mini_batch_size=2)
    stock = _pooled(mv_model, _mv_wrapper("MultiVectorMatryoshkaLoss")(mv_model, cached, [16, 8]))
    fused = fuse(stock)
    assert type(fused.loss.loss) is fast_losses.CachedMultiVectorMultipleNegativesRankingLoss
    loss, grads = _mv_step(mv_model, fused)
    assert len(fused_maxsim_stages) == 4  # 2 poolings x 2 dimensions, each a fused loss stage
    reference_loss, reference_grads = _mv_step(mv_model, stock)
    assert (
        len(fused_maxsim_stages) == 4 and type(cached) is stock_losses_mv.CachedMultiVectorMultipleNegativesRankingLoss
    )
    assert relative_error(loss, reference_loss) < 1e-5 and relative_error(grads, reference_grads) < 1e-5


@pytest.mark.parametrize("cached", [False, True], ids=["mv-mnrl", "cached-mv-mnrl"])
def test_the_models_similarity_changed_after_construction_is_read_as_stock_reads_it(mv_model, cached):
    """The loss built with stock's default scoring, then ``model.similarity_fn_name = "meanmaxsim"``: 6.3 scores with
    the model's similarity at call time (the loss changes), 6.2 kept ``colbert_scores`` (it does not). The fused
    loss follows whichever the installed stock does, fused both times."""
    stock_losses_mv = _mv_stock()
    name = "CachedMultiVectorMultipleNegativesRankingLoss" if cached else "MultiVectorMultipleNegativesRankingLoss"
    kwargs = dict(mini_batch_size=2) if cached else {}
    stock = getattr(stock_losses_mv, name)(mv_model, scale=3.0, **kwargs)
    fused = getattr(fast_losses, name)(mv_model, scale=3.0, **kwargs)
    results = []
    for similarity in ("maxsim", "meanmaxsim"):
        mv_model.similarity_fn_name = similarity
        expected, actual = _mv_step(mv_model, stock), _mv_step(mv_model, fused)
        assert fused.plan(torch.device("cpu"), torch.float32).fused
        assert relative_error(actual[0], expected[0]) < 1e-5 and relative_error(actual[1], expected[1]) < 1e-5
        results.append(expected[0])
    stock_reads_the_model = stock.similarity_fct is None  # 6.3's default; 6.2 set colbert_scores
    assert (relative_error(results[1], results[0]) > 1e-3) is stock_reads_the_model
