"""``python -m benchmarks fused_loss --symmetric`` at a tiny size, in-process: every loss and implementation has a
row, the ratio columns are filled and st_fast matches stock."""

from __future__ import annotations

import argparse
import gc

from benchmarks import fused_loss
from benchmarks.fused_symmetric import run_symmetric


def test_symmetric_rows(monkeypatch):
    monkeypatch.setattr(gc, "collect", lambda *args: 0)  # ~0.5 s per call in a process with many objects
    parser = argparse.ArgumentParser()
    fused_loss.add_arguments(parser)
    parser.add_argument("--cached-mini-batch-size", type=int, default=None)
    args = parser.parse_args(
        ["--symmetric", "--fused-batch-sizes", "12", "--fused-dim", "8", "--fused-backends", "torch"]
    )
    args.smoke, args.gpu, args.repeats = False, False, 2
    rows = run_symmetric(args)
    keys = {(row["loss"], row["backend"]) for row in rows}
    assert keys == {("MNSRL", "stock"), ("CMNSRL stage", "stock"), ("MNRL", "torch"), ("MNSRL", "torch"),
                    ("CMNRL stage", "torch"), ("CMNSRL stage", "torch")}  # fmt: skip
    for row in rows:
        assert row["time_ms"] > 0 and row["floor_fraction"] > 0 and row["threads"] == 1
        if row["loss"] in ("MNSRL", "CMNSRL stage") and row["backend"] == "torch":
            assert row["x_one_direction"] > 0 and row["speedup_vs_stock"] > 0
            assert row["loss_err"] < 1e-5 and row["grad_err"] < 1e-6, row


def test_the_symmetric_flag_routes_the_fused_loss_part(monkeypatch):
    """``python -m benchmarks fused_loss --symmetric`` runs fused_symmetric's rows (the registry's MODES), under the
    fused_loss part's name."""
    from benchmarks import __main__ as cli
    from benchmarks import fused_symmetric

    monkeypatch.setattr(fused_symmetric, "run_symmetric", lambda args: [{"routed": "symmetric"}])
    args = argparse.Namespace(symmetric=True, mask_duplicates=False)
    assert cli.run_part("fused_loss", args) == [{"routed": "symmetric"}]
