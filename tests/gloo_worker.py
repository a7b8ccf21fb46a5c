"""One rank of a spawned 2-process gloo test (tests/losses/test_gathered_mnrl.py, test_mask_duplicates_ddp.py); not a
test module itself."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch


def run_gloo_worker(
    rank: int, world_size: int, init_file: str, out_dir: str, timeout_s: float, work: Callable[[Path], Any]
) -> NoReturn:
    """Join the gloo group (``file://`` rendezvous), save ``work(out_dir)`` to ``out_dir/rank{rank}.pt`` (a traceback to
    ``out_dir/rank{rank}.error`` instead), and end the process with exit code 0 / 1.

    Both ranks pass a barrier before the group is destroyed, and the process ends with ``os._exit``, skipping the
    interpreter's finalization: gloo's threads can outlive ``destroy_process_group`` (the group is still referenced),
    and one that needs the GIL while the interpreter finalizes aborts the process ("terminate called without an
    active exception", see tests/ddp_train.py). The parent reads the exit codes and the files."""
    out = Path(out_dir)
    exit_code = 1
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )  # fmt: skip
        try:
            results = work(out)
            dist.barrier()  # both ranks are done with their collectives before either ends
        finally:
            dist.destroy_process_group()
        torch.save(results, out / f"rank{rank}.pt")
        exit_code = 0
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
