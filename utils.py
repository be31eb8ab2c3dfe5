"""Small helpers that every stage shares: atomic file writes.

A stage never leaves a half-written file behind: it writes beside the target under a
temporary name and renames it into place only once the write has succeeded.
"""
import contextlib
import hashlib
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


def _sha256(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def local_model_path(name_or_path):
    """A model's files on this machine: the path itself, or a hub name's snapshot in the local
    transformers cache (never downloads). None when neither exists."""
    path = Path(name_or_path)
    if path.exists():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:  # not a hub name, or not in the cache: the caller says what it needed
        return None


MODEL_FILE_SUFFIXES = {".json", ".txt", ".model", ".safetensors"}


def fingerprint(name_or_path):
    """What identifies a pretrained file or model folder: {"path", "bytes", "sha256"}.

    A folder's sha256 covers every file's relative name and content, so a changed tokenizer or
    weight file changes it. A hub name is resolved through the local cache.
    """
    path = local_model_path(name_or_path)
    if path is None:
        raise FileNotFoundError(f"{name_or_path}: no such file or folder, and not a model in the local cache")
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}
    # Only the files a transformers load reads: a cache snapshot may gain other formats later.
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (p.suffix in MODEL_FILE_SUFFIXES or p.name.startswith("pytorch_model")))
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(path).as_posix()}\0{_sha256(p)}\n".encode())
    return {"path": str(path), "bytes": sum(p.stat().st_size for p in files), "sha256": digest.hexdigest()}
