"""`TrainConfig.compile` (--compile): the training forward and backward through torch.compile.

What is compiled: the model the loop calls, wrapped by `torch.compile` into an
OptimizedModule that only the loop holds. The user's model object is never replaced,
so checkpoints, resume, `evaluate`, allocators and saved adapters all see the model
itself and its own state_dict keys (the wrapper's state_dict would prefix every key with
`_orig_mod.`). Evaluation runs eagerly: it is another mode (eval, no_grad) and runs a few
times per training run, not worth a second compile.

Rank changes. Dynamo specialises a compiled graph on each parameter's shape and on
Python floats such as a layer's `scaling` (alpha / r). A resized layer fails those guards
and the next call recompiles, which is correct but runs out: every new rank adds a
graph to the cache of the same code object, and after `torch._dynamo.config.recompile_limit`
(8) graphs dynamo stops compiling and runs the model eagerly, with a log warning only.
So the loop calls `recompile` whenever the trainable parameters change (their shapes, or
their identity: the rank controller re-registers resized factors; the same test decides
when DDP wraps anew): `torch.compiler.reset()` drops every compiled graph of the process
and a fresh `torch.compile` compiles the new shapes at the next step (seconds). Masks
(AdaLoRA, sparse LoRA) change values, not shapes: nothing recompiles.

What was changed elsewhere so the project compiles with no graph break (checked with
fullgraph=True in tests/test_compile.py for every adapter layer, the quantized bases and
the three model families): NF4 dequantization switches to a one-expression form while
compiling (quantization/nf4.py) and the code-book tables are not cached from inside a
traced function (quantization/codebooks.py). Backend failures (no C++ compiler) become
a CompileError naming the option (quantization/compiled.py). One process only for now:
with torchrun the option is refused rather than run untested under DDP / FSDP.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from quantization.compiled import BACKEND, check_compile_supported, compile_errors

WHAT = "train: compile=True (--compile)"


def check_compile(world_size: int) -> None:
    """Refuse, before anything changes, a run that cannot compile: dynamo unsupported here, or
    several processes (not supported yet)."""
    check_compile_supported(WHAT)
    if world_size > 1:
        raise ValueError(f"{WHAT} runs in one process only (got a world of {world_size} processes: torch.compile "
                         f"under DDP / FSDP is not supported here yet); run without --compile under torchrun")


def compile_module(net: nn.Module) -> nn.Module:
    """A torch.compile wrapper around `net` (compiles lazily, at the first call)."""
    return torch.compile(net, backend=BACKEND)


def recompile(net: nn.Module) -> nn.Module:
    """After a rank change: drop every compiled graph (see the module docstring), wrap anew."""
    torch.compiler.reset()
    return compile_module(net)


def errors(enabled: bool):
    """A context for a forward and backward: backend failures as CompileError when compiling."""
    return compile_errors(WHAT, BACKEND) if enabled else contextlib.nullcontext()
