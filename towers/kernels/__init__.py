"""Fused ReLU -> LRN -> max-pool with an analytic backward: the towers' hot elementwise path.

PyTorch's LocalResponseNorm is built from pad, avg_pool3d, pow, mul and div, each a full pass
over memory, and autograd keeps every intermediate; on a CPU tower it cost as much as all the
convolutions. Here the whole ReLU -> LRN -> max-pool block is one operation:

- on the CPU, a small C kernel (norm.c) that works one sample at a time in cache on
  channels-last tensors. It saves only a byte per pooled output (where the maximum was) and
  recomputes the normalisation in backward instead of storing it.
  It is compiled once per machine into the user's cache on first use (a second or so);
- elsewhere (CUDA), where no C compiler is found, or with ALEXNET_MP_KERNELS=torch, the same
  block runs as PyTorch operations with a hand-derived LRN backward.

Both follow PyTorch's semantics exactly (LocalResponseNorm's window and divisor, max_pool2d's
choice of maximum), and both are gradient-checked in float64 against autograd.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from towers.layers import LRN, MaxPool

log = logging.getLogger(__name__)

SOURCES = ("norm.c", "norm_impl.h")
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared")


@dataclass(frozen=True)
class NormBlock:
    """A fusable run of a table row's `then` ops: optional ReLU, LRN, optional max-pool."""

    relu: bool
    lrn: LRN
    pool: Optional[MaxPool]


# --- PyTorch implementation (any device) --------------------------------------------------------
def _window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Sum over channels [c - before, c + after] with zero padding, by adding shifted slices."""
    out = t.clone()
    channels = t.shape[1]
    for shift in range(1, before + 1):
        out[:, shift:] += t[:, : channels - shift]
    for shift in range(1, after + 1):
        out[:, : channels - shift] += t[:, shift:]
    return out


def _inverse_power(d: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.75:
        r = d.rsqrt()
        return r * r.sqrt()  # d^-0.75 without pow
    return d.pow(-beta)


class _LRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        d = _window_sum(x * x, size // 2, (size - 1) // 2).mul_(alpha / size).add_(k)
        y = x * _inverse_power(d, beta)
        ctx.save_for_backward(x, d)
        ctx.params = (size, alpha, beta)
        return y

    @staticmethod
    def backward(ctx, g):
        x, d = ctx.saved_tensors
        size, alpha, beta = ctx.params
        scale = _inverse_power(d, beta)
        # grad_x[j] = g[j] s[j] - (2 alpha beta / size) x[j] * sum over i whose window holds j of g[i] x[i] s[i] / d[i]
        t = g * x * scale / d
        grad = _window_sum(t, (size - 1) // 2, size // 2).mul_(x).mul_(-2 * alpha * beta / size)
        return grad.addcmul_(g, scale), None, None, None, None


def _norm_torch(x: torch.Tensor, block: NormBlock) -> torch.Tensor:
    if block.relu:
        x = F.relu(x)
    x = _LRN.apply(x, block.lrn.size, block.lrn.alpha, block.lrn.beta, block.lrn.k)
    if block.pool is not None:
        x = F.max_pool2d(x, block.pool.kernel, block.pool.stride)
    return x


# --- C implementation (CPU) ---------------------------------------------------------------------
def _cache_dir() -> Path:
    base = os.environ.get("ALEXNET_MP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alexnet-mp"
    )
    return Path(base) / "kernels"


def _cpu_identity() -> str:
    """-march=native code must not run on another CPU model that shares the cache (a shared home)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@lru_cache(maxsize=1)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("ALEXNET_MP_KERNELS", "c") == "torch":
        return None
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((here / name).read_bytes())
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    digest.update(" ".join((str(compiler), *CFLAGS, platform.machine(), _cpu_identity())).encode())
    target = _cache_dir() / f"norm-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        if compiler is None:
            log.warning("no C compiler found: the towers' LRN runs as PyTorch operations (slower on CPU)")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *CFLAGS, "-o", str(built), str(here / "norm.c")], capture_output=True, text=True
            )
            if result.returncode != 0:
                log.warning("compiling the LRN kernel failed, using PyTorch operations instead:\n%s", result.stderr)
                return None
            os.replace(built, target)  # atomic: towers starting together may all compile; one file wins
    lib = ctypes.CDLL(str(target))
    for suffix in ("f32", "f64"):
        for fn in (getattr(lib, f"norm_forward_{suffix}"), getattr(lib, f"norm_backward_{suffix}")):
            pointers = 3 if "forward" in fn.__name__ else 4
            fn.argtypes = (
                [ctypes.c_void_p] * pointers
                + [ctypes.c_long] * 5
                + [ctypes.c_int]
                + [ctypes.c_double] * 3
                + [ctypes.c_int] * 3
            )
            fn.restype = None
    lib.crops_to_float.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 2
    lib.crops_to_float.restype = None
    return lib


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="norm")


def _run_chunks(fn, pointers, n, h, w, c, block: NormBlock) -> None:
    """Call the kernel on chunks of the batch, one per torch thread (ctypes releases the GIL)."""
    lrn = block.lrn
    pool_k, pool_s = (block.pool.kernel, block.pool.stride) if block.pool else (0, 0)
    tail = (h, w, c, lrn.size, lrn.alpha, lrn.beta, lrn.k, int(block.relu), pool_k, pool_s)
    threads = max(1, min(torch.get_num_threads(), n))
    if threads == 1:
        fn(*pointers, 0, n, *tail)
        return
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool(threads).submit(fn, *pointers, lo, hi, *tail) for lo, hi in zip(bounds, bounds[1:])]
    for future in futures:
        future.result()


class _NormC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block: NormBlock):
        lib = _library()
        x = x.contiguous(memory_format=torch.channels_last)
        n, c, h, w = x.shape
        ph, pw = (h, w) if block.pool is None else _pooled(h, w, block.pool)
        out = torch.empty((n, c, ph, pw), dtype=x.dtype, memory_format=torch.channels_last)
        # Where each pooled maximum came from, as its position in the window (9 positions fit a byte).
        arg = torch.empty(out.shape, dtype=torch.uint8, memory_format=torch.channels_last) if block.pool else None
        suffix = "f32" if x.dtype == torch.float32 else "f64"
        pointers = (x.data_ptr(), out.data_ptr(), arg.data_ptr() if arg is not None else None)
        _run_chunks(getattr(lib, f"norm_forward_{suffix}"), pointers, n, h, w, c, block)
        ctx.save_for_backward(x, arg)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, arg = ctx.saved_tensors
        block = ctx.block
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        n, c, h, w = x.shape
        suffix = "f32" if x.dtype == torch.float32 else "f64"
        fn = getattr(_library(), f"norm_backward_{suffix}")
        pointers = (x.data_ptr(), grad_out.data_ptr(), arg.data_ptr() if arg is not None else None, grad_x.data_ptr())
        _run_chunks(fn, pointers, n, h, w, c, block)
        return grad_x, None


def _pooled(h: int, w: int, pool: MaxPool) -> tuple[int, int]:
    return (h - pool.kernel) // pool.stride + 1, (w - pool.kernel) // pool.stride + 1


def uses_c_kernel(x: torch.Tensor, block: NormBlock) -> bool:
    fits_a_byte = block.pool is None or block.pool.kernel**2 <= 256  # the saved window positions
    cpu = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    return cpu and fits_a_byte and _library() is not None


def crops_to_float(
    pixels: torch.Tensor, offsets: torch.Tensor, divisors: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """(N, H, W, 3) uint8 -> float32 (pixels + offsets[n]) / divisors, in one pass of the C kernel
    (towers.inputs.Crops), the same bits as PyTorch's add and divide; None where there is no kernel."""
    lib = _library()
    if lib is None:
        return None
    pixels, offsets = pixels.contiguous(), offsets.contiguous()
    out = torch.empty(pixels.shape, dtype=torch.float32)
    divisors = None if divisors is None else divisors.contiguous()
    n = pixels.shape[0]
    lib.crops_to_float(
        pixels.data_ptr(),
        offsets.data_ptr(),
        None if divisors is None else divisors.data_ptr(),
        out.data_ptr(),
        n,
        pixels.numel() // max(n, 1),
    )
    return out


def fused_norm(x: torch.Tensor, block: NormBlock) -> torch.Tensor:
    """ReLU (if block.relu) -> LRN -> max-pool (if block.pool) on an (N, C, H, W) tensor."""
    if uses_c_kernel(x, block):
        return _NormC.apply(x, block)
    return _norm_torch(x, block)
