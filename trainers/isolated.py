"""Run one call in a fresh Python process, so what it measures about the process is its own.

    row = in_fresh_process(run_task, config, task, train_cfg, out_dir, settings)

Why: on the CPU the trainer's peak memory is the process's peak resident set size
(trainers.train.peak_memory), which only ever grows within a process. Runs made one after
another in one process would each report the largest peak so far, and a matrix would show
QLoRA above LoRA because it ran later. On Linux train() resets that peak when it starts
(trainers.train.reset_peak_memory); elsewhere a child process (multiprocessing "spawn": a new
interpreter, nothing inherited but the arguments) is what gives each run its own, and it
also leaves nothing of one run's memory (allocator caches, imports) to the next. (Linux
carries the parent's peak into a child across fork + exec, so there it is the reset that
counts.)

The function and its arguments are pickled to the child and the result back. An exception
raised in the child is raised here with the child's traceback attached; one that cannot
be pickled (a custom __init__) arrives as a RuntimeError naming its type and message.
Ctrl-C reaches the child too (same process group): it stops, cleans up as it would in
process, and the KeyboardInterrupt arrives here.
"""
from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor


def _call(fn, args, kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        try:
            pickle.loads(pickle.dumps(err))
        except Exception:                            # noqa: BLE001 - any failure to travel back
            raise RuntimeError(f"{type(err).__name__}: {err}") from None
        raise


def in_fresh_process(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a new "spawn" process; returns its result or raises its error."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_call, fn, args, kwargs).result()
