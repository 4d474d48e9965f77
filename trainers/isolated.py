"""Run one call in a fresh Python process, so what it measures about the process is its own.

    row = in_fresh_process(run_task, config, task, train_cfg, out_dir, settings)

Why: on the CPU the trainer's peak memory is the process's peak resident set size
(trainers.train.peak_memory), which only ever grows within a process. Runs made one after
another in one process would each report the largest peak so far, and a matrix would show
QLoRA above LoRA because it ran later. On Linux train() resets that peak when it starts
(trainers.train.reset_peak_memory); elsewhere a child process is what gives each run its
own, and on every system it leaves nothing of one run's memory (allocator caches, imports)
to the next. (Linux carries the parent's peak into a child across fork + exec, so there it
is the reset that counts.)

How: `python -c` with the function and its arguments pickled on its stdin (a function is
pickled by name, so it must be importable: defined at the top of a module), the result
pickled back through a temporary file; the child's stdout and stderr are this process's.
Not multiprocessing's "spawn", which runs the parent's main script again in the child when
that script is not guarded by `if __name__ == "__main__"` (a tutorial, a notebook export).

An exception raised in the child is raised here as itself, with the child's traceback as
its cause; one that cannot be pickled (a custom __init__) arrives as a RuntimeError naming
its type and message. Ctrl-C reaches the child too (same process group): it stops and
cleans up as it would in process, and this process waits for it before going on.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import traceback

CHILD = ("import pickle, sys\n"
         "paths, payload, result = pickle.load(sys.stdin.buffer)\n"
         "sys.path[:0] = [p for p in paths if p not in sys.path]\n"
         "from trainers.isolated import _child\n"
         "_child(payload, result)\n")


class ChildTraceback(Exception):
    """The traceback of an error raised in the child process (its text)."""


def _child(payload: bytes, result_path: str) -> None:
    """In the child: run the call, pickle ("ok", value) or ("error", exception, traceback text)."""
    try:
        fn, args, kwargs = pickle.loads(payload)
        outcome = ("ok", fn(*args, **kwargs))
    except BaseException as err:                    # noqa: BLE001 - everything goes back to the parent
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(err))
        except Exception:                            # noqa: BLE001 - any failure to travel back
            err = RuntimeError(f"{type(err).__name__}: {err}")
        outcome = ("error", err, text)
    with open(result_path, "wb") as f:
        pickle.dump(outcome, f)


def in_fresh_process(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a new Python process; returns its result or raises its error."""
    payload = pickle.dumps((fn, args, kwargs))
    fd, result_path = tempfile.mkstemp(prefix="nanopeft-child-", suffix=".pkl")
    os.close(fd)
    try:
        proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE)
        try:
            proc.communicate(pickle.dumps((list(sys.path), payload, result_path)))
        except BaseException:                       # Ctrl-C: the child got it too; let it clean up
            proc.wait()
            raise
        with open(result_path, "rb") as f:
            outcome = pickle.load(f) if os.path.getsize(result_path) else None
    finally:
        os.unlink(result_path)
    if outcome is None:
        raise RuntimeError(f"the child process running {getattr(fn, '__qualname__', fn)} ended without a result "
                           f"(exit code {proc.returncode}; killed, or out of memory?)")
    if outcome[0] == "ok":
        return outcome[1]
    raise outcome[1] from ChildTraceback(outcome[2])
