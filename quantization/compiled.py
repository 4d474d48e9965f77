"""torch.compile here: the compiled NF4 dequantization, and a compile that fails with a clear message.

Eager `dequantize_nf4` (nf4.py) makes two passes over the output: a gather of the
levels (n float32 written), then the multiply by each block's absmax (n read and
written again), on the CPU in cache-sized chunks. Compiled, the same computation is one
kernel, one pass over memory:

    read n/2 code bytes and n/B absmax constants  ->  write n values (gather, scale, cast fused)

`compiled_dequantize_nf4(q)` is that path: `torch.compile` over `dequantize_nf4` itself,
which traces its one-expression form (`dequantize_nf4_expression`) because the chunked
loop is a graph break (nf4.py says where it switches). Still pure PyTorch: inductor writes
the kernel (C++ on the CPU, Triton on a GPU); nothing here is hand-written in either.
trainers/bench/quant.py times both paths against bitsandbytes and a plain copy of the
output's size. (On the shared 2-core CPU it was measured on, 3072 x 768 fp32: one
thread, the compiled kernel took 1.2-1.4x the eager path's time; the quick benchmark with two
threads under load, compiled 6.1x as fast as eager and 0.58x a copy's throughput. So eager
stays the default: the compiled path is for compiled models, and for GPUs, where eager
runs several kernels; not measured on a GPU here.)

Compile failures surface at the first call, deep inside inductor (no C++ compiler on the
CPU, no Triton for a GPU). `compile_errors(what, backend)` turns them into one
`CompileError` naming what was being compiled, the backend and the way out;
`check_compile_supported(what)` refuses up front where dynamo cannot run at all (some
Python versions and platforms). trainers/compiling.py uses both for `--compile`.
"""
from __future__ import annotations

import contextlib
import platform

import torch

from .nf4 import NF4Tensor, dequantize_nf4

BACKEND = "inductor"      # torch.compile's default: generates C++ (CPU) or Triton (GPU) kernels
NO_BACKEND_HINT = ("inductor needs a working C++ compiler for CPU tensors (g++ or clang; "
                   "torch._inductor.config.cpp.cxx) and Triton for GPU tensors")


class CompileError(RuntimeError):
    """torch.compile cannot run here, or its backend failed to build the code."""


def check_compile_supported(what: str) -> None:
    """Raise CompileError(what ...) where torch.compile cannot run at all (dynamo unsupported
    on this Python/platform)."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        raise CompileError(f"{what}: torch.compile is not supported with Python {platform.python_version()} "
                           f"on {platform.system()} and torch {torch.__version__}; run without compiling")


@contextlib.contextmanager
def compile_errors(what: str, backend: str = BACKEND):
    """Inside: a torch.compile backend failure becomes CompileError(what, backend, first line of the
    cause, the way out); the original stays chained as __cause__. Other errors pass unchanged."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = lines[0] if lines else type(error).__name__
        hint = NO_BACKEND_HINT if backend == "inductor" else f"check that backend {backend!r} works here"
        raise CompileError(f"{what}: torch.compile(backend={backend!r}) could not compile: {cause}. "
                           f"{hint}; or run without compiling") from error


_COMPILED: dict = {}       # backend -> the compiled dequantize_nf4 (compiled once per process)


def compiled_dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, *,
                            backend: str = BACKEND) -> torch.Tensor:
    """`dequantize_nf4(q, dtype)` through torch.compile (one fused kernel; see the module docstring).

    The first call for a new shape compiles (seconds); later calls reuse it. Same values
    as the eager path up to float rounding of the fused multiply. Raises CompileError when
    torch.compile cannot run here or the backend fails."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"compiled_dequantize_nf4: q must be an NF4Tensor, got {type(q).__name__}")
    check_compile_supported("compiled_dequantize_nf4")
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(dequantize_nf4, backend=backend, fullgraph=True)
    with compile_errors("compiled_dequantize_nf4", backend):
        return _COMPILED[backend](q, dtype)
