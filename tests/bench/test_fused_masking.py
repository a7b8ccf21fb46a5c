"""``python -m benchmarks fused_loss --mask-duplicates`` at a tiny size, in-process: every row is there, with its
ratio to the unmasked time."""

from __future__ import annotations

import argparse

from benchmarks import fused_loss
from benchmarks.fused_masking import run_masking


def test_masking_rows():
    parser = argparse.ArgumentParser()
    fused_loss.add_arguments(parser)
    args = parser.parse_args(
        ["--mask-duplicates", "--fused-batch-sizes", "12", "--fused-dim", "8", "--fused-backends", "torch"]
    )
    args.smoke, args.gpu, args.repeats = False, False, 2
    rows = run_masking(args)
    keys = {(row["directions"], row["backend"], row["mask"]) for row in rows}
    assert keys == {("labels", "-", "-")} | {
        (directions, "torch", mask) for directions in ("query_to_doc", "symmetric") for mask in ("off", "on")
    }
    for row in rows:
        assert row["time_ms"] > 0 and row["threads"] == 1 and row["runs"] >= 1
        assert (row["x_unmasked"] is not None) == (row["mask"] == "on")


def test_the_mask_duplicates_flag_routes_the_fused_loss_part(monkeypatch):
    """``python -m benchmarks fused_loss --mask-duplicates`` runs fused_masking's rows (the registry's MODES)."""
    from benchmarks import __main__ as cli
    from benchmarks import fused_masking

    monkeypatch.setattr(fused_masking, "run_masking", lambda args: [{"routed": "masking"}])
    args = argparse.Namespace(symmetric=False, mask_duplicates=True)
    assert cli.run_part("fused_loss", args) == [{"routed": "masking"}]
