"""mask_duplicates at the op level: fused_mnrl_loss(..., labels=...) against the float64 PyTorch reference
(tests/duplicates.py: stock's math with the duplicate entries at -inf), loss and gradients, over the configuration
grid with batches whose texts repeat among anchors, positives and hard negatives; identical to the unmasked loss
without duplicates; the gathered (row offset) layout; the Triton backend's refusal; the exact text labels."""

from __future__ import annotations

import pytest
import torch
from duplicates import duplicate_batch, reference_masked_loss
from parity import HARDNESS_MODES, assert_parity, direction_partition_grid, float64_copies, loss_and_grads

from st_fast.ops import fused_mnrl_loss
from st_fast.ops.backends import native_available
from st_fast.ops.text_labels import exact_labels, text_keys, text_labels, token_rows

FP32_RTOL = 1e-5
CPU_BACKENDS = ["torch"] + (["native"] if native_available(torch.device("cpu")) else [])
GRID = direction_partition_grid()


def _config(directions, partition, hardness, similarity):
    return dict(
        directions=directions, partition_mode=partition, hardness_mode=hardness,
        hardness_strength=5.0 if hardness else 0.0, similarity=similarity, scale=20.0,
    )  # fmt: skip


def _check(backend, config, width, k, dim, seed, *, row_offset=0, batch_size=None, chunk_bytes=None):
    queries, docs, labels = duplicate_batch(width, k, dim, seed=seed)
    embeddings = [queries, *docs]
    local = dict(row_offset=row_offset, batch_size=batch_size)

    def fused(e):
        return fused_mnrl_loss(e[0], e[1:], backend=backend, labels=labels, **local, **config)

    def reference(e):
        return reference_masked_loss(e[0], e[1:], labels, **local, **config)

    actual = loss_and_grads(fused, embeddings)
    expected = loss_and_grads(reference, float64_copies(embeddings))
    baseline = loss_and_grads(reference, embeddings)
    assert_parity(actual, expected, baseline, rtol=FP32_RTOL)
    # the masking changes the loss (the batch has duplicates): the test is not vacuous
    with torch.no_grad():
        unmasked = reference_masked_loss(embeddings[0].double(), [d.double() for d in docs], None, **local, **config)
    assert abs(float(unmasked) - float(expected[0])) > 1e-4 * abs(float(expected[0]))


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("hardness", HARDNESS_MODES)
@pytest.mark.parametrize("directions, partition", GRID)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_loss_matches_reference(backend, directions, partition, hardness, k, similarity):
    config = _config(directions, partition, hardness, similarity)
    _check(backend, config, 7, k, 12, seed=100 * k + len(directions))


@pytest.mark.parametrize("directions, partition", GRID)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gathered_rows_match_reference(backend, directions, partition):
    """Local rows 4 .. 9 of W = 13 gathered columns (rank 1 of a gather): the doc_to_query direction mixes the
    positive block's columns with the other ranks' queries."""
    config = _config(directions, partition, "all_negatives", "cos")
    _check(backend, config, 13, 2, 12, seed=7, row_offset=4, batch_size=5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("directions", [("query_to_doc",), ("query_to_doc", "doc_to_query", "doc_to_doc")])
def test_chunked_rows_match_reference(monkeypatch, backend, directions):
    """Several row chunks (a 1 KiB budget: the symmetric path recomputes its tile, the column statistics continue
    across chunks)."""
    import st_fast.ops.mnrl.functional as functional

    original = functional.ContrastiveProblem
    monkeypatch.setattr(functional, "ContrastiveProblem", lambda *a, **kw: original(*a, **{**kw, "chunk_bytes": 1024}))
    _check(backend, _config(directions, "joint", None, "cos"), 11, 2, 8, seed=3)


@pytest.mark.parametrize("directions, partition", GRID)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_duplicates_identical_to_unmasked(backend, directions, partition):
    """Distinct labels mask nothing: the same loss and gradients, bit for bit, as without labels."""
    queries, docs, _ = duplicate_batch(9, 2, 12, seed=5)
    width = queries.shape[0]
    labels = (torch.arange(width), torch.arange(width, 3 * width))
    config = _config(directions, partition, "in_batch_negatives", "cos")
    embeddings = [queries, *docs]
    masked = loss_and_grads(
        lambda e: fused_mnrl_loss(e[0], e[1:], backend=backend, labels=labels, **config), embeddings
    )
    plain = loss_and_grads(lambda e: fused_mnrl_loss(e[0], e[1:], backend=backend, **config), embeddings)
    assert torch.equal(masked[0], plain[0])
    for got, want in zip(masked[1], plain[1], strict=True):
        assert torch.equal(got, want)


def test_bad_labels_get_a_clear_error():
    queries, docs, (query_labels, doc_labels) = duplicate_batch(5, 2, 8, seed=1)
    with pytest.raises(ValueError, match="doc labels must be an int64 tensor of shape"):
        fused_mnrl_loss(queries, docs, labels=(query_labels, doc_labels[:5]))
    with pytest.raises(ValueError, match="query labels must be an int64"):
        fused_mnrl_loss(queries, docs, labels=(query_labels.int(), doc_labels))


TRITON_CASES = [
    (("query_to_doc",), "joint", None, 2, "cos"),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", "all_negatives", 3, "cos"),
    (("query_to_doc", "doc_to_query"), "per_direction", "in_batch_negatives", 1, "dot"),
    (("query_to_doc", "doc_to_doc"), "joint", "hard_negatives", 2, "cos"),
]


@pytest.mark.parametrize("directions, partition, hardness, k, similarity", TRITON_CASES)
def test_triton_masked_loss_matches_reference(directions, partition, hardness, k, similarity):
    """The Triton kernels (interpreter) load the column labels per tile and mask the score tile."""
    _check("triton", _config(directions, partition, hardness, similarity), 7, k, 12, seed=100 * k + len(directions))


def test_triton_gathered_rows_match_reference():
    config = _config(("query_to_doc", "query_to_query", "doc_to_query"), "joint", None, "cos")
    _check("triton", config, 13, 2, 12, seed=7, row_offset=4, batch_size=5)


@pytest.fixture(params=[32, 256], ids=lambda lanes: f"lanes{lanes}")
def cuda_row_lanes(request, monkeypatch):
    """The CUDA row kernels with a warp per row (the default) and a block of 256 threads per row."""
    from st_fast import _native

    monkeypatch.setattr(_native, "CUDA_ROW_LANES", request.param)
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("directions, partition, hardness, k, similarity", TRITON_CASES)
def test_cuda_masked_loss_matches_reference(cuda_row_lanes, backend, directions, partition, hardness, k,
                                            similarity):  # fmt: skip
    """mask_duplicates on a GPU (benchmarks/gpu_check.sh): the CUDA row kernels (both lane layouts) and the compiled
    Triton kernels, fp32 without TF32, against the float64 reference on the CPU; gathered rows included."""
    if backend == "triton" and cuda_row_lanes != 32:
        pytest.skip("the row-lane switch is the native backend's")
    torch.backends.cuda.matmul.allow_tf32 = False
    config = _config(directions, partition, hardness, similarity)
    for width, row_offset, batch_size in ((37, 0, None), (41, 9, 17)):
        queries, docs, labels = duplicate_batch(width, k, 64, seed=width + k)
        embeddings = [queries, *docs]
        local = dict(row_offset=row_offset, batch_size=batch_size)
        cuda_labels = tuple(label.cuda() for label in labels)
        loss, grads = loss_and_grads(
            lambda e: fused_mnrl_loss(e[0], e[1:], backend=backend, labels=cuda_labels, **local, **config),  # noqa: B023
            [x.detach().cuda().requires_grad_() for x in embeddings],
        )
        actual = (loss.cpu(), [g.cpu() for g in grads])

        def reference(e):
            return reference_masked_loss(e[0], e[1:], labels, **local, **config)  # noqa: B023

        expected = loss_and_grads(reference, float64_copies(embeddings))
        baseline = loss_and_grads(reference, embeddings)
        assert_parity(actual, expected, baseline, rtol=1e-4)


def test_an_op_whose_triton_kernels_take_no_labels_declines():
    """The one dispatch point: ``auto`` picks another backend, an explicit ``triton`` is a clear error."""
    from st_fast.ops.backends import OpCapabilities, resolve_backend

    op = OpCapabilities("st_fast.ops.mnrl", auto_picks_triton=True, raw_16bit_operands=True)
    with pytest.raises(ValueError, match="triton backend does not implement mask_duplicates"):
        resolve_backend("triton", torch.device("cpu"), torch.float32, op, mask_duplicates=True)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32, op, mask_duplicates=True).name != "triton"


# --------------------------------------------------------------------------------------------------------------------
# Exact labels from token ids
# --------------------------------------------------------------------------------------------------------------------


def _features(texts: list[list[int]], *, left: bool = False) -> dict[str, torch.Tensor]:
    length = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        span = slice(length - len(text), length) if left else slice(0, len(text))
        ids[i, span] = torch.tensor(text)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_labels_equal_iff_token_ids_equal():
    anchors = _features([[101, 5, 6, 102], [101, 7, 102], [101, 5, 6, 102], [101, 5, 102]])
    positives = _features([[101, 5, 6, 102], [101, 7, 0, 102], [101, 7, 102], [101]], left=True)
    labels = text_labels([anchors, positives])
    texts = [[101, 5, 6, 102], [101, 7, 102], [101, 5, 6, 102], [101, 5, 102]]
    texts += [[101, 5, 6, 102], [101, 7, 0, 102], [101, 7, 102], [101]]
    for i, a in enumerate(texts):
        for j, b in enumerate(texts):
            assert bool(labels[i] == labels[j]) == (a == b), (i, j)


@pytest.mark.parametrize("key_bits", [1, 2, 3])
def test_key_collisions_never_give_distinct_texts_one_label(key_bits):
    """Keys truncated to a few bits collide for many distinct texts; the labels stay exact (ids confirmed)."""
    generator = torch.Generator().manual_seed(key_bits)
    texts = [torch.randint(0, 6, (int(n),), generator=generator).tolist() for n in torch.randint(1, 4, (40,))]
    features = _features(texts)
    rows = token_rows([features])
    keys = text_keys(rows, key_bits)
    assert len(set(keys.tolist())) < len({tuple(t) for t in texts})  # the keys do collide
    labels = exact_labels(rows, keys)
    for i, a in enumerate(texts):
        for j, b in enumerate(texts):
            assert bool(labels[i] == labels[j]) == (a == b), (i, j)


def test_features_without_input_ids_get_a_clear_error():
    with pytest.raises(ValueError, match="no 2-D 'input_ids'"):
        text_labels([{"pixel_values": torch.zeros(2, 3, 4, 4)}])


@pytest.mark.skipif("native" not in CPU_BACKENDS, reason="the native extension is not built")
@pytest.mark.parametrize("partition", ["joint", "per_direction"])
def test_fixed_shift_form_takes_the_labels(monkeypatch, partition):
    """The native CPU kernel's fixed-shift symmetric passes (no hardness, cosine at scale 20) run with the labels:
    counted here, against the reference."""
    import dataclasses

    import st_fast.ops.row_kernel_native as native

    calls = []

    def counted(function):
        def wrapper(*args, **kwargs):
            calls.append(kwargs.get("labels"))
            return function(*args, **kwargs)

        return wrapper

    kernel = native.NATIVE_ROW_KERNEL
    monkeypatch.setattr(
        native,
        "NATIVE_ROW_KERNEL",
        dataclasses.replace(
            kernel, exp_statistics=counted(kernel.exp_statistics), exp_coefficients=counted(kernel.exp_coefficients)
        ),
    )
    config = _config(("query_to_doc", "doc_to_query"), partition, None, "cos")
    _check("native", config, 9, 2, 12, seed=11)
    assert len(calls) == 2 and all(labels is not None for labels in calls)


RAW_BACKENDS = [(backend, None) for backend in CPU_BACKENDS] + [("native", 32)] * ("native" in CPU_BACKENDS)


@pytest.mark.parametrize("backend, lanes", RAW_BACKENDS)
@pytest.mark.parametrize("directions", [("query_to_doc",), ("query_to_doc", "doc_to_query", "doc_to_doc")])
def test_raw_16bit_path_masks_duplicates(monkeypatch, backend, lanes, directions):
    """The CUDA default path (raw bf16 GEMMs, norms as row / column scales, float16 coefficients), selected on the
    CPU as tests/ops/test_raw_16bit.py does (``lanes``: with the CUDA lane algorithm emulated, as on a GPU): the loss
    to the fp32 bound, the bf16 gradients within twice their own rounding plus 1e-4 (that file's rule) of the float64
    reference on the same bf16 values."""
    import contextlib

    from native_testing import emulated_lanes

    with emulated_lanes(lanes) if lanes is not None else contextlib.nullcontext():
        _check_raw_16bit(monkeypatch, backend, directions)


def _check_raw_16bit(monkeypatch, backend, directions):
    from st_fast.ops.backends import ChunkedBackend

    monkeypatch.setattr(ChunkedBackend, "takes_raw_operands", lambda self, dtype, device: dtype == torch.bfloat16)
    queries, docs, labels = duplicate_batch(9, 2, 16, seed=21, dtype=torch.bfloat16)
    embeddings = [queries, *docs]
    config = _config(directions, "joint", None, "cos")
    actual = loss_and_grads(
        lambda e: fused_mnrl_loss(e[0], e[1:], backend=backend, labels=labels, **config), embeddings
    )
    expected = loss_and_grads(
        lambda e: reference_masked_loss(e[0], e[1:], labels, **config), float64_copies(embeddings)
    )
    assert abs(float(actual[0]) - float(expected[0])) <= 1e-5 * abs(float(expected[0]))
    for got, want in zip(actual[1], expected[1], strict=True):
        assert got.dtype == torch.bfloat16
        rounding = float((want.to(torch.bfloat16).double() - want).norm())
        assert float((got.double() - want).norm()) <= 2 * rounding + 1e-4 * float(want.norm())


EMULATED_CASES = [
    (("query_to_doc",), "joint", "hard_negatives", 3),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", "all_negatives", 2),
    (("query_to_doc", "doc_to_query"), "per_direction", None, 2),
]


@pytest.mark.skipif("native" not in CPU_BACKENDS, reason="the native extension is not built")
@pytest.mark.parametrize("lanes", [32, 4, 64])
@pytest.mark.parametrize("directions, partition, hardness, k", EMULATED_CASES)
def test_cuda_lane_algorithm_masks_duplicates(lanes, directions, partition, hardness, k):
    """The CUDA build's online loops (csrc/include/st_fast/row_kernel_lanes.h, the lane algorithm) run on
    the CPU with emulated lanes (tests/ops/test_emulated_lanes.py): the one-pass kernel and the symmetric passes
    (statistics, column statistics, coefficients), local and gathered rows."""
    from native_testing import emulated_lanes

    config = _config(directions, partition, hardness, "cos")
    with emulated_lanes(lanes):
        _check("native", config, 7, k, 12, seed=100 * k + len(directions))
        _check("native", config, 13, k, 12, seed=7, row_offset=4, batch_size=5)
