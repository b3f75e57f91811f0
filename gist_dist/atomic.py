"""Atomic writes: a reader (or a resumed job) sees the old file or the whole new one, never half.

write_text(path, text)             # temp file next to it, then os.replace
with atomic_dir(folder) as tmp:    # fill tmp; on success it replaces `folder` in one rename
    ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def write_text(path, text: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_file(tmp, path):
    """Publish a file written elsewhere under a temp name (e.g. by safetensors' save_file)."""
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield `path.tmp` (emptied); when the block succeeds, swap it in for `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
