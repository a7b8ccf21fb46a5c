"""st_fast.losses.MultipleNegativesRankingLoss (+ the symmetric alias) against the stock classes.

Reference: the stock class on float64 copies of the same fresh random embeddings; st_fast runs on float32 (or
float16 in the interpreter) inputs. Errors are norm-wise relative errors of the loss and of every gradient.
"""

from __future__ import annotations

import functools
import itertools
import logging
import warnings

import pytest
import torch
from parity import (
    HARDNESS_MODES,
    assert_parity,
    direction_partition_grid,
    float64_copies,
    loss_and_grads,
    random_columns,
    relative_error,
)
from sentence_transformers import util
from sentence_transformers.sentence_transformer import losses as stock_losses

from st_fast import losses as fast_losses
from st_fast.ops.backends import native_available

FP32_RTOL = 1e-5
CONFIGS = [
    (directions, partition, hardness)
    for (directions, partition), hardness in itertools.product(direction_partition_grid(), HARDNESS_MODES)
]
SHAPES = [(batch, dim) for batch in (1, 7, 33) for dim in (16, 48)]


def _pair(directions, partition, hardness, similarity_fct, backend, scale=None):
    if scale is None:  # the stock docs' advice: scale 20 for cosine, 1 for dot products (logits of order 10)
        scale = 1.0 if similarity_fct is util.dot_score else 20.0
    kwargs = dict(
        scale=scale, similarity_fct=similarity_fct, directions=directions, partition_mode=partition,
        hardness_mode=hardness, hardness_strength=0.0 if hardness is None else 2.5,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hardness_mode with strength 0 warns in stock; tested separately
        stock = stock_losses.MultipleNegativesRankingLoss(None, **kwargs)
        fast = fast_losses.MultipleNegativesRankingLoss(None, backend=backend, **kwargs)
    return stock, fast


def _check(stock, fast, embeddings, rtol):
    expected = loss_and_grads(lambda e: stock.compute_loss_from_embeddings(e, None), float64_copies(embeddings))
    baseline = loss_and_grads(lambda e: stock.compute_loss_from_embeddings(e, None), embeddings)
    actual = loss_and_grads(lambda e: fast.compute_loss_from_embeddings(e, None), embeddings)
    assert_parity(actual, expected, baseline, rtol=rtol)


@pytest.mark.parametrize("directions, partition, hardness", CONFIGS)
@pytest.mark.parametrize("negatives", [0, 1, 3])
@pytest.mark.parametrize("similarity_fct", [util.cos_sim, util.dot_score], ids=["cos", "dot"])
@pytest.mark.parametrize("batch, dim", SHAPES)
def test_torch_backend_matches_stock(directions, partition, hardness, negatives, similarity_fct, batch, dim):
    stock, fast = _pair(directions, partition, hardness, similarity_fct, "torch")
    _check(stock, fast, random_columns(batch, dim, 2 + negatives, seed=batch * 100 + dim), FP32_RTOL)


@pytest.mark.skipif(not native_available(torch.device("cpu")), reason="native CPU row kernel not built")
@pytest.mark.parametrize("directions, partition, hardness", CONFIGS)
@pytest.mark.parametrize("negatives", [0, 1, 3])
@pytest.mark.parametrize("similarity_fct", [util.cos_sim, util.dot_score], ids=["cos", "dot"])
@pytest.mark.parametrize("batch, dim", [(1, 16), (7, 48), (33, 16)])
def test_native_backend_matches_stock(directions, partition, hardness, negatives, similarity_fct, batch, dim):
    stock, fast = _pair(directions, partition, hardness, similarity_fct, "native")
    _check(stock, fast, random_columns(batch, dim, 2 + negatives, seed=batch * 100 + dim), FP32_RTOL)


def test_float64_embeddings_match_stock_to_float64_precision():
    stock, fast = _pair(("query_to_doc", "doc_to_query"), "joint", "all_negatives", util.cos_sim, "auto")
    embeddings = random_columns(9, 24, 3, dtype=torch.float64)
    _check(stock, fast, embeddings, 1e-12)


def test_symmetric_alias_matches_stock():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        stock = stock_losses.MultipleNegativesSymmetricRankingLoss(None, scale=13.0)
        fast = fast_losses.MultipleNegativesSymmetricRankingLoss(None, scale=13.0, backend="torch")
    assert fast.get_config_dict() == stock.get_config_dict()
    _check(stock, fast, random_columns(11, 16, 3), FP32_RTOL)


def test_config_dict_citation_and_class_relationship():
    stock, fast = _pair(("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives", util.cos_sim, "torch")
    assert isinstance(fast, stock_losses.MultipleNegativesRankingLoss)
    assert fast.get_config_dict() == stock.get_config_dict()
    assert fast.citation == stock.citation
    assert fast.temperature == stock.temperature


def test_extreme_scale_stays_finite():
    stock, fast = _pair(("query_to_doc",), "joint", None, util.cos_sim, "torch", scale=100.0)
    embeddings = random_columns(7, 48, 2)
    _check(stock, fast, embeddings, FP32_RTOL)


def test_non_contiguous_inputs():
    stock, fast = _pair(("query_to_doc", "doc_to_doc"), "joint", None, util.cos_sim, "torch")
    base = torch.randn(3, 48, 7, dtype=torch.float64)
    embeddings = [base[i].T.float().requires_grad_() for i in range(3)]  # (7, 48) views with transposed strides
    assert not embeddings[0].is_contiguous()
    _check(stock, fast, embeddings, FP32_RTOL)


def test_unsupported_similarity_falls_back_to_stock_with_one_warning(caplog):
    def my_similarity(a, b):
        return util.cos_sim(a, b) * 0.5

    stock, fast = _pair(("query_to_doc",), "joint", None, my_similarity, "torch")
    embeddings = random_columns(5, 16, 2)
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        _check(stock, fast, embeddings, FP32_RTOL)
        _check(stock, fast, embeddings, FP32_RTOL)
    warnings_seen = [r for r in caplog.records if "no fused kernel" in r.getMessage()]
    assert len(warnings_seen) == 1


def test_argument_free_partial_of_cos_sim_is_fused():
    from st_fast.losses.similarity import fused_similarity_name

    assert fused_similarity_name(functools.partial(util.cos_sim)) == "cos"
    assert fused_similarity_name(util.dot_score) == "dot"
    assert fused_similarity_name(util.euclidean_sim) is None


@pytest.mark.parametrize(
    "embeddings, error, match",
    [
        ([torch.randn(4, 8)], ValueError, "at least 2"),
        ([torch.randn(4, 8), torch.randn(4, 9)], ValueError, "shape"),
        ([torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64)], TypeError, "dtype"),
        ([torch.randn(8), torch.randn(8)], ValueError, "2-D"),
    ],
)
def test_bad_input_gets_a_clear_error(embeddings, error, match):
    """(An empty batch and candidate columns with more rows than the anchors are stock layouts: stock computes them,
    tests/test_drop_in_contract.py::test_layouts_only_stock_computes_give_stocks_answer.)"""
    fast = fast_losses.MultipleNegativesRankingLoss(None, backend="torch")
    with pytest.raises(error, match=match):
        fast.compute_loss_from_embeddings(embeddings, None)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        fast_losses.MultipleNegativesRankingLoss(None, backend="cuda")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_give_a_non_finite_loss_as_stock(bad):
    stock, fast = _pair(("query_to_doc",), "joint", None, util.cos_sim, "torch")
    embeddings = random_columns(5, 16, 2)
    with torch.no_grad():
        embeddings[1][2, 3] = bad
    assert not torch.isfinite(stock.compute_loss_from_embeddings(float64_copies(embeddings), None))
    assert not torch.isfinite(fast.compute_loss_from_embeddings(embeddings, None))


def test_forward_with_a_real_model_matches_stock(tiny_model):
    stock, fast = _pair(("query_to_doc",), "joint", None, util.cos_sim, "torch")
    stock.model = fast.model = tiny_model
    tiny_model.eval()  # no dropout: both forwards see identical embeddings
    texts = [
        ["a cat sat", "dogs bark loudly", "rain today", "tea is hot"],
        ["a kitten sits", "a dog barks", "it is raining", "hot drinks"],
    ]
    features = [tiny_model.preprocess(column) for column in texts]
    ref = stock(features, None)
    ref.backward()
    ref_grads = [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]
    tiny_model.zero_grad()
    out = fast(features, None)
    out.backward()
    grads = [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]
    assert relative_error(out, ref) < FP32_RTOL
    assert len(grads) == len(ref_grads) > 0
    # One norm over all parameters: some (attention key biases) have a gradient that is exactly 0 in exact math
    # (softmax shift invariance), so per-tensor ratios would only compare rounding noise.
    assert relative_error(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])) < 1e-5


# --- triton backend, in the Triton CPU interpreter (fp32 / fp16 only: the interpreter computes bf16 wrongly) ---
TRITON_CASES = [
    (directions, partition, hardness, negatives, similarity_fct)
    for index, ((directions, partition, hardness), negatives, similarity_fct) in enumerate(
        itertools.product(CONFIGS, (0, 1, 3), (util.cos_sim, util.dot_score))
    )
    if index % 2 == 0  # every config, negatives count and similarity appears; halves the interpreter time
]


@pytest.mark.parametrize("directions, partition, hardness, negatives, similarity_fct", TRITON_CASES)
def test_triton_backend_matches_stock(directions, partition, hardness, negatives, similarity_fct):
    stock, fast = _pair(directions, partition, hardness, similarity_fct, "triton")
    _check(stock, fast, random_columns(7, 16, 2 + negatives, seed=negatives), FP32_RTOL)


@pytest.mark.parametrize(
    "directions, partition, hardness, batch, dim",
    [
        (("query_to_doc",), "joint", None, 1, 16),
        (ALL := ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", "in_batch_negatives", 1, 48),
        (ALL, "joint", "all_negatives", 33, 48),
        (("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives", 33, 16),
    ],
)
def test_triton_backend_matches_stock_at_other_shapes(directions, partition, hardness, batch, dim):
    stock, fast = _pair(directions, partition, hardness, util.cos_sim, "triton")
    _check(stock, fast, random_columns(batch, dim, 3, seed=batch), FP32_RTOL)


# fp16 operands: st_fast normalizes in fp32 and hands the kernel fp16 unit vectors, so each element carries one more
# rounding (relative <= 2^-11) than stock, which computes in fp32 from the same fp16 inputs. A similarity then moves
# by <= 2·2^-11 ≈ 1e-3, a logit by <= scale·1e-3 = 0.02 at scale 20: that bounds the loss error (relative to a loss
# of ~2) by ~1e-2 and the softmax/gradient error by ~2e-2; random rounding makes typical errors ~10x smaller.
FP16_RTOL = 2e-2


@pytest.mark.parametrize(
    "directions, partition, hardness",
    [
        (("query_to_doc",), "joint", None),
        (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", "all_negatives"),
        (("query_to_doc", "doc_to_query"), "per_direction", "in_batch_negatives"),
    ],
)
def test_triton_backend_fp16_inputs_against_fp32_reference(directions, partition, hardness):
    stock, fast = _pair(directions, partition, hardness, util.cos_sim, "triton")
    embeddings = random_columns(9, 48, 3, dtype=torch.float16)
    fp32 = [x.detach().float().requires_grad_() for x in embeddings]  # the same fp16 values, as stock sees them
    expected = loss_and_grads(lambda e: stock.compute_loss_from_embeddings(e, None), float64_copies(fp32))
    baseline = loss_and_grads(lambda e: stock.compute_loss_from_embeddings(e, None), fp32)
    loss, grads = loss_and_grads(lambda e: fast.compute_loss_from_embeddings(e, None), embeddings)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float16 for g in grads)
    assert_parity((loss, grads), expected, baseline, rtol=FP16_RTOL)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_batch_by_candidates_allocation(backend, monkeypatch):
    """The largest tensor allocated during forward + backward is smaller than half a B x N fp32 score matrix
    (torch backend: with a chunk budget below B x N, as it is for large batches by default)."""
    from torch.profiler import ProfilerActivity, profile

    from st_fast.ops import chunked

    batch, dim, columns = 64, 16, 9  # N = 8·B candidates: B x N fp32 = 128 KiB; the docs operand is 32 KiB
    score_matrix_bytes = batch * batch * (columns - 1) * 4
    monkeypatch.setitem(chunked.DEFAULT_CHUNK_BYTES, "cpu", score_matrix_bytes // 8)
    embeddings = random_columns(batch, dim, columns)
    fast = fast_losses.MultipleNegativesRankingLoss(None, directions=("query_to_doc", "doc_to_doc"), backend=backend)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fast.compute_loss_from_embeddings(embeddings, None).backward()
    # an op's cpu_memory_usage includes its children's: count the ops that allocate themselves
    allocations = sorted(
        e.cpu_memory_usage
        for e in prof.events()
        if e.cpu_memory_usage > 0 and not any(child.cpu_memory_usage > 0 for child in e.cpu_children)
    )
    assert allocations and allocations[-1] < score_matrix_bytes // 2, allocations[-5:]


def test_triton_backend_on_cpu_without_the_interpreter_is_a_clear_error():
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from st_fast.ops import fused_mnrl_loss\n"
        "try:\n"
        "    fused_mnrl_loss(torch.randn(3, 8), [torch.randn(3, 8)], backend='triton')\n"
        "except RuntimeError as exc:\n"
        "    print('ERROR:', exc)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERROR:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr
