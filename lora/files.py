"""Writing files so that a crash never leaves half of one: one file, or several together.

A single file is replaced atomically by writing a temporary beside it and renaming it
over the old one (`os.replace`, atomic on POSIX and Windows; only within one file
system, hence "beside"). Two files that belong together (an adapter's config and its
weights) need more: both temporaries are written before either rename, so a failed
write changes nothing, and the old versions are kept aside until both renames succeed,
so a failed rename is undone. Only a process killed between the renames can leave one
new file beside one old one; whoever reads the pair should be able to tell
(lora.adapter_io records a digest for that).

Temporaries are named `.NAME.PID.RANDOM.tmp` (backups `.old`) and created with mode
0o666, so the kernel applies the user's umask and the final file gets the permissions
of any other file the user writes (mkstemp's private 0o600 would hide results from
colleagues on a shared machine). A writer killed before its rename leaves its
temporaries behind; the next write of the same file removes those whose process is
gone. Readers of the project's folders ignore names that start with '.'.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

TAGS = ("tmp", "old")


def temp_beside(path: Path, tag: str = "tmp") -> Path:
    """A new, empty `.NAME.PID.RANDOM.<tag>` beside `path`, created 0o666 & ~umask."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:                   # another writer drew the same name: draw again
            continue


def remove_stale_temps(path: Path) -> None:
    """Delete the temporaries of `path` left by writers that no longer run (on this machine);
    a live writer's temporary, or one we cannot attribute, is left alone."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        parts = tmp.name[len(path.name) + 2:].split(".")          # [pid, random, tag]
        if len(parts) != 3 or parts[2] not in TAGS or not parts[0].isdigit() or int(parts[0]) == os.getpid():
            continue
        try:
            os.kill(int(parts[0]), 0)             # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:                           # it exists but belongs to another user
            pass


def _write_temp(path: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) into a fresh temporary beside `path`, keeping the umask's permissions."""
    tmp = temp_beside(path, "tmp")
    try:
        wanted = tmp.stat().st_mode & 0o777
        write(tmp)
        if tmp.stat().st_mode & 0o777 != wanted:  # a writer that makes its own file (safetensors: 0o600)
            tmp.chmod(wanted)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp_path), then rename over `path`: readers see the old file or the new one."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_together(files: list[tuple[Path, Callable[[Path], None]]]) -> None:
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
            remove_stale_temps(path)
            temps.append(_write_temp(Path(path), write))
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
