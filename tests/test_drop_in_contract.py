"""The drop-in contract of st_fast's fused losses, checked against the stock sentence-transformers classes.

The rule: a fused loss reads everything from the live stock attributes at call time, changes no state of any module
it wraps, returns what stock returns (value, dtype, gradient of every tensor that requires grad) and renders like
stock wherever stock renders it. Where a case cannot be fused exactly it falls back to the stock computation with a
one-time warning (a logging warning from an ``st_fast...`` logger) — never a different answer.

Every fused class is built the ways users and upstream tests build it: the st_fast constructor, ``fuse(stock)``,
``cls.__new__`` + ``nn.Module.__init__`` + the stock attributes set by hand, inside MatryoshkaLoss /
AdaptiveLayerLoss, and through ``st_fast.SentenceTransformerTrainer`` or ``st_fast.patch()`` + the stock trainer.
Each check compares it with a separately built stock loss on the same tiny random model, the same features and the
same seed, the models in eval() (so dropout cannot differ) except where the modes are the subject.
"""

from __future__ import annotations

import copy
import functools
import logging
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import make_splade_model, make_tiny_model, make_tiny_multi_vector_model
from datasets import Dataset
from parity import relative_error
from sentence_transformers import SentenceTransformerTrainer as StockTrainer
from sentence_transformers import util
from sentence_transformers.base.model_card import generate_model_card
from sentence_transformers.multi_vector_encoder import losses as stock_mv_losses
from sentence_transformers.multi_vector_encoder import scoring
from sentence_transformers.sentence_transformer import losses as stock_losses
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from sentence_transformers.sparse_encoder import losses as stock_sparse_losses
from torch import nn

import st_fast
from st_fast import losses as fast_losses
from st_fast.losses import fuse

# 5 rows: an odd batch, which mini-batches of 3 split into 3 + 2. Columns: anchor, positive, hard negative.
TEXTS = [
    ["a cat sat on the mat", "dogs bark at night", "rain is expected today", "tea is hot", "the sun rose"],
    ["a kitten sits", "a dog is barking", "it will rain", "a hot drink", "morning came"],
    ["stock markets fell", "a recipe for bread", "the train is late", "a cold winter", "an old song"],
]
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
RTOL = 1e-5  # float32 st_fast vs float32 stock, loss and gradients (norm-wise relative error)
PARAMETER_RTOL = 1e-4  # the gradient of a learnable scalar (a sum over every score) vs stock's
STOCK_LOSS_MODULES = (  # where the stock classes look up all_gather_with_grad / get_rank
    "sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking",
    "sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking",
    "sentence_transformers.sentence_transformer.losses.gist_embed",
    "sentence_transformers.sentence_transformer.losses.cached_gist_embed",
)
WRAPPERS = (
    stock_losses.MatryoshkaLoss,
    stock_losses.AdaptiveLayerLoss,
    stock_sparse_losses.SpladeLoss,
    stock_sparse_losses.CSRLoss,
)


@dataclass(frozen=True)
class Case:
    stock: type
    fast: type
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments after model (and guide)
    guided: bool = False  # GIST: (model, guide, ...)
    cached: bool = False  # GradCache: hyperparameters of the MNRL family on an inner ``self.loss``
    symmetric: bool = False  # the deprecated symmetric aliases: directions (query_to_doc, doc_to_query)


CASES = {
    "MNRL": Case(stock_losses.MultipleNegativesRankingLoss, fast_losses.MultipleNegativesRankingLoss, {"scale": 20.0}),
    "MNSRL": Case(
        stock_losses.MultipleNegativesSymmetricRankingLoss,
        fast_losses.MultipleNegativesSymmetricRankingLoss,
        symmetric=True,
    ),
    "CMNRL": Case(
        stock_losses.CachedMultipleNegativesRankingLoss,
        fast_losses.CachedMultipleNegativesRankingLoss,
        {"mini_batch_size": 3},
        cached=True,
    ),
    "CMNSRL": Case(
        stock_losses.CachedMultipleNegativesSymmetricRankingLoss,
        fast_losses.CachedMultipleNegativesSymmetricRankingLoss,
        {"mini_batch_size": 3},
        cached=True,
        symmetric=True,
    ),
    # temperature 0.05: at the stock default 0.01 the float32 rounding of the cosines alone, x100, is ~1e-5
    "GIST": Case(stock_losses.GISTEmbedLoss, fast_losses.GISTEmbedLoss, {"temperature": 0.05}, guided=True),
    "CachedGIST": Case(
        stock_losses.CachedGISTEmbedLoss,
        fast_losses.CachedGISTEmbedLoss,
        {"temperature": 0.05, "mini_batch_size": 3},
        guided=True,
        cached=True,
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Models, losses, runs and comparisons
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(minilm_path):
    """(model, guide): tiny random SentenceTransformers (seeds 0 and 1), never used directly (see ``_copy``)."""
    return make_tiny_model(minilm_path, seed=0), make_tiny_model(minilm_path, seed=1)


def _copy(model):
    """A deep copy sharing the (read-only) tokenizer: ~10x faster than building the model again."""
    tokenizer = model.tokenizer
    return copy.deepcopy(model, memo={id(tokenizer): tokenizer})


@pytest.fixture
def model(pristine):
    return _copy(pristine[0]).eval()


@pytest.fixture
def guide(pristine):
    return _copy(pristine[1]).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's spinning
    multiplied this module's CPU time ~9x (37 s -> 5.7 min measured); restored for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _always_unpatched():
    yield
    st_fast.unpatch()


def _quiet(factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated symmetric aliases warn on construction
        return factory()


def _positional(case: Case, model, guide) -> tuple:
    return (model, guide) if case.guided else (model,)


def stock_loss(case: Case, model, guide, **overrides):
    return _quiet(lambda: case.stock(*_positional(case, model, guide), **{**case.kwargs, **overrides}))


def fast_loss(case: Case, model, guide, **overrides):
    return _quiet(lambda: case.fast(*_positional(case, model, guide), **{**case.kwargs, **overrides}))


def _innermost(loss):
    while isinstance(loss, WRAPPERS):
        loss = loss.loss
    return loss


def _assert_is_st_fast(loss) -> None:
    """The loss under test is really st_fast's (else a comparison with stock could not fail)."""
    inner = _innermost(loss)
    assert type(inner).__module__.startswith("st_fast."), f"{type(inner).__module__}.{type(inner).__name__}"


def _features(model, columns: int = 3) -> list[dict[str, torch.Tensor]]:
    return [model.preprocess(column) for column in TEXTS[:columns]]


@dataclass
class Outcome:
    loss: torch.Tensor  # detached, in the dtype the loss returned
    grads: dict[str, torch.Tensor]  # model parameter name -> gradient, for the parameters that received one
    extra: list[torch.Tensor | None]  # gradients of the extra tensors (a learnable scale, ...)


def _run(model, loss, *, extra: tuple[torch.Tensor, ...] = (), columns: int = 3) -> Outcome:
    """One seeded forward (fresh features) + backward of ``loss``; a dict of loss components (SpladeLoss) is summed,
    as the trainer does."""
    model.zero_grad(set_to_none=True)
    for tensor in extra:
        tensor.grad = None
    torch.manual_seed(0)
    value = loss(_features(model, columns), None)
    if isinstance(value, dict):
        value = torch.stack(list(value.values())).sum()
    value.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return Outcome(value.detach(), grads, [None if t.grad is None else t.grad.detach().clone() for t in extra])


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grad.flatten() for grad in grads.values()])


def _assert_same(actual: Outcome, expected: Outcome, *, rtol: float = RTOL, what: str = "") -> None:
    """Same loss dtype, loss value and gradients (model parameters and extra tensors) as stock."""
    where = f" ({what})" if what else ""
    assert actual.loss.dtype == expected.loss.dtype, (
        f"loss dtype {actual.loss.dtype}, stock {expected.loss.dtype}{where}"
    )
    if torch.isfinite(expected.loss):
        error = relative_error(actual.loss, expected.loss)
        assert error <= rtol, (
            f"loss {actual.loss.item():.8g}, stock {expected.loss.item():.8g}: rel. error {error:.2e}{where}"
        )
    else:  # stock's answer is non-finite: so must st_fast's be, the same one
        assert torch.equal(actual.loss, expected.loss), (
            f"loss {actual.loss.item()}, stock {expected.loss.item()}{where}"
        )
    assert expected.grads, "stock gave no gradient: nothing to compare"
    assert actual.grads.keys() == expected.grads.keys(), f"not the same parameters received gradients{where}"
    error = relative_error(_flat(actual.grads), _flat(expected.grads))
    assert error <= rtol, f"model gradients: relative error {error:.2e} > {rtol:.0e}{where}"
    for index, (grad, ref_grad) in enumerate(zip(actual.extra, expected.extra, strict=True)):
        assert ref_grad is not None and float(ref_grad.abs().max()) > 0, "stock gave the extra tensor no gradient"
        assert grad is not None, f"extra tensor {index}: no gradient (stock: {ref_grad.tolist()}){where}"
        error = relative_error(grad, ref_grad)
        assert error <= PARAMETER_RTOL, f"extra tensor {index}: grad {grad.tolist()}, stock {ref_grad.tolist()}{where}"


def _training_args(tmp_path, name: str = "run", **overrides) -> SentenceTransformerTrainingArguments:
    config = dict(
        output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=7,
    )  # fmt: skip
    config.update(overrides)
    return SentenceTransformerTrainingArguments(**config)


def _dataset() -> Dataset:
    return Dataset.from_dict({"anchor": TEXTS[0], "positive": TEXTS[1]})


def _trainer_loss(how: str, model, loss, tmp_path):
    """``trainer.loss`` of a trainer given ``loss``: st_fast's trainer, or the stock trainer under st_fast.patch()."""
    kwargs = dict(model=model, args=_training_args(tmp_path, how), train_dataset=_dataset(), loss=loss)
    if how == "st_fast-trainer":
        return st_fast.SentenceTransformerTrainer(**kwargs).loss
    assert how == "patch"
    st_fast.patch()
    try:
        return StockTrainer(**kwargs).loss
    finally:
        st_fast.unpatch()


def _built(how: str, case: Case, model, guide, tmp_path) -> tuple[nn.Module, nn.Module]:
    """(the st_fast loss built ``how``, the stock loss it must behave like)."""
    if how == "constructor":
        return fast_loss(case, model, guide), stock_loss(case, model, guide)
    if how == "fuse":
        return fuse(stock_loss(case, model, guide)), stock_loss(case, model, guide)
    if how == "matryoshka":
        dims = [32, 16]
        return (
            stock_losses.MatryoshkaLoss(model, fast_loss(case, model, guide), dims),
            stock_losses.MatryoshkaLoss(model, stock_loss(case, model, guide), dims),
        )
    if how == "adaptive-layer":
        return (
            stock_losses.AdaptiveLayerLoss(model, fast_loss(case, model, guide), n_layers_per_step=-1),
            stock_losses.AdaptiveLayerLoss(model, stock_loss(case, model, guide), n_layers_per_step=-1),
        )
    return _trainer_loss(how, model, stock_loss(case, model, guide), tmp_path), stock_loss(case, model, guide)


def _mnrl_attributes(case: Case) -> dict[str, Any]:
    """What the stock MNRL __init__ sets (the symmetric aliases: two directions, one softmax per direction)."""
    return {
        "scale": 20.0, "similarity_fct": util.cos_sim, "gather_across_devices": False,
        "directions": ("query_to_doc", "doc_to_query") if case.symmetric else ("query_to_doc",),
        "partition_mode": "per_direction" if case.symmetric else "joint",
        "hardness_mode": None, "hardness_strength": 0.0,
    }  # fmt: skip


def _new_built(case: Case, model, guide) -> nn.Module:
    """``case.fast`` built as upstream tests build losses: ``__new__``, ``nn.Module.__init__`` and the attributes that
    the stock ``__init__`` sets, by hand (no st_fast constructor runs, so no st_fast-only attribute is set)."""
    loss = case.fast.__new__(case.fast)
    nn.Module.__init__(loss)
    loss.model = model
    if case.guided:
        attributes = {
            "guide": guide, "temperature": 0.05, "similarity_fct": nn.CosineSimilarity(dim=-1),
            "must_retokenize": False, "margin_strategy": "absolute", "margin": 0.0, "contrast_anchors": True,
            "contrast_positives": True, "gather_across_devices": False, "cross_entropy_loss": nn.CrossEntropyLoss(),
        }  # fmt: skip
    elif case.cached:  # 6.2: the MNRL hyperparameters live on an inner stock MNRL
        inner = stock_losses.MultipleNegativesRankingLoss.__new__(stock_losses.MultipleNegativesRankingLoss)
        nn.Module.__init__(inner)
        inner.model = model
        for key, value in _mnrl_attributes(case).items():
            setattr(inner, key, value)
        attributes = {"loss": inner}
    else:
        attributes = _mnrl_attributes(case)
    if case.cached:
        attributes.update(mini_batch_size=3, mini_batch_num_tokens=None, show_progress_bar=False)
    for key, value in attributes.items():
        setattr(loss, key, value)
    return loss


def _hf_model(st_model) -> nn.Module:
    return st_model[0].model  # sentence-transformers 6.x keeps the Hugging Face model in `.model`


# ---------------------------------------------------------------------------------------------------------------------
# (1, 2, 4, 5, f, k) Built the ways users build it: same loss and gradients as stock; rendered as stock
# ---------------------------------------------------------------------------------------------------------------------

HOWS = ("constructor", "fuse", "matryoshka", "adaptive-layer", "st_fast-trainer", "patch")
BUILT = [
    (how, name)
    for how in HOWS
    for name, case in CASES.items()
    if not (how == "adaptive-layer" and case.cached)  # stock: "AdaptiveLayerLoss is not compatible with" them
]


@pytest.mark.parametrize(("how", "name"), BUILT, ids=[f"{how}-{name}" for how, name in BUILT])
def test_built_the_ways_users_build_it_gives_stock_loss_and_gradients(how, name, model, guide, tmp_path):
    loss, reference = _built(how, CASES[name], model, guide, tmp_path)
    _assert_is_st_fast(loss)
    _assert_same(_run(model, loss), _run(model, reference))


@pytest.mark.parametrize("name", CASES)
def test_new_built_instance_gives_stock_loss_and_gradients(name, model, guide):
    """(f) No AttributeError for st_fast-only attributes (``backend``, ...) when no st_fast constructor ran."""
    case = CASES[name]
    loss = _new_built(case, model, guide)
    _assert_same(_run(model, loss), _run(model, stock_loss(case, model, guide)))


@pytest.mark.parametrize("name", CASES)
def test_train_mode_without_dropout_gives_stock_loss_and_gradients(name, model, guide):
    """(k) train() mode (dropout probabilities 0, so that both runs see the same embeddings)."""
    case = CASES[name]
    for module in (*model.modules(), *guide.modules()):
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    guide.train()
    with torch.no_grad():  # the set-up really is dropout-free: two differently seeded forwards agree
        torch.manual_seed(1)
        first = model(_features(model, 1)[0])["sentence_embedding"]
        torch.manual_seed(2)
        assert torch.equal(first, model(_features(model, 1)[0])["sentence_embedding"])
    _assert_same(_run(model, fast_loss(case, model, guide)), _run(model, stock_loss(case, model, guide)))
    assert model.training and guide.training


@pytest.mark.parametrize("how", ["constructor", "fuse"])
@pytest.mark.parametrize("name", CASES)
def test_renders_like_stock(how, name, model, guide, tmp_path):
    """Class name, configuration, citation and repr (what model cards and logs show) are stock's."""
    loss, reference = _built(how, CASES[name], model, guide, tmp_path)
    _assert_is_st_fast(loss)
    assert type(loss).__name__ == type(reference).__name__
    assert loss.get_config_dict() == reference.get_config_dict()
    assert getattr(loss, "citation", None) == getattr(reference, "citation", None)  # CachedGIST has none
    assert repr(loss) == repr(reference)


# ---------------------------------------------------------------------------------------------------------------------
# Module identity, state_dict, deepcopy and pickle: as stock's nn.Module
# ---------------------------------------------------------------------------------------------------------------------


def _module_model(loss) -> nn.Module:
    return loss.model if "model" in loss._modules else loss.loss.model  # (6.2's cached losses: an inner stock MNRL)


def _assert_module_semantics_like_stock(loss, reference, other, other_reference) -> None:
    """Two losses are two modules (equality and hash by identity, as nn.Module: a container's modules(),
    parameters() and to() see both), the same state_dict keys as stock, and a deepcopy / pickle round trip gives
    the st_fast class computing stock's loss and gradients (on its own copy of the model)."""
    assert (loss == other, loss == loss) == (reference == other_reference, True)
    assert len({loss, other}) == len({reference, other_reference}) == 2
    assert len(list(nn.ModuleList([loss, other]).modules())) == len(
        list(nn.ModuleList([reference, other_reference]).modules())
    )
    assert loss.state_dict().keys() == reference.state_dict().keys()
    expected = _run(_module_model(reference), reference)
    for label, copied in (("deepcopy", copy.deepcopy(loss)), ("pickle", pickle.loads(pickle.dumps(loss)))):
        assert type(copied) is type(loss), label
        model = _module_model(copied)
        assert model is not _module_model(loss), label
        _assert_same(_run(model, copied), expected, what=label)


@pytest.mark.parametrize("name", CASES)
def test_module_identity_state_dict_and_copies_are_stocks(name, model, guide):
    case = CASES[name]
    _assert_module_semantics_like_stock(
        fast_loss(case, model, guide), stock_loss(case, model, guide),
        fast_loss(case, model, guide), stock_loss(case, model, guide),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# (a) The modes of the model and of the guide are left as they were
# ---------------------------------------------------------------------------------------------------------------------


def _modes(**modules: nn.Module) -> dict[str, bool]:
    return {f"{label}.{name}": m.training for label, module in modules.items() for name, m in module.named_modules()}


def _changed(before: dict[str, bool], after: dict[str, bool]) -> list[str]:
    return [f"{name}: {before[name]} -> {after[name]}" for name in before if before[name] != after[name]]


@pytest.mark.parametrize("how", ["fuse", "st_fast-trainer", "patch"])
@pytest.mark.parametrize("name", CASES)
def test_modes_of_model_and_guide_are_left_as_they_were(how, name, model, guide, tmp_path):
    # A state a user may leave: the model training except a frozen first layer, the guide in eval
    model.train()
    _hf_model(model).encoder.layer[0].eval()
    guide.eval()
    before = _modes(model=model, guide=guide)
    stock = stock_loss(CASES[name], model, guide)
    loss = fuse(stock) if how == "fuse" else _trainer_loss(how, model, stock, tmp_path)
    _assert_is_st_fast(loss)
    changed = _changed(before, _modes(model=model, guide=guide))
    assert not changed, changed
    _run(model, loss)  # nor does a forward + backward of the loss change them
    changed = _changed(before, _modes(model=model, guide=guide))
    assert not changed, changed


def test_gist_guide_in_eval_stays_in_eval_with_the_st_fast_trainer(model, guide, tmp_path):
    """The reported bug: GISTEmbedLoss(model, guide) with guide.eval(); the st_fast trainer put the guide in train()."""
    guide.eval()
    loss = _trainer_loss("st_fast-trainer", model, stock_losses.GISTEmbedLoss(model, guide), tmp_path)
    assert loss.guide is guide
    assert guide[0].auto_model.training is False
    assert [name for name, module in loss.guide.named_modules() if module.training] == []


# ---------------------------------------------------------------------------------------------------------------------
# (b) Attribute changes after construction are honoured at call time
# ---------------------------------------------------------------------------------------------------------------------

TARGETS = ("st_fast-object", "fused-object", "stock-object-after-fuse")


def _changes(case: Case) -> list[tuple[str, Any]]:
    if case.guided:
        return [("temperature", 0.1), ("margin", 0.05), ("margin_strategy", "relative"), ("contrast_anchors", False)]
    directions = ("query_to_doc",) if case.symmetric else ALL_DIRECTIONS  # per_direction takes no *_to_same
    return [("scale", 7.0), ("similarity_fct", util.dot_score), ("directions", directions)]


def _target(target: str, case: Case, model, guide, **overrides) -> tuple[nn.Module, nn.Module]:
    """(the st_fast loss under test, the object whose attributes the user changes)."""
    if target == "st_fast-object":
        loss = fast_loss(case, model, guide, **overrides)
        return loss, loss
    stock = stock_loss(case, model, guide, **overrides)
    fused = fuse(stock)
    # fuse() shares the stock object's state: a change to the user's stock loss after fusing is seen by the fused one
    # (as with the stock trainer, where trainer.loss is the user's loss object)
    return fused, fused if target == "fused-object" else stock


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", CASES)
def test_attribute_changes_after_construction_are_honoured(target, name, model, guide):
    """Each change reaches the st_fast loss: its loss and gradients are as close to stock's, computed in float64
    with the same change, as stock's own float32 result is (or within RTOL). Stock's float32 error is itself ~1e-5
    for some configurations (all four directions), so a float32-vs-float32 bound would measure stock's rounding."""
    case = CASES[name]
    loss, changed = _target(target, case, model, guide)
    _assert_is_st_fast(loss)
    reference = stock_loss(case, model, guide)
    exact_model = _copy(model).double()
    exact_reference = stock_loss(case, exact_model, guide)
    previous = _run(model, reference).loss
    for attribute, value in _changes(case):
        for target_object in (changed, reference, exact_reference):
            setattr(target_object, attribute, value)
        expected = _run(model, reference)
        assert relative_error(expected.loss, previous) > 1e-3, f"{attribute}={value!r} must change stock's loss"
        previous = expected.loss
        actual, exact = _run(model, loss), _run(exact_model, exact_reference)
        _assert_as_close_as_stock(actual, expected, exact, what=f"after setting {attribute}={value!r}")


def _assert_as_close_as_stock(actual: Outcome, expected: Outcome, exact: Outcome, *, what: str) -> None:
    """st_fast's float32 loss and model gradients are no further from the float64 result ``exact`` than 1.5x stock's
    float32 ones (or RTOL, whichever is larger); the loss has stock's dtype."""
    assert actual.loss.dtype == expected.loss.dtype, f"loss dtype {actual.loss.dtype}, stock {expected.loss.dtype}"
    assert actual.grads.keys() == expected.grads.keys() == exact.grads.keys(), (
        f"other parameters got gradients ({what})"
    )
    pairs = {
        "loss": (actual.loss, expected.loss, exact.loss),
        "model gradients": tuple(_flat(outcome.grads) for outcome in (actual, expected, exact)),
    }
    for part, (fast, stock, reference) in pairs.items():
        fast_error = relative_error(fast.double(), reference)
        stock_error = relative_error(stock.double(), reference)
        assert fast_error <= max(RTOL, 1.5 * stock_error), (
            f"{part}: relative error {fast_error:.2e} against float64 stock, stock's float32 {stock_error:.2e} ({what})"
        )


# ---------------------------------------------------------------------------------------------------------------------
# (c, d) Learnable scale / temperature, tensor hardness_strength: stock's gradients
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", CASES)
def test_learnable_scale_or_temperature_gets_stocks_gradient(target, name, model, guide):
    """GIST with a margin of -2 and no anchor-anchor / positive-positive blocks, which masks nothing in any stock
    version: each masked logit is -inf / temperature, whose derivative makes stock's temperature gradient NaN
    whenever anything is masked (the default margin does here, and sentence-transformers >= 6.3 always masks each
    row's own entry of those blocks)."""
    case = CASES[name]
    attribute, initial = ("temperature", 0.05) if case.guided else ("scale", 20.0)
    overrides = {"margin": -2.0, "contrast_anchors": False, "contrast_positives": False} if case.guided else {}
    loss, changed = _target(target, case, model, guide, **overrides)
    parameter = nn.Parameter(torch.tensor(initial))
    setattr(changed, attribute, parameter)
    reference = stock_loss(case, model, guide, **overrides)
    reference_parameter = nn.Parameter(torch.tensor(initial))
    setattr(reference, attribute, reference_parameter)
    # (cached losses: the gradient reaches the parameter through the returned loss's backward, as stock)
    _assert_same(_run(model, loss, extra=(parameter,)), _run(model, reference, extra=(reference_parameter,)))


@pytest.mark.parametrize("name", ["GIST", "CachedGIST"])
def test_learnable_temperature_with_masked_entries_gets_the_exact_gradient(name, model, guide):
    """Where the guide masks entries (the default margin masks at least each anchor's own copy in the anchor-anchor
    block), stock's autograd gives the temperature a NaN gradient (it differentiates -inf / T); st_fast gives the
    exact derivative: stock's own loss differentiated numerically (float64 models, central difference with step
    1e-5 at T = 0.05: truncation ~(1e-5 / 0.05)^2, rounding ~1e-16 / 1e-5)."""
    case = CASES[name]
    model, guide = model.double(), guide.double()
    reference = stock_loss(case, model, guide)
    reference_parameter = nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
    reference.temperature = reference_parameter
    assert torch.isnan(_run(model, reference, extra=(reference_parameter,)).extra[0]), "stock masks nothing here"
    loss = fast_loss(case, model, guide)
    parameter = nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
    loss.temperature = parameter
    gradient = float(_run(model, loss, extra=(parameter,)).extra[0])
    with torch.no_grad():
        values = [float(stock_loss(case, model, guide, temperature=0.05 + step)(_features(model), None))
                  for step in (1e-5, -1e-5)]  # fmt: skip
    numeric = (values[0] - values[1]) / 2e-5
    assert abs(numeric) > 0.1, numeric
    assert abs(gradient - numeric) <= 1e-5 * abs(numeric), (gradient, numeric)


@pytest.mark.parametrize(
    ("name", "mode"), [("MNRL", "in_batch_negatives"), ("MNRL", "all_negatives"), ("CMNRL", "hard_negatives")]
)
def test_tensor_hardness_strength_gets_stocks_gradient(name, mode, model, guide):
    case = CASES[name]
    strength, reference_strength = torch.tensor(5.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    loss = fast_loss(case, model, guide, hardness_mode=mode, hardness_strength=strength)
    reference = stock_loss(case, model, guide, hardness_mode=mode, hardness_strength=reference_strength)
    _assert_same(_run(model, loss, extra=(strength,)), _run(model, reference, extra=(reference_strength,)))


# ---------------------------------------------------------------------------------------------------------------------
# (e) A 16-bit guide: the masks are decided on the guide similarities in the guide's dtype, as stock does
# ---------------------------------------------------------------------------------------------------------------------


def _upcast_output(module, args, output):
    return {**output, "sentence_embedding": output["sentence_embedding"].float()}


# margins tried in turn: 0 (the default) first, then steps of 0.005 outwards
_MARGINS = [0.0] + [sign * 0.005 * step for step in range(1, 21) for sign in (1, -1)]


def _margin_that_tells_16bit_masks_apart(case: Case, model, guide) -> tuple[float, Outcome]:
    """(margin, stock's outcome there): the first margin at which stock's masks, decided on the 16-bit guide
    similarities, give another loss than masks decided on the same guide embeddings upcast to float32 (which
    margins do depends on the random models' similarities, so on the sentence-transformers version's init)."""
    for margin in _MARGINS:
        expected = _run(model, stock_loss(case, model, guide, margin=margin))
        hook = guide.register_forward_hook(_upcast_output)
        try:
            upcast = _run(model, stock_loss(case, model, guide, margin=margin))
        finally:
            hook.remove()
        if relative_error(upcast.loss, expected.loss) > 1e-3:
            return margin, expected
    raise AssertionError("no margin tells masks decided in the guide's dtype from float32 masks on these data")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["GIST", "CachedGIST"])
def test_16bit_guide_gives_stock_loss_and_gradients(name, dtype, model, guide):
    case = CASES[name]
    guide.to(dtype)
    margin, expected = _margin_that_tells_16bit_masks_apart(case, model, guide)
    # rtol 1e-4: the masks must be stock's exactly (one differing mask moves the loss by ~1e-2)
    _assert_same(_run(model, fast_loss(case, model, guide, margin=margin)), expected, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# (g) all_gather_with_grad / get_rank are looked up where stock looks them up, at call time
# ---------------------------------------------------------------------------------------------------------------------


class FakeRankOne:
    """The gather of rank 1 of 2: [rank 0's tensor, this rank's]. Rank 0's is a fixed function of the local tensor
    (whatever the call order, every caller gets the same), close enough to it to weigh in the softmax (a random
    direction would be near-orthogonal, i.e. negligible at these scales), and gets no gradient here."""

    def __init__(self) -> None:
        self.mixers: dict[int, torch.Tensor] = {}

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        dim = tensor.shape[-1]
        if dim not in self.mixers:
            self.mixers[dim] = torch.randn(dim, dim, generator=torch.Generator().manual_seed(dim)) / dim**0.5
        local = tensor.detach().float()
        other = (local.roll(1, dims=0) + 0.3 * local @ self.mixers[dim]).to(tensor.dtype)
        return torch.cat([other, tensor])

    @staticmethod
    def get_rank() -> int:
        return 1


@pytest.mark.parametrize("name", CASES)
def test_gather_helpers_are_looked_up_where_stock_looks_them_up(name, model, guide, monkeypatch):
    case = CASES[name]
    fake = FakeRankOne()
    for module in STOCK_LOSS_MODULES:
        monkeypatch.setattr(f"{module}.all_gather_with_grad", fake.all_gather_with_grad)
        monkeypatch.setattr(f"{module}.get_rank", fake.get_rank)
    expected = _run(model, stock_loss(case, model, guide, gather_across_devices=True))
    alone = _run(model, stock_loss(case, model, guide))
    assert relative_error(alone.loss, expected.loss) > 1e-3  # the fakes change stock's answer
    _assert_same(_run(model, fast_loss(case, model, guide, gather_across_devices=True)), expected)


# ---------------------------------------------------------------------------------------------------------------------
# (h) bf16 autocast: the loss dtype is stock's
# ---------------------------------------------------------------------------------------------------------------------


def _run_autocast(model, loss) -> Outcome:
    """Forward under bf16 autocast, backward outside it (as the trainer does)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(_features(model), None)
    value.backward()
    return Outcome(value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, [])


@pytest.mark.parametrize("name", CASES)
def test_loss_dtype_under_bf16_autocast_is_stocks(name, model, guide):
    """Same dtype as stock; value and gradients within 2e-2 plus twice stock's own distance from its float32 answer
    (the MNRL family's stock scores, |s| <= scale = 20, are rounded to bf16: steps of 1/16 to 1/8 in each logit)."""
    case = CASES[name]
    expected = _run_autocast(model, stock_loss(case, model, guide))
    actual = _run_autocast(model, fast_loss(case, model, guide))
    assert actual.loss.dtype == expected.loss.dtype
    stock_float32 = _run(model, stock_loss(case, model, guide))
    allowed = 2e-2 + 2 * relative_error(expected.loss, stock_float32.loss)
    error = relative_error(actual.loss, expected.loss)
    assert error <= allowed, (
        f"loss {actual.loss.item():.6g}, stock {expected.loss.item():.6g}: {error:.2e} > {allowed:.2e}"
    )
    assert actual.grads.keys() == expected.grads.keys()
    allowed = 2e-2 + 2 * relative_error(_flat(expected.grads), _flat(stock_float32.grads))
    error = relative_error(_flat(actual.grads), _flat(expected.grads))
    assert error <= allowed, f"gradients: relative error {error:.2e} > {allowed:.2e}"


# ---------------------------------------------------------------------------------------------------------------------
# (i) The model card renders the loss like stock
# ---------------------------------------------------------------------------------------------------------------------


def _comparable(card: str) -> list[str]:
    """The card's lines without st_fast's own (its tag) and the measured training time."""
    return [line for line in card.splitlines() if "st_fast" not in line and not line.startswith("- **Training**:")]


@pytest.mark.parametrize("name", ["MNRL", "CMNRL", "GIST"])
def test_model_card_renders_like_stock(name, pristine, tmp_path):
    case = CASES[name]
    cards = {}
    for label, trainer_class in (("stock", StockTrainer), ("st_fast", st_fast.SentenceTransformerTrainer)):
        model, guide = _copy(pristine[0]), _copy(pristine[1])
        trainer = trainer_class(
            model=model, args=_training_args(tmp_path, "card"), train_dataset=_dataset(),
            loss=stock_loss(case, model, guide),
        )  # fmt: skip
        trainer.train()
        cards[label] = generate_model_card(model)
    _assert_is_st_fast(trainer.loss)
    loss_lines = {
        label: [line for line in card.splitlines() if line.startswith("* Loss:")] for label, card in cards.items()
    }
    assert loss_lines["stock"] and loss_lines["st_fast"] == loss_lines["stock"]
    assert _comparable(cards["st_fast"]) == _comparable(cards["stock"])


# ---------------------------------------------------------------------------------------------------------------------
# (j) Replaced modules / functions: the stock computation, with one warning
# ---------------------------------------------------------------------------------------------------------------------


def _named(function, name: str):
    function.__name__ = function.__qualname__ = name  # a distinct name per case: one-time warnings may be keyed on it
    return function


REPLACEMENTS = {
    # label smoothing over GIST's -inf masked logits: stock's loss is +inf (with finite gradients), so must st_fast's be
    "GIST-cross_entropy_loss": ("GIST", "cross_entropy_loss", lambda: nn.CrossEntropyLoss(label_smoothing=0.1)),
    "CachedGIST-cross_entropy_loss": (
        "CachedGIST",
        "cross_entropy_loss",
        lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
    ),
    # a sum reduction st_fast may compute exactly (no warning then) or leave to stock (one warning)
    "GIST-cross_entropy_loss-sum": ("GIST", "cross_entropy_loss", lambda: nn.CrossEntropyLoss(reduction="sum")),
    "CachedGIST-cross_entropy_loss-sum": (
        "CachedGIST",
        "cross_entropy_loss",
        lambda: nn.CrossEntropyLoss(reduction="sum"),
    ),
    # eps near the embedding norms (~3.5), so that its answer differs from the fused cosine's (a tiny eps such as
    # 1e-3 agrees with it to rounding, and a wrong fused answer could not be told from the fallback)
    "GIST-similarity_fct": ("GIST", "similarity_fct", lambda: nn.CosineSimilarity(dim=-1, eps=3.5)),
    "CachedGIST-similarity_fct": ("CachedGIST", "similarity_fct", lambda: nn.CosineSimilarity(dim=-1, eps=3.5)),
    "MNRL-similarity_fct": (
        "MNRL",
        "similarity_fct",
        lambda: _named(lambda a, b: util.cos_sim(a, b) ** 3, "cubed_cos_for_mnrl"),
    ),
    "CMNRL-similarity_fct": (
        "CMNRL",
        "similarity_fct",
        lambda: _named(lambda a, b: util.cos_sim(a, b) ** 3, "cubed_cos_for_cmnrl"),
    ),
}


@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_replaced_module_gives_stock_answer_with_one_warning(replacement, model, guide, caplog):
    name, attribute, factory = REPLACEMENTS[replacement]
    case = CASES[name]
    reference = stock_loss(case, model, guide)
    unchanged = _run(model, reference).loss
    setattr(reference, attribute, factory())
    expected = _run(model, reference)
    assert relative_error(expected.loss, unchanged) > 1e-3  # the replacement changes stock's answer
    loss = fast_loss(case, model, guide)
    setattr(loss, attribute, factory())
    with caplog.at_level(logging.WARNING):
        actual = _run(model, loss)
        _run(model, loss)
    _assert_same(actual, expected)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("st_fast") and r.levelno == logging.WARNING]
    assert len(warned) == 1 or (replacement.endswith("-sum") and not warned), warned


# ---------------------------------------------------------------------------------------------------------------------
# Values and layouts only stock computes: a scale / temperature set to 0, a negative number or NaN after construction
# (the fused ops take positive ones), an empty batch, candidate columns with more rows than the anchors
# ---------------------------------------------------------------------------------------------------------------------


def _assert_same_or_same_nonfinite(actual: Outcome, expected: Outcome) -> None:
    if torch.isfinite(expected.loss):
        _assert_same(actual, expected)
    else:  # NaN is not equal to itself: the same kind of non-finite value
        assert actual.loss.dtype == expected.loss.dtype
        assert bool(torch.isnan(actual.loss)) == bool(torch.isnan(expected.loss)), (actual.loss, expected.loss)
        assert bool(torch.isinf(actual.loss)) == bool(torch.isinf(expected.loss)), (actual.loss, expected.loss)


@pytest.mark.parametrize("value", [0.0, -20.0, float("nan")], ids=["zero", "negative", "nan"])
@pytest.mark.parametrize("name", ["MNRL", "CMNRL", "GIST", "CachedGIST"])
def test_a_nonpositive_scale_or_temperature_set_later_computes_stock(name, value, model, guide, caplog):
    case = CASES[name]
    attribute = "temperature" if case.guided else "scale"
    loss, reference = fast_loss(case, model, guide), stock_loss(case, model, guide)
    for target in (loss, reference):
        setattr(target, attribute, value)
    expected = _run(model, reference)
    with caplog.at_level(logging.WARNING):
        actual = _run(model, loss)
        _run(model, loss)
    _assert_same_or_same_nonfinite(actual, expected)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("st_fast") and r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"{attribute}={value} is not positive" in warned[0], warned
    setattr(loss, attribute, 0.05 if case.guided else 20.0)
    assert loss.fallback_reason() is None  # and a positive value is fused again


def _call(loss, columns: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor | None]] | type:
    """(loss, gradients of the columns) of ``loss.compute_loss_from_embeddings``, or the type of what it raised."""
    inputs = [column.clone().requires_grad_(True) for column in columns]
    try:
        value = loss.compute_loss_from_embeddings(inputs, None)
    except Exception as exc:  # noqa: BLE001 - stock's exception type is the expected answer
        return type(exc)
    if torch.isfinite(value):
        value.backward()
    return value.detach(), [column.grad for column in inputs]


@pytest.mark.parametrize(
    "rows", [(0, 0), (6, 12), (6, 12, 12)], ids=["empty-batch", "more-candidates", "more-candidates-and-negatives"]
)
@pytest.mark.parametrize("name", ["MNRL", "MNSRL"])
def test_layouts_only_stock_computes_give_stocks_answer(name, rows, model, guide, caplog):
    case = CASES[name]
    generator = torch.Generator().manual_seed(3)
    columns = [torch.randn(n, 8, generator=generator, dtype=torch.float64) for n in rows]
    expected = _call(stock_loss(case, model, guide), columns)
    with caplog.at_level(logging.WARNING):
        actual = _call(fast_loss(case, model, guide), columns)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("st_fast") and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "stock" in warned[0], warned
    if isinstance(expected, type):  # stock raises: so does st_fast (the stock code runs), the same way
        assert actual is expected
        return
    (expected_loss, expected_grads), (loss_value, grads) = expected, actual
    if torch.isfinite(expected_loss):
        assert relative_error(loss_value, expected_loss) < 1e-12
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            assert relative_error(grad, expected_grad) < 1e-12
    else:
        assert bool(torch.isnan(loss_value)) and bool(torch.isnan(expected_loss))


# ---------------------------------------------------------------------------------------------------------------------
# SparseMultipleNegativesRankingLoss on a SparseEncoder (inside SpladeLoss, as it is used)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splade_model(minilm_path):
    model = make_splade_model(minilm_path)
    # train() with dropout off: in eval() stock's SpladePooling applies relu_ in place, and backward then fails
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def _splade(model, inner):
    return stock_sparse_losses.SpladeLoss(model, inner, document_regularizer_weight=3e-5, query_regularizer_weight=5e-5)


@pytest.mark.parametrize("how", ["constructor", "fuse", "new", "stock-object-after-fuse"])
def test_sparse_mnrl_in_splade_loss_gives_stock_loss_and_gradients(how, splade_model):
    model = splade_model
    scale = 0.5 if how == "stock-object-after-fuse" else 1.0
    reference = _splade(model, stock_sparse_losses.SparseMultipleNegativesRankingLoss(model, scale=scale))
    if how == "constructor":
        loss = _splade(model, fast_losses.SparseMultipleNegativesRankingLoss(model))
    elif how == "fuse":
        loss = fuse(_splade(model, stock_sparse_losses.SparseMultipleNegativesRankingLoss(model)))
    elif how == "new":
        inner = fast_losses.SparseMultipleNegativesRankingLoss.__new__(fast_losses.SparseMultipleNegativesRankingLoss)
        nn.Module.__init__(inner)
        inner.model = model
        for key, value in {**_mnrl_attributes(CASES["MNRL"]), "scale": 1.0, "similarity_fct": util.dot_score}.items():
            setattr(inner, key, value)
        loss = _splade(model, inner)
    else:
        stock_inner = stock_sparse_losses.SparseMultipleNegativesRankingLoss(model)
        unchanged = _run(model, _splade(model, stock_inner), columns=2).loss
        loss = fuse(_splade(model, stock_inner))
        stock_inner.scale = scale
        assert relative_error(_run(model, reference, columns=2).loss, unchanged) > 1e-3  # the change matters
    _assert_is_st_fast(loss)
    _assert_same(_run(model, loss, columns=2), _run(model, reference, columns=2))


# ---------------------------------------------------------------------------------------------------------------------
# Deprecation warnings: stock's, where stock gives them, and none of st_fast's own making
# ---------------------------------------------------------------------------------------------------------------------


def test_importing_st_fast_warns_nothing_deprecated():
    """Defining st_fast's subclasses of the deprecated symmetric aliases must not warn at import (under
    ``-W error::DeprecationWarning`` the stock trainer works, so must st_fast's)."""
    import subprocess
    import sys

    code = "import st_fast, st_fast.losses, st_fast.trainer, st_fast.swaps"
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["MNSRL", "CMNSRL"])
def test_the_deprecated_aliases_warn_as_stock_does(name, model, guide):
    case = CASES[name]
    with pytest.warns(DeprecationWarning, match="is deprecated and will be removed") as stock_warnings:
        case.stock(model, **case.kwargs)
    with pytest.warns(DeprecationWarning, match="is deprecated and will be removed") as fast_warnings:
        case.fast(model, **case.kwargs)
    assert [str(w.message) for w in fast_warnings] == [str(w.message) for w in stock_warnings]


# =====================================================================================================================
# The multi-vector (late interaction) losses on a tiny MultiVectorEncoder: every check above, or why it cannot apply
# =====================================================================================================================


@dataclass(frozen=True)
class MultiVectorCase:
    stock: type
    fast: type
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments after model
    cached: bool = False


# scale 2: MaxSim scores are sums over the query tokens (not cosines), stock's default is 1. similarity_fct is left at
# stock's default: what the installed version scores with (6.2: colbert_scores, 6.3: the model's similarity).
MV_CASES = {
    "MultiVectorMNRL": MultiVectorCase(
        stock_mv_losses.MultiVectorMultipleNegativesRankingLoss,
        fast_losses.MultiVectorMultipleNegativesRankingLoss,
        {"scale": 2.0, "score_mini_batch_size": 3},
    ),
    "CachedMultiVectorMNRL": MultiVectorCase(
        stock_mv_losses.CachedMultiVectorMultipleNegativesRankingLoss,
        fast_losses.CachedMultiVectorMultipleNegativesRankingLoss,
        {"scale": 2.0, "mini_batch_size": 3},
        cached=True,
    ),
}
MV_STOCK_LOSS_MODULES = (  # where the stock classes look up all_gather_padded / get_rank
    "sentence_transformers.multi_vector_encoder.losses.multiple_negatives_ranking",
    "sentence_transformers.multi_vector_encoder.losses.cached_multiple_negatives_ranking",
)
MV_WRAPPERS = tuple(
    wrapper
    for wrapper in (
        getattr(stock_mv_losses, name, None) for name in ("MultiVectorMatryoshkaLoss", "MultiVectorTokenPoolingLoss")
    )  # fmt: skip
    if wrapper is not None
)

# Each contract check of the dense classes above -> its multi-vector counterpart below, or why none can apply.
# test_every_contract_check_has_a_multi_vector_row fails on a dense check missing here (no silent gap).
NOT_APPLICABLE = "n/a: "
MV_CHECKS = {
    "test_built_the_ways_users_build_it_gives_stock_loss_and_gradients": "test_mv_built_the_ways_users_build_it",
    "test_new_built_instance_gives_stock_loss_and_gradients": "test_mv_new_built_instance",
    "test_train_mode_without_dropout_gives_stock_loss_and_gradients": "test_mv_train_mode_without_dropout",
    "test_renders_like_stock": "test_mv_renders_like_stock",
    "test_modes_of_model_and_guide_are_left_as_they_were": "test_mv_modes_of_the_model_are_left_as_they_were",
    "test_gist_guide_in_eval_stays_in_eval_with_the_st_fast_trainer": NOT_APPLICABLE
    + "no guide model (the modes of the one model: test_mv_modes_of_the_model_are_left_as_they_were)",
    "test_attribute_changes_after_construction_are_honoured": "test_mv_attribute_changes_after_construction",
    "test_learnable_scale_or_temperature_gets_stocks_gradient": "test_mv_learnable_scale_gets_stocks_gradient",
    "test_learnable_temperature_with_masked_entries_gets_the_exact_gradient": NOT_APPLICABLE
    + "no temperature and no masked logits (no guide margins): the scale's gradient is stock's own autograd's",
    "test_tensor_hardness_strength_gets_stocks_gradient": NOT_APPLICABLE
    + "stock's multi-vector losses have no hardness_mode / hardness_strength",
    "test_16bit_guide_gives_stock_loss_and_gradients": NOT_APPLICABLE + "no guide model",
    "test_gather_helpers_are_looked_up_where_stock_looks_them_up": "test_mv_gather_helpers_looked_up_as_stock",
    "test_loss_dtype_under_bf16_autocast_is_stocks": "test_mv_loss_dtype_under_bf16_autocast_is_stocks",
    "test_model_card_renders_like_stock": "test_mv_model_card_renders_like_stock",
    "test_replaced_module_gives_stock_answer_with_one_warning": "test_mv_replaced_scoring_gives_stock_answer",
    "test_a_nonpositive_scale_or_temperature_set_later_computes_stock": "test_mv_any_scale_set_later_is_stocks",
    "test_layouts_only_stock_computes_give_stocks_answer": NOT_APPLICABLE
    + "no compute_loss_from_embeddings: a batch reaches the loss as features through the model, every column with "
    "the batch's rows (stock stacks them), so more document rows than queries come only from gathering "
    "(test_mv_gather_helpers_looked_up_as_stock); empty documents and token axes: tests/ops/test_maxsim.py",
    "test_sparse_mnrl_in_splade_loss_gives_stock_loss_and_gradients": NOT_APPLICABLE + "SparseEncoder losses only",
    "test_importing_st_fast_warns_nothing_deprecated": "test_importing_st_fast_warns_nothing_deprecated"
    " (st_fast.losses imports the multi-vector modules: test_every_contract_check_has_a_multi_vector_row checks it)",
    "test_the_deprecated_aliases_warn_as_stock_does": NOT_APPLICABLE + "stock has no deprecated multi-vector alias",
    "test_module_identity_state_dict_and_copies_are_stocks": "test_mv_module_identity_state_dict_and_copies_are_stocks",
}


def test_every_contract_check_has_a_multi_vector_row():
    dense = {name for name in globals() if name.startswith("test_") and not name.startswith("test_mv_")}
    dense -= {"test_every_contract_check_has_a_multi_vector_row"}
    rows = set(MV_CHECKS)
    assert dense == rows, f"no multi-vector row: {sorted(dense - rows)}, stale rows: {sorted(rows - dense)}"
    for dense_name, row in MV_CHECKS.items():
        if not row.startswith(NOT_APPLICABLE):
            assert row.split()[0] in globals(), f"{dense_name}: {row.split()[0]} does not exist"
    import st_fast.losses

    assert {"MultiVectorMultipleNegativesRankingLoss", "CachedMultiVectorMultipleNegativesRankingLoss"} <= set(
        st_fast.losses.__all__
    )


@pytest.fixture(scope="module")
def pristine_mv(minilm_path):
    """A tiny random MultiVectorEncoder (conftest.make_tiny_multi_vector_model; its dropout probabilities are 0)."""
    return make_tiny_multi_vector_model(minilm_path)


@pytest.fixture
def mv_model(pristine_mv):
    return _copy(pristine_mv).eval()


def mv_stock_loss(case: MultiVectorCase, model, **overrides):
    return case.stock(model, **{**case.kwargs, **overrides})


def mv_fast_loss(case: MultiVectorCase, model, **overrides):
    return case.fast(model, **{**case.kwargs, **overrides})


def _mv_innermost(loss):
    while isinstance(loss, MV_WRAPPERS):
        loss = loss.loss
    return loss


def _assert_mv_is_st_fast(loss) -> None:
    inner = _mv_innermost(loss)
    assert type(inner).__module__.startswith("st_fast."), f"{type(inner).__module__}.{type(inner).__name__}"


def _mv_dataset() -> Dataset:
    return Dataset.from_dict({"query": TEXTS[0], "positive": TEXTS[1]})


def _mv_training_args(tmp_path, name: str = "run"):
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainingArguments

    return MultiVectorEncoderTrainingArguments(
        output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=7,
    )  # fmt: skip


def _mv_trainer_loss(how: str, model, loss, tmp_path):
    """``trainer.loss`` of st_fast.MultiVectorEncoderTrainer, or of the stock one under st_fast.patch()."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainer as StockMultiVectorTrainer

    kwargs = dict(model=model, args=_mv_training_args(tmp_path, how), train_dataset=_mv_dataset(), loss=loss)
    if how == "st_fast-trainer":
        return st_fast.MultiVectorEncoderTrainer(**kwargs).loss
    assert how == "patch"
    st_fast.patch()
    try:
        return StockMultiVectorTrainer(**kwargs).loss
    finally:
        st_fast.unpatch()


def _mv_wrapped(how: str, model, inner):
    """``inner`` inside the stock multi-vector wrapper ``how`` names (sentence-transformers >= 6.3 has them)."""
    if how == "matryoshka":
        return stock_mv_losses.MultiVectorMatryoshkaLoss(model, inner, [16, 8])
    from sentence_transformers.multi_vector_encoder.modules.token_pooling import HierarchicalTokenPooling

    # a pooler without trainable parameters (cached losses need one), and None: the unpooled variant too
    poolings = [HierarchicalTokenPooling(pool_factor=2), None]
    return stock_mv_losses.MultiVectorTokenPoolingLoss(model, inner, token_poolings=poolings, weights=[1.0, 0.5])


MV_WRAPPER_CLASS_NAMES = {"matryoshka": "MultiVectorMatryoshkaLoss", "token-pooling": "MultiVectorTokenPoolingLoss"}


def _mv_built(how: str, case: MultiVectorCase, model, tmp_path) -> tuple[nn.Module, nn.Module]:
    """(the st_fast loss built ``how``, the stock loss it must behave like)."""
    if how == "constructor":
        return mv_fast_loss(case, model), mv_stock_loss(case, model)
    if how == "fuse":
        return fuse(mv_stock_loss(case, model)), mv_stock_loss(case, model)
    if how in MV_WRAPPER_CLASS_NAMES:
        if not hasattr(stock_mv_losses, MV_WRAPPER_CLASS_NAMES[how]):
            pytest.skip(f"the installed sentence-transformers has no {MV_WRAPPER_CLASS_NAMES[how]} (added in 6.3)")
        return _mv_wrapped(how, model, mv_fast_loss(case, model)), _mv_wrapped(how, model, mv_stock_loss(case, model))
    return _mv_trainer_loss(how, model, mv_stock_loss(case, model), tmp_path), mv_stock_loss(case, model)


# the dense HOWS, with the multi-vector wrappers for the sentence-transformer ones
MV_HOWS = ("constructor", "fuse", "matryoshka", "token-pooling", "st_fast-trainer", "patch")
MV_HOWS_NOT_APPLICABLE = {
    "adaptive-layer": "AdaptiveLayerLoss wraps SentenceTransformer losses (it truncates the encoder's layers and "
    "reads pooled embeddings); stock has no multi-vector form of it",
}
assert set(HOWS) <= set(MV_HOWS) | set(MV_HOWS_NOT_APPLICABLE)
MV_BUILT = [(how, name) for how in MV_HOWS for name in MV_CASES]


@pytest.mark.parametrize(("how", "name"), MV_BUILT, ids=[f"{how}-{name}" for how, name in MV_BUILT])
def test_mv_built_the_ways_users_build_it(how, name, mv_model, tmp_path):
    loss, reference = _mv_built(how, MV_CASES[name], mv_model, tmp_path)
    _assert_mv_is_st_fast(loss)
    _assert_same(_run(mv_model, loss), _run(mv_model, reference))


def _stock_init_attributes(case: MultiVectorCase, model) -> dict[str, Any]:
    """The attributes the installed stock ``__init__`` sets (its submodules, the model, included; nn.Module's own state
    aside), read from a stock object."""
    stock = mv_stock_loss(case, model)
    plain = {key: value for key, value in vars(stock).items() if not key.startswith("_") and key != "training"}
    return {**plain, **stock._modules}


@pytest.mark.parametrize("name", MV_CASES)
def test_mv_new_built_instance(name, mv_model):
    """``__new__`` + ``nn.Module.__init__`` + the stock attributes set by hand: no st_fast constructor ran, so no
    st_fast-only attribute (``backend``, ``self_check``) is set; still stock's loss and gradients."""
    case = MV_CASES[name]
    loss = case.fast.__new__(case.fast)
    nn.Module.__init__(loss)
    for key, value in _stock_init_attributes(case, mv_model).items():
        setattr(loss, key, value)
    assert "backend" not in vars(loss)
    _assert_same(_run(mv_model, loss), _run(mv_model, mv_stock_loss(case, mv_model)))


@pytest.mark.parametrize("name", MV_CASES)
def test_mv_train_mode_without_dropout(name, mv_model):
    case = MV_CASES[name]
    for module in mv_model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    mv_model.train()
    _assert_same(_run(mv_model, mv_fast_loss(case, mv_model)), _run(mv_model, mv_stock_loss(case, mv_model)))
    assert mv_model.training and all(module.training for module in mv_model.modules())


@pytest.mark.parametrize("how", ["constructor", "fuse"])
@pytest.mark.parametrize("name", MV_CASES)
def test_mv_renders_like_stock(how, name, mv_model, tmp_path):
    loss, reference = _mv_built(how, MV_CASES[name], mv_model, tmp_path)
    _assert_mv_is_st_fast(loss)
    assert type(loss).__name__ == type(reference).__name__
    assert loss.get_config_dict() == reference.get_config_dict()
    assert loss.citation == reference.citation
    assert repr(loss) == repr(reference)


@pytest.mark.parametrize("name", MV_CASES)
def test_mv_module_identity_state_dict_and_copies_are_stocks(name, mv_model):
    """(st_fast 0.x's FusedMaxSimMixin was a frozen dataclass: every instance of a class equal to every other, one
    hash, its repr "ClassName()", and a container's modules() / parameters() skipped all but one of them)"""
    case = MV_CASES[name]
    _assert_module_semantics_like_stock(
        mv_fast_loss(case, mv_model), mv_stock_loss(case, mv_model),
        mv_fast_loss(case, mv_model), mv_stock_loss(case, mv_model),
    )  # fmt: skip


@pytest.mark.parametrize("how", ["fuse", "st_fast-trainer", "patch"])
@pytest.mark.parametrize("name", MV_CASES)
def test_mv_modes_of_the_model_are_left_as_they_were(how, name, mv_model, tmp_path):
    mv_model.train()
    _hf_model(mv_model).encoder.layer[0].eval()
    before = _modes(model=mv_model)
    stock = mv_stock_loss(MV_CASES[name], mv_model)
    loss = fuse(stock) if how == "fuse" else _mv_trainer_loss(how, mv_model, stock, tmp_path)
    _assert_mv_is_st_fast(loss)
    assert not _changed(before, _modes(model=mv_model))
    _run(mv_model, loss)
    changed = _changed(before, _modes(model=mv_model))
    assert not changed, changed


def _mv_target(target: str, case: MultiVectorCase, model) -> tuple[nn.Module, nn.Module]:
    if target == "st_fast-object":
        loss = mv_fast_loss(case, model)
        return loss, loss
    stock = mv_stock_loss(case, model)
    fused = fuse(stock)
    return fused, fused if target == "fused-object" else stock


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", MV_CASES)
def test_mv_attribute_changes_after_construction(target, name, mv_model):
    case = MV_CASES[name]
    loss, changed = _mv_target(target, case, mv_model)
    _assert_mv_is_st_fast(loss)
    reference = mv_stock_loss(case, mv_model)
    previous = _run(mv_model, reference).loss
    changes = [("scale", 7.0), ("similarity_fct", scoring.mean_colbert_scores), ("score_mini_batch_size", 2)]
    for attribute, value in changes:
        for target_object in (changed, reference):
            setattr(target_object, attribute, value)
        expected = _run(mv_model, reference)
        if attribute != "score_mini_batch_size":  # (a memory bound: the same loss)
            assert relative_error(expected.loss, previous) > 1e-3, f"{attribute}={value!r} must change stock's loss"
        previous = expected.loss
        _assert_same(_run(mv_model, loss), expected, what=f"after setting {attribute}={value!r}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", MV_CASES)
def test_mv_learnable_scale_gets_stocks_gradient(target, name, mv_model):
    """(the cached loss: the gradient reaches the parameter in the loss stage, through the returned loss's backward
    hook, as in stock)"""
    case = MV_CASES[name]
    loss, changed = _mv_target(target, case, mv_model)
    parameter, reference_parameter = nn.Parameter(torch.tensor(2.0)), nn.Parameter(torch.tensor(2.0))
    changed.scale = parameter
    reference = mv_stock_loss(case, mv_model)
    reference.scale = reference_parameter
    _assert_same(_run(mv_model, loss, extra=(parameter,)), _run(mv_model, reference, extra=(reference_parameter,)))


class FakePaddedGatherRankOne:
    """all_gather_padded of rank 1 of 2: [rank 0's documents, this rank's], rank 0's a fixed function of the local
    ones (two tokens wider, as the padding to the cross-rank width makes them; close enough to weigh in the
    softmax), without gradient; its mask drops every third token of rank 0's."""

    def all_gather_padded(self, tensor: torch.Tensor, mask: torch.Tensor, with_grad: bool = False):
        local = tensor.detach()
        other = torch.nn.functional.pad(local.roll(1, dims=0) + 0.3 * local.roll(1, dims=-1), (0, 0, 0, 2))
        other_mask = torch.nn.functional.pad(mask.roll(1, dims=0), (0, 2))
        other_mask[:, ::3] = False
        other_mask[:, 0] = True
        tensor = torch.nn.functional.pad(tensor, (0, 0, 0, 2))
        return torch.cat([other, tensor]), torch.cat([other_mask, torch.nn.functional.pad(mask, (0, 2))])

    @staticmethod
    def get_rank() -> int:
        return 1


@pytest.mark.parametrize("name", MV_CASES)
def test_mv_gather_helpers_looked_up_as_stock(name, mv_model, monkeypatch):
    case = MV_CASES[name]
    fake = FakePaddedGatherRankOne()
    for module in MV_STOCK_LOSS_MODULES:
        monkeypatch.setattr(f"{module}.all_gather_padded", fake.all_gather_padded)
        monkeypatch.setattr(f"{module}.get_rank", fake.get_rank)
    expected = _run(mv_model, mv_stock_loss(case, mv_model, gather_across_devices=True))
    alone = _run(mv_model, mv_stock_loss(case, mv_model))
    assert relative_error(alone.loss, expected.loss) > 1e-3  # the fakes change stock's answer
    _assert_same(_run(mv_model, mv_fast_loss(case, mv_model, gather_across_devices=True)), expected)


@pytest.mark.parametrize("name", MV_CASES)
def test_mv_loss_dtype_under_bf16_autocast_is_stocks(name, mv_model):
    """Same dtype as stock; value and gradients within 2e-2 plus twice stock's own distance from its float32 answer
    (stock's einsum computes the products in bfloat16 under autocast, so does st_fast)."""
    case = MV_CASES[name]
    expected = _run_autocast(mv_model, mv_stock_loss(case, mv_model))
    actual = _run_autocast(mv_model, mv_fast_loss(case, mv_model))
    assert actual.loss.dtype == expected.loss.dtype
    stock_float32 = _run(mv_model, mv_stock_loss(case, mv_model))
    allowed = 2e-2 + 2 * relative_error(expected.loss, stock_float32.loss)
    assert relative_error(actual.loss, expected.loss) <= allowed
    assert actual.grads.keys() == expected.grads.keys()
    allowed = 2e-2 + 2 * relative_error(_flat(expected.grads), _flat(stock_float32.grads))
    assert relative_error(_flat(actual.grads), _flat(expected.grads)) <= allowed


@pytest.mark.parametrize("name", MV_CASES)
def test_mv_model_card_renders_like_stock(name, pristine_mv, tmp_path):
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainer as StockMultiVectorTrainer

    case = MV_CASES[name]
    cards = {}
    for label, trainer_class in (("stock", StockMultiVectorTrainer), ("st_fast", st_fast.MultiVectorEncoderTrainer)):
        model = _copy(pristine_mv)
        trainer = trainer_class(
            model=model, args=_mv_training_args(tmp_path, "card"), train_dataset=_mv_dataset(),
            loss=mv_stock_loss(case, model),
        )  # fmt: skip
        trainer.train()
        cards[label] = generate_model_card(model)
    _assert_mv_is_st_fast(trainer.loss)
    loss_lines = {
        label: [line for line in card.splitlines() if line.startswith("* Loss:")] for label, card in cards.items()
    }
    assert loss_lines["stock"] and loss_lines["st_fast"] == loss_lines["stock"]
    assert _comparable(cards["st_fast"]) == _comparable(cards["stock"])


def _cubed_colbert_scores(queries, documents, queries_mask=None, documents_mask=None, divisor=100.0):
    return scoring.colbert_scores(queries, documents, queries_mask, documents_mask) ** 3 / divisor


MV_REPLACEMENTS = {  # a scoring the fused op does not compute: stock's, with one warning
    "xtr": lambda: scoring.XTRScores(top_k=4),
    "custom-function": lambda: _cubed_colbert_scores,
    # a partial binding what the fused op does not take (here: a function of its own)
    "partial": lambda: functools.partial(_cubed_colbert_scores, divisor=30.0),
}


@pytest.mark.parametrize("replacement", MV_REPLACEMENTS)
@pytest.mark.parametrize("name", MV_CASES)
def test_mv_replaced_scoring_gives_stock_answer(name, replacement, mv_model, caplog):
    case = MV_CASES[name]
    reference = mv_stock_loss(case, mv_model)
    unchanged = _run(mv_model, reference).loss
    reference.similarity_fct = MV_REPLACEMENTS[replacement]()
    expected = _run(mv_model, reference)
    assert relative_error(expected.loss, unchanged) > 1e-3  # the replacement changes stock's answer
    loss = mv_fast_loss(case, mv_model)
    loss.similarity_fct = MV_REPLACEMENTS[replacement]()
    with caplog.at_level(logging.WARNING):
        actual = _run(mv_model, loss)
        _run(mv_model, loss)
    _assert_same(actual, expected, rtol=1e-6)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("st_fast") and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "stock" in warned[0], warned


@pytest.mark.parametrize("value", [0.0, -2.0, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
@pytest.mark.parametrize("name", MV_CASES)
def test_mv_any_scale_set_later_is_stocks(name, value, mv_model, caplog):
    """Unlike the dense fused ops (which leave a non-positive scale to stock, with a warning), the multi-vector losses
    multiply the fused scores by ``scale`` as stock multiplies its own: any value set after construction (stock's
    constructor refuses a non-positive one) gives stock's answer, fused, without a warning."""
    case = MV_CASES[name]
    loss, reference = mv_fast_loss(case, mv_model), mv_stock_loss(case, mv_model)
    for target in (loss, reference):
        target.scale = value
    expected = _run(mv_model, reference)
    with caplog.at_level(logging.WARNING):
        actual = _run(mv_model, loss)
    _assert_same_or_same_nonfinite(actual, expected)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("st_fast") and r.levelno == logging.WARNING]
    assert not warned, warned
    assert loss.fallback_reason() is None and loss.plan(torch.device("cpu"), torch.float32).fused
