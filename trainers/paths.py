"""Where the offline data lives.

Loaders are real: a hub id when online, a local file or folder otherwise. The
local folder is found in this order: an explicit argument, the NANOPEFT_DATA
environment variable, then `../shared/data` beside the repository checkout or
beside the current directory. `None` means there is no local data here.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HUB_HINT = ("set NANOPEFT_DATA to a folder laid out like shared/data "
            "(see shared/data/PROVENANCE.md), or run online so the hub loaders can fetch it")


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data folder, or None when there is none."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data dir: {str(path)!r} is not a directory")
        return path
    env = os.environ.get("NANOPEFT_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"NANOPEFT_DATA: {env!r} is not a directory")
        return path
    for candidate in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def data_file(*parts: str, explicit: str | os.PathLike | None = None) -> Path:
    """A file under the data folder; a clear error naming it when it is missing."""
    root = data_dir(explicit)
    if root is None:
        raise FileNotFoundError(f"no local data folder for {'/'.join(parts)}: {HUB_HINT}")
    path = root.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found under the data folder {str(root)!r}")
    return path
