"""Replacing several files together: all the new versions, or all the old ones.

A single file is replaced atomically by writing a temporary beside it and renaming it
over the old one (`os.replace`, atomic on POSIX and Windows). Two files that belong
together (an adapter's config and its weights) need more: both temporaries are
written before either rename, so a failed write changes nothing, and the old versions
are kept aside until both renames succeed, so a failed rename is undone. Only a process
killed between the renames can leave one new file beside one old one; whoever reads
the pair should be able to tell (lora.adapter_io records a digest for that).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def temp_beside(path: Path, tag: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{tag}")
    os.close(fd)
    return tmp


def replace_together(files: list[tuple[Path, Callable[[str], None]]]) -> None:
    """Put new versions of several files in place, all or none (short of a killed process).

    `files` are (path, write) with write(tmp_path) producing the new file. Every file is
    written to a temporary beside its path first; only then are they renamed over their
    paths (os.replace: each rename alone is atomic). Old versions are kept aside (a hard
    link, or a copy where links are not supported) until every rename has succeeded, so a
    failed rename puts the earlier ones back.
    """
    temps, backups, done = [], {}, []
    try:
        for path, write in files:
            temps.append(temp_beside(path, "tmp"))
            write(temps[-1])
        for path, _ in files:
            if path.exists():
                backup = temp_beside(path, "old")
                os.unlink(backup)
                try:
                    os.link(path, backup)
                except OSError:
                    shutil.copy2(path, backup)
                backups[path] = backup
        try:
            for (path, _), tmp in zip(files, temps):
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in reversed(done):
                if path in backups:
                    os.replace(backups.pop(path), path)
                else:
                    os.unlink(path)
            raise
    finally:
        for leftover in temps + list(backups.values()):
            if os.path.exists(leftover):
                os.unlink(leftover)
