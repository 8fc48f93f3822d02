"""The on-disk format of embedding jobs: a folder of atomically written shards plus a ``meta.json``.

Layout of an embeddings dir (``cnclip embed ... --out photos.emb``)::

    photos.emb/
      meta.json            what made it: model (source, fingerprint, arch, embed_dim, precision), modality, input,
                           shard size, and "complete" once every shard is written
      shards/00000.npz     one per ``shard_size`` inputs, in input order; numpy arrays (no pickle):
                             ids (n,) str, sources (n,) str, vectors (n, D) float32 (L2-normalised),
                             failed_ids (m,) str, errors (m,) str
      errors.jsonl         {"id", "source", "error"} for every input that could not be embedded

Shard ``k`` always covers inputs ``[k * shard_size, (k + 1) * shard_size)`` of the job's input list. A shard is
written to a temporary name and renamed, so a shard file that exists is complete: an interrupted job resumes by
skipping the shards on disk. Read with :func:`load_embeddings`; any numpy reader can read the shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from modelscope_cnclip.utils import atomic_write_bytes

__all__ = ['FORMAT', 'Embeddings', 'load_embeddings', 'read_meta', 'write_meta', 'write_shard', 'read_shard',
           'shard_path', 'existing_shards', 'ids_digest']

FORMAT = 'cnclip-embeddings'
VERSION = 1
META = 'meta.json'
ERRORS = 'errors.jsonl'
SHARDS = 'shards'


@dataclass
class Embeddings:
    """Embeddings with their ids: row ``i`` of ``vectors`` belongs to ``ids[i]`` (read from ``sources[i]``)."""

    ids: list[str]
    vectors: np.ndarray  # (N, D) float32, L2-normalised
    sources: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)  # {"id", "source", "error"}

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.ids):
            raise ValueError(f'{len(self.ids)} ids for vectors of shape {self.vectors.shape}: expected (N, D)')
        if self.sources and len(self.sources) != len(self.ids):
            raise ValueError(f'{len(self.sources)} sources for {len(self.ids)} ids')

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def model(self) -> dict[str, Any]:
        """``{"source", "fingerprint", "arch", "embed_dim", "precision"}`` of the model that made them."""
        return self.meta.get('model', {})


def ids_digest(ids: Sequence[str]) -> str:
    """A hash of an input id list: a resumed job must see the same inputs in the same order."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode('utf-8', 'surrogatepass'))
        h.update(b'\0')
    return h.hexdigest()[:16]


def write_meta(out_dir: str | Path, meta: dict[str, Any]) -> None:
    meta = {'format': FORMAT, 'version': VERSION, **meta}
    atomic_write_bytes(Path(out_dir) / META, json.dumps(meta, ensure_ascii=False, indent=2).encode('utf-8'))


def read_format_json(path: Path, fmt: str, version: int) -> dict[str, Any]:
    """A ``meta.json`` that declares ``{"format": fmt, "version": <= version}`` (embeddings and index dirs)."""
    try:
        meta = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: invalid JSON ({e})') from None
    if not isinstance(meta, dict) or meta.get('format') != fmt:
        found = meta.get('format') if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f'{path}: format {found!r}, expected {fmt!r}')
    if meta.get('version', 0) > version:
        raise ValueError(f'{path}: format version {meta["version"]} is newer than this plugin reads ({version}); '
                         f'upgrade modelscope_cnclip')
    return meta


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of an embeddings dir; a clear error when the path is not one."""
    path = Path(out_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f'{out_dir}: not an embeddings dir (no {META}); make one with `cnclip embed`')
    return read_format_json(path, FORMAT, VERSION)


def shard_path(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / SHARDS / f'{index:05d}.npz'


def existing_shards(out_dir: str | Path) -> list[int]:
    """Indices of the complete shards on disk (temporary files of an interrupted write are not counted)."""
    folder = Path(out_dir) / SHARDS
    if not folder.is_dir():
        return []
    return sorted(int(p.stem) for p in folder.glob('*.npz') if p.stem.isdigit())


def _str_array(values: Sequence[str]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.str_) if len(values) else np.zeros(0, dtype='<U1')


def write_shard(out_dir: str | Path, index: int, ids: Sequence[str], sources: Sequence[str], vectors: np.ndarray,
                failed: Sequence[dict[str, str]] = ()) -> Path:
    """Write shard ``index`` atomically; ``failed`` holds ``{"id", "source", "error"}`` of its unreadable inputs."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids) or len(sources) != len(ids):
        raise ValueError(f'shard {index}: {len(ids)} ids, {len(sources)} sources, vectors {vectors.shape}')
    buf = io.BytesIO()
    np.savez(buf, ids=_str_array(ids), sources=_str_array(sources), vectors=vectors,
             failed_ids=_str_array([f['id'] for f in failed]), failed_sources=_str_array([f['source'] for f in failed]),
             errors=_str_array([f['error'] for f in failed]))
    path = shard_path(out_dir, index)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_shard(path: str | Path, vectors: bool = True
               ) -> tuple[list[str], list[str], np.ndarray | None, list[dict[str, str]]]:
    """``(ids, sources, vectors, failed)`` of one shard file; ``vectors=False`` skips reading the vectors (the
    bulk of the file) and returns ``None`` for them."""
    try:
        with np.load(path, allow_pickle=False) as z:
            failed = [{'id': str(i), 'source': str(s), 'error': str(e)}
                      for i, s, e in zip(z['failed_ids'], z['failed_sources'], z['errors'])]
            return ([str(i) for i in z['ids']], [str(s) for s in z['sources']], z['vectors'] if vectors else None,
                    failed)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path}: not a readable embeddings shard ({e}); delete it and rerun the job to '
                         f'recompute it') from None


def iter_shards(out_dir: str | Path, vectors: bool = True) -> Iterator[tuple[int, tuple]]:
    """``(index, read_shard(...))`` of every complete shard, in order."""
    for k in existing_shards(out_dir):
        yield k, read_shard(shard_path(out_dir, k), vectors)


def load_embeddings(path: str | Path, allow_incomplete: bool = False) -> Embeddings:
    """Read an embeddings dir into one :class:`Embeddings` (rows in input order, failed inputs left out and
    listed in ``failed``).

    Args:
        allow_incomplete: read the shards of a job that has not finished (by default that is refused, naming
            the command that resumes it).
    """
    meta = read_meta(path)
    if not meta.get('complete') and not allow_incomplete:
        shards = existing_shards(path)
        raise ValueError(f'{path}: the embedding job is not finished ({len(shards)} of {meta.get("num_shards")} '
                         f'shards written); rerun the same `cnclip embed` command to resume it, or pass '
                         f'allow_incomplete=True')
    ids: list[str] = []
    sources: list[str] = []
    vectors: list[np.ndarray] = []
    failed: list[dict[str, str]] = []
    for _, (i, s, v, f) in iter_shards(path):
        ids += i
        sources += s
        vectors.append(v)
        failed += f
    dim = int(meta.get('model', {}).get('embed_dim', 0))
    mat = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return Embeddings(ids, mat, sources, meta, failed)
