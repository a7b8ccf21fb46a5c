"""Scratch memory for the chunked drivers' per-call score and coefficient buffers, kept between calls on the CPU.

On the CPU a fresh large tensor is paid for again on every call: glibc hands allocations above its mmap threshold
(at most 32 MiB) back to the kernel on free, so the next call's first write faults every 4 KiB page in again.
Measured on this project's 2-core CI machine (1 thread, ``torch.mm`` of (4096, 384) x (384, 4096) fp32 into a 64 MiB
output): 141 ms into a fresh ``torch.empty``, 121 ms into a reused one; the 20 ms are page faults, about 1/6 of
the GEMM. On CUDA, torch's caching allocator already reuses memory, so the buffers there are plain ``torch.empty``.

Use::

    with scratch(device) as arena:
        scores = arena.take((rows, columns), torch.float32)

or, for a chunked driver, :func:`with_scratch`.

One arena per process: a call takes it for its duration; a call that finds it in use (another thread, a nested
call) allocates normally. The arena keeps, after the call, one flat buffer of the largest total a call took (up to
:data:`MAX_KEPT_BYTES`; at most that much CPU memory stays allocated between calls, the score tile of the
symmetric path at B = 4096, k = 1: 64 MiB); :func:`release` frees it. Tensors taken from the arena are views of that
buffer: they must not outlive the ``with`` block (the drivers keep them internal; their results are fresh tensors).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

MAX_KEPT_BYTES = 512 * 2**20
Result = TypeVar("Result")
_ALIGN = 64  # bytes: each taken tensor starts on a cache line

_lock = threading.Lock()
_kept: torch.Tensor | None = None  # flat uint8, CPU


class Arena:
    """Hands out consecutive, 64-byte aligned tensors of one kept buffer (plain ``torch.empty`` once it is used up,
    or everywhere when ``buffer`` is None), and records the total taken."""

    def __init__(self, device: torch.device, buffer: torch.Tensor | None) -> None:
        self.device = device
        self.buffer = buffer
        self.taken = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` and ``dtype`` on the arena's device."""
        nbytes = math.prod(shape) * dtype.itemsize
        begin = self.taken
        self.taken += -(-nbytes // _ALIGN) * _ALIGN
        if self.buffer is None or self.taken > self.buffer.numel():
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self.buffer[begin : begin + nbytes].view(dtype).view(shape)


@contextmanager
def scratch(device: torch.device) -> Iterator[Arena]:
    """The process's CPU arena for the duration of the block (see the module docstring); on other devices, or when
    the arena is in use, an arena that allocates normally."""
    global _kept
    if device.type != "cpu" or not _lock.acquire(blocking=False):
        yield Arena(device, None)
        return
    try:
        arena = Arena(device, _kept)
        yield arena
        if arena.taken > (0 if _kept is None else _kept.numel()) and arena.taken <= MAX_KEPT_BYTES:
            _kept = None  # free the smaller buffer before allocating its replacement
            _kept = torch.empty(arena.taken, dtype=torch.uint8)
    finally:
        _lock.release()


def with_scratch(driver: Callable[..., Result]) -> Callable[..., Result]:
    """A chunked driver ``driver(anchors, *args, arena, **kwargs)`` as a function of the same arguments but
    ``arena``, which runs it with :func:`scratch` on the anchors' device as ``arena``."""

    @functools.wraps(driver)
    def run(anchors: torch.Tensor, *args, **kwargs) -> Result:
        with scratch(anchors.device) as arena:
            return driver(anchors, *args, arena=arena, **kwargs)

    return run


def release() -> None:
    """Free the kept CPU buffer (the next call allocates it again)."""
    global _kept
    with _lock:
        _kept = None


def kept_bytes() -> int:
    """Bytes of CPU memory the arena keeps between calls."""
    return 0 if _kept is None else _kept.numel()
