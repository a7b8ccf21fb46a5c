"""mask_duplicates on the drop-in losses: MNRL, the symmetric alias, the cached (GradCache) classes and the trainer
option, against the PyTorch reference (tests/duplicates.py) on the labels of the real texts; the config dict / model
card; the clear errors; and the gathered simulation (rank 1 of 2: texts gathered with the embeddings)."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from datasets import Dataset
from duplicates import reference_masked_loss
from parity import relative_error
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer import losses as stock_losses

from st_fast import losses as fast_losses
from st_fast.ops.backends import native_available
from st_fast.ops.text_labels import text_labels

CPU_BACKENDS = ["torch"] + (["native"] if native_available(torch.device("cpu")) else [])
STOCK_MODULE = "sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking"
SYMMETRIC = ("query_to_doc", "doc_to_query")
ALL_FOUR = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")

# anchors, positives, hard negatives: "a cat sat" twice among the anchors, "a kitten sits" a positive twice and a
# hard negative of another row, "a dog barks" a positive and a hard negative, row 4's negative equals its positive
TEXTS = [
    ["a cat sat", "dogs bark loudly", "a cat sat", "tea is hot", "rain today"],
    ["a kitten sits", "a dog barks", "a kitten sits", "hot drinks", "it is raining"],
    ["a dog barks", "cold water", "a kitten sits", "green tea", "it is raining"],
]


def _features(model, columns=3):
    return [model.preprocess(column) for column in TEXTS[:columns]]


def _reference_step(model, features, config):
    """Loss and parameter gradients of the reference (stock math + duplicate mask on the texts' labels)."""
    model.zero_grad()
    embeddings = embed_columns(model, features)
    all_labels = text_labels(features)
    batch = embeddings[0].shape[0]
    loss = reference_masked_loss(embeddings[0], embeddings[1:], (all_labels[:batch], all_labels[batch:]), **config)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _step(loss_fn, model, features):
    model.zero_grad()
    loss = loss_fn(features, None)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _assert_close(actual, expected, rtol=1e-5):
    assert relative_error(actual[0], expected[0]) < rtol
    # one norm over all parameters (see tests/losses/test_multiple_negatives_ranking.py)
    assert relative_error(actual[1], expected[1]) < rtol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "config",
    [
        {},
        dict(directions=ALL_FOUR),
        dict(
            directions=SYMMETRIC, partition_mode="per_direction", hardness_mode="all_negatives", hardness_strength=5.0
        ),
    ],
    ids=["default", "all4-joint", "symmetric-per_direction-all_negatives"],
)
def test_mnrl_forward_masks_duplicate_texts(tiny_model, backend, config):
    tiny_model.eval()  # no dropout: both forwards see identical embeddings
    features = _features(tiny_model)
    loss = fast_losses.MultipleNegativesRankingLoss(tiny_model, backend=backend, mask_duplicates=True, **config)
    actual = _step(loss, tiny_model, features)
    expected = _reference_step(tiny_model, features, {"scale": 20.0, **config})
    _assert_close(actual, expected)
    unmasked = _step(
        fast_losses.MultipleNegativesRankingLoss(tiny_model, backend=backend, **config), tiny_model, features
    )
    assert relative_error(unmasked[0], actual[0]) > 1e-3  # the batch's duplicates do change the loss


def test_triton_backend_masks_duplicate_texts(tiny_model):
    """The Triton kernels in the CPU interpreter, through the drop-in loss."""
    tiny_model.eval()
    features = _features(tiny_model)
    config = dict(directions=SYMMETRIC, hardness_mode="in_batch_negatives", hardness_strength=5.0)
    loss = fast_losses.MultipleNegativesRankingLoss(tiny_model, backend="triton", mask_duplicates=True, **config)
    _assert_close(_step(loss, tiny_model, features), _reference_step(tiny_model, features, {"scale": 20.0, **config}))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cached_mnrl_masks_across_mini_batches(tiny_model, backend):
    """GradCache with mini-batches of 2: the duplicates sit in different mini-batches; same loss and gradients as
    the reference on the whole batch."""
    tiny_model.eval()
    features = _features(tiny_model)
    loss = fast_losses.CachedMultipleNegativesRankingLoss(
        tiny_model, mini_batch_size=2, backend=backend, mask_duplicates=True, directions=SYMMETRIC
    )
    actual = _step(loss, tiny_model, features)
    expected = _reference_step(tiny_model, features, {"scale": 20.0, "directions": SYMMETRIC})
    _assert_close(actual, expected)


def test_symmetric_aliases_take_mask_duplicates(tiny_model):
    tiny_model.eval()
    features = _features(tiny_model, columns=2)
    config = {"scale": 20.0, "directions": SYMMETRIC, "partition_mode": "per_direction"}
    expected = _reference_step(tiny_model, features, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plain = fast_losses.MultipleNegativesSymmetricRankingLoss(tiny_model, mask_duplicates=True)
        cached = fast_losses.CachedMultipleNegativesSymmetricRankingLoss(
            tiny_model, mini_batch_size=3, mask_duplicates=True
        )
    _assert_close(_step(plain, tiny_model, features), expected)
    _assert_close(_step(cached, tiny_model, features), expected)


def test_without_duplicates_identical_to_stock(tiny_model):
    """Distinct texts: mask_duplicates=True gives the unmasked loss and gradients bit for bit; the default (False)
    has stock's config dict."""
    tiny_model.eval()
    features = [tiny_model.preprocess(c) for c in (["a", "b c", "d"], ["e", "f", "g h"])]
    masked = _step(fast_losses.MultipleNegativesRankingLoss(tiny_model, mask_duplicates=True), tiny_model, features)
    plain = _step(fast_losses.MultipleNegativesRankingLoss(tiny_model), tiny_model, features)
    assert torch.equal(masked[0], plain[0]) and torch.equal(masked[1], plain[1])


def test_config_dict_records_the_option_only_when_on(tiny_model):
    stock = stock_losses.MultipleNegativesRankingLoss(tiny_model)
    assert fast_losses.MultipleNegativesRankingLoss(tiny_model).get_config_dict() == stock.get_config_dict()
    config = fast_losses.MultipleNegativesRankingLoss(tiny_model, mask_duplicates=True).get_config_dict()
    assert config == {**stock.get_config_dict(), "mask_duplicates": True}
    with pytest.raises(TypeError, match="mask_duplicates must be a bool"):
        fast_losses.MultipleNegativesRankingLoss(tiny_model, mask_duplicates="yes")


def test_clear_errors(tiny_model):
    loss = fast_losses.MultipleNegativesRankingLoss(tiny_model, mask_duplicates=True)
    embeddings = [torch.randn(3, 8), torch.randn(3, 8)]
    with pytest.raises(RuntimeError, match="call the loss itself"):
        loss.compute_loss_from_embeddings(embeddings, None)
    with pytest.raises(ValueError, match="no 2-D 'input_ids'"):
        loss([{"pixel_values": torch.zeros(3, 3, 4, 4)}, {"pixel_values": torch.zeros(3, 3, 4, 4)}], None)
    # a configuration the fused op cannot compute: no silent unmasked stock loss
    from sentence_transformers import util

    manhattan = fast_losses.MultipleNegativesRankingLoss(
        tiny_model, mask_duplicates=True, similarity_fct=util.manhattan_sim
    )
    with pytest.raises(ValueError, match="mask_duplicates=True cannot be computed here"):
        manhattan(_features(tiny_model), None)


# --------------------------------------------------------------------------------------------------------------------
# Gathered simulation: this process is rank 1 of 2
# --------------------------------------------------------------------------------------------------------------------


class FakeRankGather:
    """``all_gather_with_grad`` as rank 1 of 2 sees it: rank 0's tensors first. Embeddings (float) come from
    ``embeddings`` in call order; the texts' width (a 1-element int tensor) and token rows from ``rows``, padded with
    -1 to the common width as every rank pads its own."""

    def __init__(self, embeddings: list[torch.Tensor], rows: torch.Tensor) -> None:
        self.embeddings, self.rows = list(embeddings), rows

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            return torch.cat([self.embeddings.pop(0).to(tensor.dtype), tensor])
        if tensor.dim() == 1:  # the widths
            return torch.cat([torch.tensor([self.rows.shape[1]]), tensor])
        other = torch.nn.functional.pad(self.rows, (0, tensor.shape[1] - self.rows.shape[1]), value=-1)
        return torch.cat([other, tensor])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("directions", [("query_to_doc",), SYMMETRIC, ALL_FOUR])
def test_gathered_rank1_masks_duplicates_of_other_ranks(monkeypatch, tiny_model, backend, directions):
    """Rank 0 holds texts equal to rank 1's (an anchor, a positive, a negative): they are masked too. Reference: the
    masked loss of rank 1's rows over the gathered batch, with the labels of all 2·B·3 texts."""
    from st_fast.ops.text_labels import token_rows

    tiny_model.eval()
    rank0_texts = [
        ["a cat sat", "x y", "z", "dogs bark loudly", "w"],
        ["a dog barks", "q r", "a kitten sits", "s", "t u v w"],
        ["a kitten sits", "m", "n", "o p", "hot drinks"],
    ]
    rank0_features = [tiny_model.preprocess(c) for c in rank0_texts]
    local_features = _features(tiny_model)
    with torch.no_grad():
        rank0_embeddings = [e.detach() for e in embed_columns(tiny_model, rank0_features)]
    module = importlib.import_module(STOCK_MODULE)  # st_fast looks the helpers up there
    monkeypatch.setattr(module, "all_gather_with_grad", FakeRankGather(rank0_embeddings, token_rows(rank0_features)))
    monkeypatch.setattr(module, "get_rank", lambda: 1)
    loss = fast_losses.MultipleNegativesRankingLoss(
        tiny_model, backend=backend, mask_duplicates=True, gather_across_devices=True, directions=directions
    )
    actual = _step(loss, tiny_model, local_features)

    tiny_model.zero_grad()
    local = embed_columns(tiny_model, local_features)
    gathered = [torch.cat([other, mine]) for other, mine in zip(rank0_embeddings, local, strict=True)]
    batch = local[0].shape[0]
    # the labels of every text, column-major over the ranks: [rank 0's anchors, rank 1's anchors, rank 0's ...]
    all_texts = [rank0_texts[c] + TEXTS[c] for c in range(3)]
    merged = [tiny_model.preprocess(column) for column in all_texts]
    labels = text_labels(merged)
    width = 2 * batch
    reference = reference_masked_loss(
        gathered[0], gathered[1:], (labels[:width], labels[width:]), row_offset=batch, batch_size=batch,
        directions=directions,
    )  # fmt: skip
    reference.backward()
    expected = reference.detach(), torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])
    _assert_close(actual, expected)
    # rank 0's duplicates matter: without its texts' labels (local duplicates only) the loss differs
    local_only = text_labels(local_features)
    other = torch.arange(10_000, 10_000 + batch)  # rank 0's texts as distinct from everything
    partial = (
        torch.cat([other, local_only[:batch]]),
        torch.cat([other + batch, local_only[batch : 2 * batch], other + 2 * batch, local_only[2 * batch :]]),
    )
    with torch.no_grad():
        without = reference_masked_loss(
            gathered[0], gathered[1:], partial, row_offset=batch, batch_size=batch, directions=directions
        )
    assert relative_error(without, expected[0]) > 1e-4


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


def _trainer(model, loss, tmp_path, **st_fast):
    from sentence_transformers import SentenceTransformerTrainingArguments

    from st_fast import SentenceTransformerTrainer

    dataset = Dataset.from_dict({"anchor": TEXTS[0] * 2, "positive": TEXTS[1] * 2})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=5, max_steps=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss, st_fast=st_fast)


def test_trainer_option_sets_the_loss_and_the_model_card(tiny_model, tmp_path):
    stock = stock_losses.MultipleNegativesRankingLoss(tiny_model)
    trainer = _trainer(tiny_model, stock, tmp_path, mask_duplicates=True)
    assert isinstance(trainer.loss, fast_losses.MultipleNegativesRankingLoss) and trainer.loss.mask_duplicates
    assert "mask_duplicates on" in trainer.st_fast_report["loss"]
    assert not getattr(stock, "mask_duplicates", False)  # the user's stock object computes as before
    trainer.train()
    tiny_model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert '"mask_duplicates": true' in card
    # a later fuse() of the user's stock object is its stock equivalent again: no masking carried over
    refused = fast_losses.fuse(stock)
    assert not refused.mask_duplicates and "mask_duplicates" not in refused.get_config_dict()


def test_trainer_option_reaches_losses_inside_wrappers(tiny_model, tmp_path):
    inner = stock_losses.MultipleNegativesRankingLoss(tiny_model)
    loss = stock_losses.MatryoshkaLoss(tiny_model, inner, matryoshka_dims=[32, 16])
    trainer = _trainer(tiny_model, loss, tmp_path, mask_duplicates=True)
    assert isinstance(trainer.loss.loss, fast_losses.MultipleNegativesRankingLoss) and trainer.loss.loss.mask_duplicates
    assert "mask_duplicates on" in trainer.st_fast_report["loss"]
    # the wrapper calls the inner loss with the features: the masked loss of each dimension
    tiny_model.eval()
    features = _features(tiny_model, columns=2)
    actual = _step(trainer.loss, tiny_model, features)
    unmasked = stock_losses.MatryoshkaLoss(
        tiny_model, stock_losses.MultipleNegativesRankingLoss(tiny_model), matryoshka_dims=[32, 16]
    )
    plain = _step(unmasked, tiny_model, features)
    assert relative_error(actual[0], plain[0]) > 1e-3
    without = _trainer(tiny_model, stock_losses.MultipleNegativesRankingLoss(tiny_model), tmp_path)
    assert "mask_duplicates" not in without.st_fast_report["loss"]


def test_trainer_option_leaves_the_users_own_objects_as_they_are(tiny_model, tmp_path):
    """The option masks the losses the trainer fuses; an st_fast loss the user built keeps its own setting (the
    report says so), a later trainer without the option on the same stock object does not mask, and a loss left
    stock says the option does not apply."""
    import st_fast

    own = st_fast.losses.MultipleNegativesRankingLoss(tiny_model)  # `import st_fast` reaches st_fast.losses
    trainer = _trainer(tiny_model, own, tmp_path, mask_duplicates=True)
    assert trainer.loss is own and not own.mask_duplicates
    assert "mask_duplicates off (an st_fast loss object you built" in trainer.st_fast_report["loss"]
    stock = stock_losses.MultipleNegativesRankingLoss(tiny_model)
    assert _trainer(tiny_model, stock, tmp_path, mask_duplicates=True).loss.mask_duplicates
    again = _trainer(tiny_model, stock, tmp_path)
    assert not again.loss.mask_duplicates and "mask_duplicates" not in again.st_fast_report["loss"]
    cosent = _trainer(tiny_model, stock_losses.CoSENTLoss(tiny_model), tmp_path, mask_duplicates=True)
    assert "mask_duplicates applies to the MultipleNegativesRankingLoss family only" in cosent.st_fast_report["loss"]


def test_trainer_option_is_validated():
    from st_fast import StFastConfig

    with pytest.raises(TypeError, match="mask_duplicates"):
        StFastConfig(mask_duplicates="yes")
    with pytest.raises(ValueError, match="needs the fused losses"):
        StFastConfig(loss=False, mask_duplicates=True)
