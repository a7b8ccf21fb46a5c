"""Bit-for-bit fingerprint of the fused ops' outputs on fixed seeds, for refactors that must not change a number.

    python scripts/fingerprint_outputs.py write OUT.pt      # every case's loss and gradients, every backend
    python scripts/fingerprint_outputs.py compare A.pt B.pt  # exit 1 unless every tensor is bitwise equal

Run ``write`` on the tree before and after a change (same machine, same threads) and ``compare`` the two files.
The Triton backend runs under ``TRITON_INTERPRET=1`` on the CPU (set it before Python starts). Only the public op
functions are called (:func:`st_fast.ops.fused_mnrl_loss`, :func:`st_fast.ops.fused_gist_loss`), so the script
runs unchanged on both trees.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

BACKENDS = ["torch", "native"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(seed: int, widths: tuple[int, ...], dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(w, dim, generator=gen).to(dtype).requires_grad_() for w in widths]


def mnrl_cases():
    directions = [
        ("query_to_doc",),
        ("query_to_doc", "doc_to_query"),
        ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
    ]
    for seed, (dirs, mode, sim, hard, k, labelled) in enumerate(
        itertools.product(
            directions, ["joint", "per_direction"], ["cos", "dot"], [None, "hard_negatives"], [1, 3], [False, True]
        )
    ):
        if hard and "doc_to_doc" in dirs:
            continue
        yield (
            f"mnrl/{'+'.join(d[:5] for d in dirs)}/{mode}/{sim}/{hard}/k{k}/labels{labelled}",
            seed,
            dict(
                directions=dirs,
                partition_mode=mode,
                similarity=sim,
                hardness_mode=hard,
                hardness_strength=0.3 if hard else 0.0,
                k=k,
                labelled=labelled,
            ),
        )


def run_mnrl(config: dict, seed: int, dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
    b, k = 37, config["k"]
    q, *docs = _inputs(seed, (b,) * (k + 1), 29, dtype)
    labels = None
    if config["labelled"]:
        gen = torch.Generator().manual_seed(seed + 1000)
        labels = (torch.randint(0, 9, (b,), generator=gen), torch.randint(0, 9, (k * b,), generator=gen))
    from st_fast.ops import fused_mnrl_loss

    loss = fused_mnrl_loss(
        q,
        docs,
        scale=17.0,
        similarity=config["similarity"],
        directions=config["directions"],
        partition_mode=config["partition_mode"],
        hardness_mode=config["hardness_mode"],
        hardness_strength=config["hardness_strength"],
        backend=backend,
        labels=labels,
    )
    loss.backward()
    return [loss.detach(), q.grad, *(d.grad for d in docs)]


def gist_cases():
    for seed, (strategy, ca, cp, k, self_neg) in enumerate(
        itertools.product(["absolute", "relative"], [True, False], [True, False], [1, 3], [True, False])
    ):
        yield (
            f"gist/{strategy}/ca{ca}/cp{cp}/k{k}/self{self_neg}",
            500 + seed,
            dict(
                margin_strategy=strategy,
                margin=0.05 if strategy == "absolute" else 0.9,
                contrast_anchors=ca,
                contrast_positives=cp,
                k=k,
                mask_self_negatives=self_neg,
            ),
        )


def run_gist(config: dict, seed: int, dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
    from st_fast.ops import fused_gist_loss

    b, k = 31, config["k"]
    a, *cands = _inputs(seed, (b,) * (k + 1), 23, dtype)
    gen = torch.Generator().manual_seed(seed + 7)
    # guides close to the model's embeddings, so the margin masks fire on some entries and not on others
    ga = (a.detach().float() + 0.5 * torch.randn(b, 23, generator=gen)).to(dtype)
    gc = [(c.detach().float() + 0.5 * torch.randn(b, 23, generator=gen)).to(dtype) for c in cands]
    cands[0].data[3] = a.data[3]  # an anchor equal to its positive: the self-negative rule decides
    ga[3] = gc[0][3]
    loss = fused_gist_loss(
        a,
        cands,
        ga,
        gc,
        temperature=0.05,
        margin_strategy=config["margin_strategy"],
        margin=config["margin"],
        contrast_anchors=config["contrast_anchors"],
        contrast_positives=config["contrast_positives"],
        mask_self_negatives=config["mask_self_negatives"],
        backend=backend,
    )
    loss.backward()
    return [loss.detach(), a.grad, *(c.grad for c in cands)]


def write(path: str) -> None:
    torch.set_num_threads(2)
    out: dict[str, list[torch.Tensor]] = {}
    for cases, run in ((mnrl_cases, run_mnrl), (gist_cases, run_gist)):
        for name, seed, config in cases():
            for dtype, backend in itertools.product(DTYPES, BACKENDS):
                key = f"{name}/{str(dtype)[6:]}/{backend}"
                try:
                    out[key] = run(config, seed, dtype, backend)
                except (RuntimeError, TypeError, ValueError) as e:  # a combination a backend refuses: keep the text
                    out[key] = [f"{type(e).__name__}: {e}"]
    torch.save(out, path)
    print(f"{len(out)} cases written to {path} (backends {BACKENDS})")


def _bitwise_equal(u: torch.Tensor, v: torch.Tensor) -> bool:
    if u.dtype != v.dtype or u.shape != v.shape:
        return False
    return torch.equal(u.contiguous().view(-1).view(torch.uint8), v.contiguous().view(-1).view(torch.uint8))


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        same = len(x) == len(y) and all(
            type(u) is type(v) and (u == v if isinstance(u, str) else _bitwise_equal(u, v))
            for u, v in zip(x, y, strict=True)
        )
        if not same:
            bad.append(key)
    print(f"{len(set(a) & set(b))} common cases, {len(bad)} differ" + "".join(f"\n  {k}" for k in bad[:40]))
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"]:
        write(sys.argv[2])
    elif sys.argv[1:2] == ["compare"]:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
