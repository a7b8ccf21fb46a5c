"""Run by tests/test_packaging.py in a separate process (a fresh venv holding the wheel, or this checkout):

    python wheel_probe.py openmp   # a native op, then the OpenMP runtimes mapped into the process
    python wheel_probe.py all      # that, plus the fused loss and the sampler against the stock classes

Prints one JSON line. The OpenMP runtimes are read before sentence-transformers is imported: its import of
scikit-learn maps scikit-learn's own libgomp copy, whatever st_fast does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch


def openmp_runtimes() -> list[str]:
    """The libgomp files mapped into this process."""
    with open("/proc/self/maps") as f:  # address perms offset dev inode path (which may hold spaces)
        paths = [fields[5].rstrip("\n") for fields in (line.split(maxsplit=5) for line in f) if len(fields) == 6]
    return sorted({path for path in paths if "libgomp" in path.rsplit("/", 1)[-1]})


def embeddings() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(48, 32, generator=generator)
    positives = 0.6 * queries + torch.randn(48, 32, generator=generator)
    return [queries, positives, torch.randn(48, 32, generator=generator)]


def native_op() -> float:
    from st_fast import _native
    from st_fast.ops import fused_mnrl_loss

    if not _native.require_cpu_ext().openmp:
        raise SystemExit("the C++ extension was built without OpenMP")
    leaves = [x.clone().requires_grad_() for x in embeddings()]
    loss = fused_mnrl_loss(leaves[0], leaves[1:], backend="native")
    loss.backward()
    return float(loss)


def losses_against_stock() -> dict:
    from sentence_transformers.sentence_transformer import losses as stock_losses

    from st_fast import losses as fast_losses

    reference = [x.double().requires_grad_() for x in embeddings()]
    stock = stock_losses.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(reference, None)
    stock.backward()
    leaves = [x.clone().requires_grad_() for x in embeddings()]
    fast = fast_losses.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(leaves, None)
    fast.backward()
    pairs = zip(leaves, reference, strict=True)
    grad_error = max(float((a.grad.double() - b.grad).norm() / b.grad.norm()) for a, b in pairs)
    return {"fast": float(fast), "stock": float(stock), "grad_error": grad_error}


def sampler_against_stock() -> dict:
    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler as StockSampler

    import st_fast

    rows = range(300)
    data = Dataset.from_dict({"anchor": [f"q{i % 40}" for i in rows], "positive": [f"p{i % 13}" for i in rows]})

    def batches(cls):
        sampler = cls(data, batch_size=8, drop_last=False, generator=torch.Generator().manual_seed(7), seed=3)
        sampler.set_epoch(1)
        return list(sampler)

    fast = batches(st_fast.NoDuplicatesBatchSampler)
    return {"same": fast == batches(StockSampler), "batches": len(fast)}


def triton_backend_error() -> str | None:
    from st_fast.ops import fused_mnrl_loss

    try:
        fused_mnrl_loss(*embeddings()[:1], embeddings()[1:], backend="triton")
    except RuntimeError as exc:
        return str(exc)
    return None


def main(mode: str) -> None:
    import st_fast

    report = {
        "st_fast": st_fast.__file__,
        "torch_lib": os.path.join(os.path.dirname(torch.__file__), "lib"),
        "native_loss": native_op(),
        "openmp": openmp_runtimes(),
    }
    if mode == "all":
        report["compiler"] = shutil.which("gcc") or shutil.which("cc") or shutil.which("c++")
        report["info"] = st_fast.native_info()
        report["triton_backend_error"] = triton_backend_error()
        report["loss"] = losses_against_stock()
        report["sampler"] = sampler_against_stock()
        report["openmp_after_all"] = openmp_runtimes()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
