#!/usr/bin/env python3
"""Build ``examples/debian_pairs.tsv.gz`` from Debian ``Translation-en`` package description lists.

Each row is (anchor, positive, package): the package's one-line synopsis, its cleaned long description, and its
name. Natural near-duplicates (``-dev``/``-doc``/``-data`` siblings sharing a synopsis or description) are kept on
purpose: the selection takes short runs of consecutive packages in name order, so sibling groups stay together.

Usage (after ``apt-get update -o Acquire::Languages=en`` on Debian bookworm)::

    python scripts/make_debian_pairs.py \\
        /var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4 \\
        -o examples/debian_pairs.tsv.gz

Inputs may be ``.lz4`` (decompressed with the ``lz4`` command-line tool), ``.gz``, ``.xz`` or plain text. The output
depends only on the input text and the options, so it is byte-for-byte reproducible (gzip mtime is 0).
"""

from __future__ import annotations

import argparse
import gzip
import io
import lzma
import re
import subprocess
import sys
from pathlib import Path

_WS = re.compile(r"\s+")


def read_text(path: Path) -> str:
    """Return the decompressed text of one list file."""
    name = path.name
    if name.endswith(".lz4"):
        raw = subprocess.run(["lz4", "-dc", str(path)], check=True, capture_output=True).stdout
    elif name.endswith(".gz"):
        raw = gzip.decompress(path.read_bytes())
    elif name.endswith(".xz"):
        raw = lzma.decompress(path.read_bytes())
    else:
        raw = path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def parse_stanzas(text: str):
    """Yield (package, md5, synopsis, long_lines) for every stanza with a ``Description-en`` field."""
    for block in re.split(r"\n\s*\n", text):
        package = md5 = synopsis = None
        long_lines: list[str] = []
        in_desc = False
        for line in block.splitlines():
            if line.startswith((" ", "\t")):
                if in_desc:
                    long_lines.append(line)
                continue
            in_desc = False
            key, _, value = line.partition(":")
            value = value.strip()
            if key == "Package":
                package = value
            elif key == "Description-md5":
                md5 = value
            elif key == "Description-en":
                synopsis = value
                in_desc = True
        if package and synopsis is not None:
            yield package, md5 or "", synopsis, long_lines


def clean(text: str) -> str:
    """Collapse all whitespace (tabs and newlines included) to single spaces."""
    return _WS.sub(" ", text).strip()


def clean_long(lines: list[str], max_chars: int) -> str:
    """Join continuation lines, drop the `` .`` paragraph separators, collapse whitespace, cap at a word boundary."""
    kept = [line[1:] if line.startswith(" ") else line for line in lines]
    kept = [line for line in kept if line.strip() != "."]
    text = clean(" ".join(kept))
    if len(text) > max_chars:
        cut = text[: max_chars + 1]
        space = cut.rfind(" ")
        text = (cut[:space] if space > max_chars // 2 else text[:max_chars]).rstrip(" ,;:-")
    return text


def build_rows(paths: list[Path], max_chars: int, min_chars: int) -> list[tuple[str, str, str]]:
    """One (anchor, positive, package) per package name, sorted by name; the first (package, md5) wins."""
    entries = []
    for path in paths:
        entries.extend(parse_stanzas(read_text(path)))
    entries.sort(key=lambda e: (e[0], e[1]))
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for package, _md5, synopsis, long_lines in entries:
        if package in seen:
            continue
        seen.add(package)
        anchor = clean(synopsis)
        positive = clean_long(long_lines, max_chars)
        if len(anchor) < 3 or len(positive) < min_chars or positive == anchor:
            continue
        rows.append((anchor, positive, clean(package)))
    return rows


def select(rows: list, target: int, run: int) -> list:
    """Take runs of ``run`` consecutive rows (name order) spread evenly over the list, ``target`` rows in all."""
    n_runs = -(-target // run)
    stride = len(rows) / n_runs
    out = []
    for i in range(n_runs):
        start = int(i * stride)
        out.extend(rows[start : start + run])
    return out[:target]


def duplicate_stats(rows: list[tuple[str, str, str]]) -> dict[str, int]:
    """Count rows whose anchor / positive occurs in more than one row."""
    from collections import Counter

    anchors = Counter(r[0] for r in rows)
    positives = Counter(r[1] for r in rows)
    rep_a = sum(1 for r in rows if anchors[r[0]] > 1)
    rep_p = sum(1 for r in rows if positives[r[1]] > 1)
    rep_any = sum(1 for r in rows if anchors[r[0]] > 1 or positives[r[1]] > 1)
    return {"rows": len(rows), "repeated_anchor": rep_a, "repeated_positive": rep_p, "repeated_either": rep_any}


def write_tsv_gz(rows: list[tuple[str, str, str]], out: Path) -> None:
    buf = io.StringIO()
    buf.write("anchor\tpositive\tpackage\n")
    for row in rows:
        buf.write("\t".join(clean(field) for field in row) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=9, mtime=0) as gz:
        gz.write(buf.getvalue().encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="Translation-en list file(s): .lz4, .gz, .xz or plain")
    ap.add_argument("-o", "--output", type=Path, default=Path("examples/debian_pairs.tsv.gz"))
    ap.add_argument("--target", type=int, default=4000, help="number of rows to write")
    ap.add_argument("--run", type=int, default=1, help="consecutive packages (name order) per selected run")
    ap.add_argument("--max-chars", type=int, default=400, help="cap on the positive's length")
    ap.add_argument("--min-chars", type=int, default=40, help="skip packages whose long description is shorter")
    args = ap.parse_args(argv)

    rows = build_rows(args.inputs, args.max_chars, args.min_chars)
    chosen = select(rows, args.target, args.run)
    write_tsv_gz(chosen, args.output)
    stats = duplicate_stats(chosen)
    print(f"{len(rows)} candidate packages -> {args.output} ({args.output.stat().st_size} bytes)", file=sys.stderr)
    print(" ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
