"""The arithmetic a tower computes in: float32 (the paper's), or bfloat16 where the hardware has it.

In bfloat16 the convolutions and fully connected layers run in bf16 with float32 accumulation
(torch.autocast: oneDNN on CPUs, cuDNN and cuBLAS on GPUs); the LRN, the loss and the weights,
momentum and update stay float32 (master weights), and the exchanges carry bf16, half the bytes.
float64 is the exactness path of the tests: it is a dtype, not a precision.

A device without bf16 arithmetic gets a clear error, not a fallback: emulated bf16 is slower than
float32, and a run that silently trains at another precision than it asked for is a surprise.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("float32", "bfloat16")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return name


def bf16_arithmetic(device: torch.device | str = "cpu") -> str:
    """What does bf16 arithmetic on `device` (e.g. "AMX", "AVX512-BF16", "CUDA"), or "" where nothing does."""
    device = torch.device(device)
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_bf16_supported() else ""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if capabilities.get("amx_bf16"):
        return "AMX"
    return "AVX512-BF16" if capabilities.get("avx512_bf16") else ""


def require_bf16(device: torch.device | str = "cpu") -> str:
    """bf16_arithmetic(device), or a ValueError that says what to do."""
    unit = bf16_arithmetic(device)
    if not unit:
        what = "this GPU" if torch.device(device).type == "cuda" else "this CPU (it has neither AMX nor AVX512-BF16)"
        raise ValueError(f"precision bfloat16 needs bf16 arithmetic, which {what} lacks: use precision float32")
    return unit


def autocast(device: torch.device, precision: str):
    """The context the towers' layers run in: bf16 autocast, or nothing for float32."""
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def exchange_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """What the exchanges carry: bf16 in bfloat16 (what the next layer would cast to anyway), else the towers' dtype."""
    return torch.bfloat16 if precision == "bfloat16" else dtype
