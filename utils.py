"""Small helpers that every stage shares: atomic file writes.

A stage never leaves a half-written file behind: it writes beside the target under a
temporary name and renames it into place only once the write has succeeded.
"""
import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it; put it straight back


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    The temporary name keeps `path`'s suffix, so libraries that pick a format from the
    extension (soundfile, np.save) write the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); give it the mode open() would have given.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_npy_atomic(path, array):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
