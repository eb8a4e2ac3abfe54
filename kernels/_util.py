"""Small helpers shared by the kernel files (no state, no patching)."""
from __future__ import annotations

import os

import torch


def interpret() -> bool:
    "True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1): the tests' mode."
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_ok(*tensors: torch.Tensor) -> bool:
    "Whether a Triton kernel can run on these tensors (CUDA, or CPU under the interpreter)."
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return all(t.is_cuda for t in tensors) or (interpret() and all(t.device.type == "cpu" for t in tensors))


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_block(n: int, cap: int = 65536) -> tuple[int, int]:
    "(BLOCK, num_warps) for a kernel that keeps one row of `n` elements in registers."
    b = min(next_pow2(n), cap)
    w = 4 if b < 2048 else 8 if b < 8192 else 16
    return b, w


def compute_dtype(x: torch.Tensor, fallback: torch.dtype | None = None) -> torch.dtype:
    "The dtype matmuls run in: autocast's dtype when autocast is on for x's device, else x's (or `fallback`'s) dtype."
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError):
        pass
    return fallback or x.dtype
