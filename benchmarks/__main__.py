"""Benchmark CLI: ``python -m benchmarks PART [PART ...] [--smoke | --gpu] [--out DIR]``; ``all`` runs every part."""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks.common import report

# part name -> module under benchmarks/ exposing add_arguments(parser) and run(args) -> list[dict]
PARTS = {
    "sampler": "benchmarks.sampler",
    "fused_loss": "benchmarks.fused_loss",
    "cached_loss": "benchmarks.cached_loss",
    "training": "benchmarks.training",
    "gist": "benchmarks.gist",
    "mask_duplicates_training": "benchmarks.mask_duplicates_training",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("parts", nargs="+", choices=[*PARTS, "all"], help="which benchmarks to run")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny shapes: checks that everything runs (CI)")
    size.add_argument("--gpu", action="store_true", help="sizes for one H100-class GPU")
    parser.add_argument("--out", default="bench_out", help="folder for the JSON / Markdown / PNG results")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median is reported)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock seconds per part: cases run smallest first and a case predicted not to fit "
                             "is reported as skipped (default: no limit)")  # fmt: skip
    for module_name in PARTS.values():
        importlib.import_module(module_name).add_arguments(parser)
    args = parser.parse_args(argv)
    parts = list(PARTS) if "all" in args.parts else args.parts
    for part in parts:
        module = importlib.import_module(PARTS[part])
        rows = module.run(args)
        report(part, rows, args.out, title=getattr(module, "TITLE", part))
    return 0


if __name__ == "__main__":
    sys.exit(main())
