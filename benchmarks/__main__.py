"""Benchmark CLI: ``python -m benchmarks PART [PART ...] [--smoke | --gpu] [--out DIR]``; ``all`` runs every part.

The registry of parts. A part is one module under ``benchmarks/`` exposing ``add_arguments(parser)`` (its
``--<part>-*`` options), ``run(args) -> list[dict]`` (one dict per table row) and optionally ``TITLE``; it imports
only :mod:`benchmarks.common` (the toolkit), never another part. Adding a part is that module plus one line in
:data:`PARTS`. A flag that hands a part's run to another module (same options, same output files) is one line in
:data:`MODES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from benchmarks.common import report

# part name -> module exposing add_arguments(parser), run(args) -> list[dict] and optionally TITLE
PARTS = {
    "sampler": "benchmarks.sampler",
    "fused_loss": "benchmarks.fused_loss",
    "cached_loss": "benchmarks.cached_loss",
    "training": "benchmarks.training",
    "gist": "benchmarks.gist",
    "mask_duplicates_training": "benchmarks.mask_duplicates_training",
    "maxsim": "benchmarks.maxsim",
    "maxsim_training": "benchmarks.maxsim_training",
}
# (part, flag set by the part's add_arguments) -> (module, function(args) -> list[dict]) run instead of the part's own
MODES = {
    ("fused_loss", "symmetric"): ("benchmarks.fused_symmetric", "run_symmetric"),
    ("fused_loss", "mask_duplicates"): ("benchmarks.fused_masking", "run_masking"),
}


def run_part(part: str, args: argparse.Namespace) -> list[dict]:
    """The rows of ``part``: its module's ``run(args)``, or the :data:`MODES` function of the first of its flags set."""
    for (name, flag), (module_name, function) in MODES.items():
        if name == part and getattr(args, flag, False):
            return getattr(importlib.import_module(module_name), function)(args)
    return part_module(part).run(args)


def part_module(part: str) -> ModuleType:
    return importlib.import_module(PARTS[part])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="+", choices=[*PARTS, "all"], help="which benchmarks to run")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny shapes: checks that everything runs (CI)")
    size.add_argument("--gpu", action="store_true", help="sizes for one H100-class GPU")
    parser.add_argument("--out", default="bench_out", help="folder for the JSON / Markdown / PNG results")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median is reported)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock seconds per part: cases run smallest first and a case predicted not to fit "
                             "is reported as skipped (default: no limit)")  # fmt: skip
    for part in PARTS:
        part_module(part).add_arguments(parser)
    args = parser.parse_args(argv)
    parts = list(PARTS) if "all" in args.parts else args.parts
    for part in parts:
        rows = run_part(part, args)
        report(part, rows, args.out, title=getattr(part_module(part), "TITLE", part))
    return 0


if __name__ == "__main__":
    sys.exit(main())
