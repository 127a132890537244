"""One path layer for workdirs, checkpoints, data and models: a local path and a `gs://` URL work alike.

Every path the trainer reads or writes goes through `etils.epath` (the layer Orbax itself uses): local paths through
the OS, `gs://` / `s3://` through fsspec (the `gcs` extra installs gcsfs) or TensorFlow's file system when that is
installed. Orbax writes checkpoint arrays with tensorstore, which reads and writes `gs://` by itself.

Two readers need local files: safetensors (memory-mapped) and Hugging Face tokenizers. `local_copy` gives them a
copy of a remote checkpoint directory in a local cache; `local_dir_for` lets a writer of local files (the Hugging
Face export) write to a remote directory.
"""

import contextlib
import hashlib
import os
import shutil
import tempfile

from etils import epath


def is_local(path) -> bool:
    """Whether `path` is a plain local path (no `scheme://`)."""
    return '://' not in os.fspath(path)


def join(path, *parts) -> str:
    """`os.path.join` that keeps `gs://bucket/...` URLs intact."""
    return os.path.join(path, *parts) if is_local(path) else os.fspath(epath.Path(path).joinpath(*parts))


def exists(path) -> bool:
    return epath.Path(path).exists()


def isdir(path) -> bool:
    return epath.Path(path).is_dir()


def open_file(path, mode: str = 'r', **kwargs):
    """`open` for local paths and URLs alike."""
    return epath.Path(path).open(mode, **kwargs)


def default_cache_dir() -> str:
    return os.environ.get('TROPD_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'tropd_jax')


def local_copy(path, cache_dir: str | None = None) -> str:
    """`path` itself when it is local; else a local copy of the remote file or directory (copied once, then reused
    from `cache_dir`, by default `$TROPD_CACHE_DIR` or `~/.cache/tropd_jax`)."""
    if is_local(path):
        return os.fspath(path)
    source = epath.Path(path)
    name = hashlib.sha256(os.fspath(path).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir or default_cache_dir(), f'{name}-{source.name}')
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = tempfile.mkdtemp(dir=os.path.dirname(target), prefix='.partial-')
    _copy(source, os.path.join(partial, 'copy'))
    try:  # several processes of one machine may copy at once; the first rename wins
        os.rename(os.path.join(partial, 'copy'), target)
    except OSError:
        if not os.path.exists(target):
            raise
    shutil.rmtree(partial, ignore_errors=True)
    return target


def _copy(source: epath.Path, target) -> None:
    """Copies a file or a directory tree from any file system to any other."""
    target = epath.Path(target)
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            _copy(child, target / child.name)
    else:
        with source.open('rb') as f, target.open('wb') as g:
            shutil.copyfileobj(f, g)


@contextlib.contextmanager
def local_dir_for(path):
    """A local directory to write `path`'s files into: `path` itself when local; else a temporary directory whose
    files are copied to `path` when the block ends without an error."""
    if is_local(path):
        os.makedirs(path, exist_ok=True)
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as local:
        yield local
        for name in os.listdir(local):
            _copy(epath.Path(local) / name, epath.Path(path) / name)
