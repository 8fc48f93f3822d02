"""Helpers every layer shares: reading ahead in threads, the default thread count, URL downloads, and atomic writes
of files and folders (an interrupted write never leaves a half-visible output)."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import urllib.request
from collections import deque
from concurrent.futures import Executor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ['map_ahead', 'default_threads', 'fetch_url', 'atomic_write_bytes', 'atomic_dir']

T = TypeVar('T')
R = TypeVar('R')


def map_ahead(fn: Callable[[T], R], items: Iterable[T], pool: Executor | None, ahead: int) -> Iterator[R]:
    """``map(fn, items)`` in order, with up to ``ahead`` calls running ahead in ``pool`` (serially without one),
    so input work (decoding, resizing: PIL and decord release the GIL) overlaps what the caller does with each
    result. An exception of ``fn`` is raised when its result is reached."""
    if pool is None:
        yield from map(fn, items)
        return
    it = iter(items)
    pending = deque(pool.submit(fn, x) for x in islice(it, max(1, ahead)))
    while pending:
        fut = pending.popleft()
        for x in islice(it, 1):
            pending.append(pool.submit(fn, x))
        yield fut.result()


def default_threads(limit: int = 8) -> int:
    """Threads for input work (decoding, reading): one per CPU, at most ``limit``."""
    return max(1, min(limit, os.cpu_count() or 1))


def fetch_url(url: str, timeout: float, what: str) -> bytes:
    """The body of an http(s) ``url``.

    Raises:
        OSError: ``cannot download {what} {url}: <reason>`` (unreachable host, HTTP error, timeout after ``timeout``
            seconds).
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (callers pass http(s) only)
            return resp.read()
    except OSError as e:
        raise OSError(f'cannot download {what} {url}: {e}') from None


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored under a lock)."""
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename; the file gets the
    permissions a plain ``open(path, 'wb')`` would (``0o666`` less the umask), not the temporary file's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes plain ``mkdir`` / ``open`` would (``0o777`` / ``0o666`` less
    the umask): mkdtemp makes 0700 folders and some writers (safetensors) 0600 files."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


@contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Fill a temporary sibling folder, then put it in ``dst``'s place: the previous ``dst`` (if any) is renamed
    aside first and deleted after, so ``dst`` always holds either the old or the new content, never a mix. On an
    error the temporary folder is removed and ``dst`` is untouched. Whether ``dst`` may be replaced is the
    caller's decision. What is put in place has the permissions the umask gives."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{dst.name}.', suffix='.tmp', dir=dst.parent))
    try:
        yield tmp
        _umask_modes(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{dst.name}.', suffix='.old', dir=dst.parent))
            os.replace(dst, old)  # a folder renames onto the empty one
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
