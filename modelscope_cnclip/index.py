"""Vector search over embeddings with faiss: an :class:`Index` that keeps vectors, ids and the model that made
them together, and a :class:`Searcher` that embeds a text or image query with that model and searches.

Layout of an index dir (``cnclip index build photos.emb --out photos.index``)::

    photos.index/
      meta.json     format/version, count, dim, kind, faiss factory string, search params (nprobe, efSearch),
                    build params, model (source, fingerprint, arch, embed_dim, precision), modality, root
      index.faiss   the faiss index (``faiss.write_index``); row ``i`` is entry ``i``
      ids.npz       numpy arrays, no pickle: ids and sources as UTF-8 bytes (``*_data`` uint8) cut by offsets
                    (``*_offsets`` int64, n + 1): string ``i`` is ``data[offsets[i]:offsets[i + 1]]``

:meth:`Index.save` writes a temporary dir and swaps it in with renames, so a dir that holds a ``meta.json`` is
complete; :meth:`Index.load` checks that its ids, the faiss index and the metadata agree.

Kinds: ``'flat'`` (exact inner product), ``'ivf'`` (IVF-Flat), ``'hnsw'`` (HNSW-Flat), ``'ivfpq'`` (IVF with
product quantisation: 1/16 of the memory, lower recall), any faiss ``index_factory`` string, or ``'auto'``:
exact search up to :data:`AUTO_EXACT_MAX` vectors, IVF-Flat with :func:`default_nprobe` above (recall@10 against
exact search >= 0.95 in ``benchmarks/bench_search.py``; see ``benchmarks/RESULTS_search.md``).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np

from modelscope_cnclip.config import Backend, Precision
from modelscope_cnclip.embeddings import Embeddings, load_embeddings, read_format_json
from modelscope_cnclip.utils import atomic_dir, atomic_write_bytes

if TYPE_CHECKING:
    from modelscope_cnclip.inference import CNClip

__all__ = ['FORMAT', 'KINDS', 'AUTO_EXACT_MAX', 'OPTIONS', 'Hit', 'Index', 'IndexOptions', 'Searcher', 'read_meta',
           'query_kind', 'default_nlist', 'default_nprobe']

logger = logging.getLogger(__name__)

FORMAT = 'cnclip-index'
VERSION = 1
META = 'meta.json'
FAISS_FILE = 'index.faiss'
IDS_FILE = 'ids.npz'
KINDS = ('auto', 'flat', 'ivf', 'hnsw', 'ivfpq')
#: The named kinds; a faiss ``index_factory`` string (``"IVF1024,SQ8"``) is accepted too.
IndexKind = Literal['auto', 'flat', 'ivf', 'hnsw', 'ivfpq']
# 'auto' searches exactly up to this many vectors: a 2-thread CPU scans 10^5 x 512 float32 in a few ms per query,
# past that an IVF index answers in a fraction of the time at recall@10 >= 0.95 (benchmarks/RESULTS_search.md).
AUTO_EXACT_MAX = 100_000
# The defaults of IndexOptions' fields left None (None here: derived from the number of vectors or the dim).
OPTIONS: dict[str, Any] = {
    'nlist': None,           # ivf, ivfpq: inverted lists (default_nlist)
    'nprobe': None,          # ivf, ivfpq, factory strings with IVF: lists visited per query (default_nprobe)
    'M': 32,                 # hnsw: graph degree
    'efConstruction': 40,    # hnsw: build-time beam (higher: better graph, slower build)
    'efSearch': 256,         # hnsw: search-time beam (raised to k when k is larger)
    'pq_m': None,            # ivfpq: bytes per vector (default dim // 8: 64 bytes for 512-d)
    'train_size': None,      # vectors sampled to train IVF/PQ (default 40 per list; ivfpq at least 10,000)
    'seed': 0,               # training sample
}
SEARCH_PARAMS = ('nprobe', 'efSearch')
_FACTORY_ERRORS = (RuntimeError, ValueError, TypeError)


@dataclass(frozen=True)
class IndexOptions:
    """Build and search options of an :class:`Index`, checked once here. ``None`` (every default) takes the
    default in :data:`OPTIONS`, some of them derived from the first batch's size or dimension. The names are faiss'
    own and the keys that ``meta.json`` records (under ``"options"``, only the fields given).

    Attributes:
        nlist: ``ivf``, ``ivfpq``: inverted lists (default :func:`default_nlist` of the first batch).
        nprobe: ``ivf``, ``ivfpq``, factory strings with IVF: lists visited per query (default :func:`default_nprobe`).
        M: ``hnsw``: graph degree (default 32).
        efConstruction: ``hnsw``: build-time beam (default 40; higher: a better graph, a slower build).
        efSearch: ``hnsw``: search-time beam (default 256; raised to ``k`` when ``k`` is larger).
        pq_m: ``ivfpq``: bytes per vector (default the largest divisor of the dimension <= dim / 8).
        train_size: vectors sampled to train IVF/PQ (default 40 per list; ``ivfpq`` at least 10,000; factory strings
            50,000).
        seed: of the training sample (default 0).

    Raises:
        ValueError: a value that is not an int >= 1 (``seed``: >= 0).
    """

    nlist: int | None = None
    nprobe: int | None = None
    M: int | None = None
    efConstruction: int | None = None
    efSearch: int | None = None
    pq_m: int | None = None
    train_size: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            least = 0 if f.name == 'seed' else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f'index option {f.name}={value!r}: must be an int >= {least}, or None for the '
                                 f'default')
            object.__setattr__(self, f.name, int(value))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> 'IndexOptions':
        """From keyword arguments or a ``meta.json``'s ``"options"`` (``where`` names it in errors).

        Raises:
            TypeError: an unknown option (the message lists the valid ones). ValueError: an invalid value.
        """
        prefix = f'{where}: ' if where else ''
        if not isinstance(data, Mapping):
            raise TypeError(f'{prefix}index options must map option names to values, got {type(data).__name__}')
        unknown = sorted(set(data) - set(OPTIONS))
        if unknown:
            raise TypeError(f'{prefix}unknown index option(s) {unknown}; valid: {sorted(OPTIONS)}')
        return cls(**data)

    def to_dict(self) -> dict[str, int]:
        """The options given (not None), in :data:`OPTIONS` order: what ``meta.json`` records."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def value(self, name: str) -> Any:
        """The option ``name`` in effect: the given value, else its default (``None``: derived when building)."""
        given = getattr(self, name)
        return OPTIONS[name] if given is None else given


def _options(options: IndexOptions | None, kwargs: Mapping[str, Any]) -> IndexOptions:
    """``options`` with the old keyword arguments (``nprobe=8``, ...) laid over it."""
    if options is not None and not isinstance(options, IndexOptions):
        raise TypeError(f'options={options!r}: expected an IndexOptions, e.g. options=IndexOptions(nprobe=32)')
    base = options or IndexOptions()
    return replace(base, **IndexOptions.from_dict(kwargs).to_dict()) if kwargs else base


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError('vector search needs faiss: pip install "modelscope_cnclip[index]" '
                          '(or faiss-cpu / faiss-gpu)') from None
    return faiss


@dataclass(frozen=True)
class Hit:
    """One search result: ``id`` of the entry, where it is (``path``), inner-product ``score``, 1-based ``rank``."""

    id: str
    path: str
    score: float
    rank: int

    def to_dict(self) -> dict[str, Any]:
        return {'id': self.id, 'path': self.path, 'score': self.score}


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``2 sqrt(n)`` (2048 for 10^6), with >= 39
    vectors per list (faiss' k-means minimum). Twice sqrt(n) beat sqrt(n) in recall per millisecond in
    ``benchmarks/bench_search.py``; training grows with nlist, which keeps it from going higher."""
    nlist = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    return int(max(1, min(nlist, n // 39)))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: ``3 sqrt(nlist)`` (68 of 512, 136 of 2048). The lists a query needs for
    recall@10 >= 0.95 grow slowly with nlist (about 48 of 512 and 64 of 2048 for text-like queries, fewer for
    image-like ones, in ``benchmarks/bench_search.py``); this leaves a margin."""
    return int(min(nlist, max(16, round(3 * math.sqrt(nlist)))))


def _default_pq_m(dim: int) -> int:
    """The largest number of PQ sub-vectors <= dim / 8 that divides ``dim`` (8 bits each)."""
    return next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)


def _plan(kind: str, n: int, dim: int, opts: IndexOptions) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(factory string, build params, search params)`` of ``kind`` for a first batch of ``n`` vectors."""
    if kind == 'flat':
        return 'Flat', {}, {}
    if kind == 'hnsw':
        m = opts.value('M')
        return f'HNSW{m}', {'M': m, 'efConstruction': opts.value('efConstruction')}, \
            {'efSearch': opts.value('efSearch')}
    if kind in ('ivf', 'ivfpq'):
        nlist = opts.nlist or default_nlist(n)
        nprobe = opts.nprobe or default_nprobe(nlist)
        # 40 vectors per list (faiss warns below 39); PQ's 256 centroids per sub-vector want 10,000.
        least = 40 * nlist if kind == 'ivf' else max(40 * nlist, 10_000)
        build: dict[str, Any] = {'nlist': nlist, 'train_size': opts.train_size or least}
        if kind == 'ivf':
            return f'IVF{nlist},Flat', build, {'nprobe': nprobe}
        pq_m = opts.pq_m or _default_pq_m(dim)
        if dim % pq_m:
            raise ValueError(f'pq_m={pq_m} must divide the dimension {dim}')
        # 'np': no polysemous training (a slow annealing that only serves Hamming-filtered search).
        return f'IVF{nlist},PQ{pq_m}np', {**build, 'pq_m': pq_m}, {'nprobe': nprobe}
    # A faiss index_factory string: the search options the user gave, and for IVF a default nprobe (faiss' is 1).
    search = {p: getattr(opts, p) for p in SEARCH_PARAMS if getattr(opts, p) is not None}
    ivf = re.search(r'IVF(\d+)', kind)
    if ivf and 'nprobe' not in search:
        search['nprobe'] = default_nprobe(int(ivf.group(1)))
    return kind, {'train_size': opts.train_size or 50_000}, search


def _reason(e: Exception) -> str:
    """The message of a faiss C++ exception without its source location."""
    line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return re.sub(r'^Error in .* at \S+:\d+: ', '', line)


def _pack_strings(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [v.encode('utf-8', 'surrogatepass') for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b''.join(encoded), np.uint8), offsets


def _unpack_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[a:b].decode('utf-8', 'surrogatepass') for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(values: Sequence[str], n: int = 3) -> str:
    shown = ', '.join(repr(v) for v in values[:n])
    return shown + (f' and {len(values) - n} more' if len(values) > n else '')


class Index:
    """Embedding vectors with their ids, sources and the model that made them, searchable by inner product.

    Entry ``i`` is row ``i`` of the faiss index. Make one with :meth:`build` (from an embeddings dir or
    :class:`~modelscope_cnclip.embeddings.Embeddings`), :meth:`from_arrays`, or ``Index(dim, kind)`` and
    :meth:`add`; the faiss index itself is created (and trained) on the first add, from that batch.

    Args:
        dim: vector dimension ``D``.
        kind: ``'auto'``, ``'flat'``, ``'ivf'``, ``'hnsw'``, ``'ivfpq'`` or a faiss ``index_factory`` string
            (inner-product metric).
        model: ``{"source", "fingerprint", "arch", "embed_dim", "precision"}`` of the model that made the vectors.
        root: for image folders, the folder: an entry's path is ``os.path.join(root, id)``.
        modality: ``'image'``, ``'text'`` or ``'video'`` (informational).
        options: build and search options (:class:`IndexOptions`).
        **opts: the same options as keyword arguments (``nprobe=8``), laid over ``options``.

    Raises:
        ValueError: a bad dimension, kind or option value, or a model of another ``embed_dim``.
        TypeError: an unknown option.
    """

    def __init__(self, dim: int, kind: IndexKind | str = 'auto', *, model: dict[str, Any] | None = None,
                 root: str | None = None, modality: Literal['image', 'text', 'video'] | None = None,
                 options: IndexOptions | None = None, **opts: Any) -> None:
        self.options = _options(options, opts)
        if not isinstance(kind, str) or not kind:
            raise ValueError(f'kind={kind!r}: use one of {list(KINDS)} or a faiss index_factory string')
        if int(dim) < 1:
            raise ValueError(f'dim={dim}: must be positive')
        self.dim = int(dim)
        self._search_lock = threading.Lock()
        self.requested_kind = kind.lower() if kind.lower() in KINDS else kind
        self.model: dict[str, Any] = dict(model or {})
        if self.model.get('embed_dim') not in (None, self.dim):
            raise ValueError(f'model {self.model.get("source")!r} has embed_dim {self.model["embed_dim"]}, but the '
                             f'index dimension is {self.dim}')
        self.root = str(root) if root else None
        self.modality = modality
        self.ids: list[str] = []
        self.sources: list[str] = []
        self.path: Path | None = None  # where it was loaded from or last saved to
        self._pos: dict[str, int] = {}
        self._faiss: Any = None
        self._kind: str | None = None
        self.factory: str | None = None
        self.build_params: dict[str, Any] = {}
        self.params: dict[str, Any] = {}

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, embeddings: Embeddings | str | os.PathLike, kind: IndexKind | str = 'auto', *,
              options: IndexOptions | None = None, **opts: Any) -> 'Index':
        """An index of an embeddings dir (or loaded :class:`Embeddings`), remembering their model and root.

        Args:
            embeddings: what ``cnclip embed`` wrote, or :func:`~modelscope_cnclip.embeddings.load_embeddings`'s result.
            kind: see :class:`Index`; ``'auto'`` is exact up to :data:`AUTO_EXACT_MAX` vectors, IVF above.
            options: build and search options, e.g. ``IndexOptions(nprobe=32)``.
            **opts: the same options as keyword arguments (``nprobe=32``), laid over ``options``.

        Raises:
            ValueError / TypeError: see :class:`Index` and :meth:`add`.
        """
        emb = embeddings if isinstance(embeddings, Embeddings) else load_embeddings(embeddings)
        inp = emb.meta.get('input') or {}
        index = cls(emb.dim, kind, model=emb.model, root=inp.get('root'),
                    modality=emb.meta.get('modality') or inp.get('modality'), options=options, **opts)
        if not len(emb):
            logger.warning('no embeddings to index (%d inputs failed); the index is empty', len(emb.failed))
        index.add(emb.ids, emb.vectors, emb.sources or None)
        return index

    @classmethod
    def from_arrays(cls, ids: Sequence[str], vectors: np.ndarray, *, sources: Sequence[str] | None = None,
                    meta: dict[str, Any] | None = None, kind: IndexKind | str = 'auto',
                    options: IndexOptions | None = None, **opts: Any) -> 'Index':
        """An index of raw vectors with their ids.

        Args:
            ids: ``N`` ids (str), unique.
            vectors: ``(N, D)`` float vectors (L2-normalised for cosine similarity), converted to float32.
            sources: ``N`` locations (paths, URLs) of the entries.
            meta: may give ``model``, ``root``, ``modality`` (as an embeddings dir's meta.json does).
            kind, options, **opts: see :class:`Index`.

        Raises:
            ValueError / TypeError: see :class:`Index` and :meth:`add`.
        """
        meta = meta or {}
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f'vectors of shape {vectors.shape}: expected (N, D)')
        index = cls(vectors.shape[1], kind, model=meta.get('model'),
                    root=meta.get('root', (meta.get('input') or {}).get('root')), modality=meta.get('modality'),
                    options=options, **opts)
        index.add(ids, vectors, sources)
        return index

    def _create(self, vectors: np.ndarray) -> None:
        """Make (and train) the faiss index from the first batch: 'auto' and default sizes depend on it."""
        faiss = _faiss()
        n = len(vectors)
        kind = self.requested_kind
        if kind == 'auto':
            kind = 'flat' if n <= AUTO_EXACT_MAX else 'ivf'
            logger.info('kind auto: %s for %d vectors (exact up to %d)', kind, n, AUTO_EXACT_MAX)
        factory, build, search = _plan(kind, n, self.dim, self.options)
        try:
            index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except _FACTORY_ERRORS as e:
            raise ValueError(f'kind={kind!r}: faiss cannot make {factory!r} ({_reason(e)}); use one of {list(KINDS)} '
                             f'or a faiss index_factory string such as "IVF256,Flat"') from None
        if 'efConstruction' in build:
            faiss.downcast_index(index).hnsw.efConstruction = int(build['efConstruction'])
        if not index.is_trained:
            self._train(index, vectors, kind, factory, build)
        self._faiss, self._kind, self.factory, self.build_params = index, kind, factory, build
        self.params = dict(search)

    def _train(self, index: Any, vectors: np.ndarray, kind: str, factory: str, build: dict[str, Any]) -> None:
        n = len(vectors)
        need = max(build.get('nlist', 1), 256 if 'pq_m' in build else 1)
        if n < need:
            raise ValueError(f'kind={kind!r} ({factory}) is trained on its first add and needs at least {need} '
                             f'vectors; got {n}. Add more vectors at once, pass a smaller nlist, or use kind="flat"')
        size = min(n, build['train_size'])
        sample = vectors
        if size < n:
            rows = np.sort(np.random.default_rng(self.options.value('seed')).choice(n, size, replace=False))
            sample = vectors[rows]
        t = time.perf_counter()
        try:
            index.train(np.ascontiguousarray(sample))
        except RuntimeError as e:
            raise ValueError(f'kind={kind!r} ({factory}): training on {size} vectors failed '
                             f'({_reason(e)})') from None
        logger.info('trained %s on %d vectors in %.1f s', factory, size, time.perf_counter() - t)

    # --- properties ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f'Index({len(self)} x {self.dim}, kind={self.kind!r}, model={self.model.get("source")!r}, '
                f'root={self.root!r})')

    @property
    def kind(self) -> str:
        """The kind in use (``'flat'``, ``'ivf'``, ... or the factory string); the requested one before any add."""
        return self._kind or self.requested_kind

    @property
    def faiss_index(self) -> Any:
        """The underlying faiss index (``None`` before the first add)."""
        return self._faiss

    def path_of(self, i: int) -> str:
        """Where entry ``i`` is: ``root/id`` for an image folder, else its source (or its id)."""
        if self.root:
            return os.path.join(self.root, self.ids[i])
        return self.sources[i] if self.sources and self.sources[i] else self.ids[i]

    def info(self) -> dict[str, Any]:
        """What ``meta.json`` records: count, dim, kind, factory, params, model, modality, root."""
        return {'format': FORMAT, 'version': VERSION, 'count': len(self), 'dim': self.dim, 'kind': self.kind,
                'factory': self.factory, 'params': self.params, 'build': self.build_params, 'model': self.model,
                'modality': self.modality, 'root': self.root}

    # --- adding -------------------------------------------------------------------------------------------------

    def add(self, ids: Sequence[str], vectors: np.ndarray, sources: Sequence[str] | None = None,
            skip_existing: bool = False) -> int:
        """Append vectors ``(N, D)`` with their ids (and sources); returns how many were added.

        Raises:
            ValueError: an id already in the index (unless ``skip_existing``), an id repeated in ``ids``, vectors of
                another dimension, non-finite values, or too few vectors to train an IVF index on the first add.
        """
        ids = [str(i) for i in ids]
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise ValueError(f'{len(ids)} ids for vectors of shape {vectors.shape}: expected ({len(ids)}, {self.dim})')
        if vectors.shape[1] != self.dim:
            raise ValueError(f'vectors of dimension {vectors.shape[1]} cannot go into an index of dimension '
                             f'{self.dim} (model {self.model.get("source") or "unknown"}); embed them with the '
                             f'model that built the index, or build a new index')
        sources = [str(s) for s in sources] if sources is not None else []
        if sources and len(sources) != len(ids):
            raise ValueError(f'{len(sources)} sources for {len(ids)} ids')
        repeated = [i for i, c in Counter(ids).items() if c > 1]
        if repeated:
            raise ValueError(f'{len(repeated)} id(s) appear more than once in the batch: {_short(repeated)}')
        if not np.isfinite(vectors.sum(dtype=np.float64)):  # one pass, no (N, D) temporary
            raise ValueError('vectors contain NaN or infinite values')
        existing = [i for i in ids if i in self._pos]
        if existing:
            if not skip_existing:
                raise ValueError(f'{len(existing)} of {len(ids)} ids are already in the index: {_short(existing)}; '
                                 f'pass skip_existing=True (--skip-existing) to add only the new ones')
            keep = np.array([i not in self._pos for i in ids], dtype=bool)
            ids = [i for i, k in zip(ids, keep) if k]
            sources = [s for s, k in zip(sources, keep) if k] if sources else []
            vectors = vectors[keep]
            logger.info('skipped %d ids already in the index', len(existing))
        if not ids:
            return 0
        vectors = np.ascontiguousarray(vectors)
        if self._faiss is None:
            self._create(vectors)
        t = time.perf_counter()
        self._faiss.add(vectors)
        if sources and not self.sources and self.ids:  # first sources after entries without: keep rows aligned
            self.sources = list(self.ids)
        if self.sources or sources:
            self.sources += sources or ids
        start = len(self.ids)
        self.ids += ids
        self._pos.update((i, start + k) for k, i in enumerate(ids))
        assert self._faiss.ntotal == len(self.ids), (self._faiss.ntotal, len(self.ids))
        logger.info('added %d vectors in %.1f s (%d in the index)', len(ids), time.perf_counter() - t, len(self))
        if self.requested_kind == 'auto' and self._kind == 'flat' and start <= AUTO_EXACT_MAX < len(self):
            logger.warning('the index now holds %d vectors, past the exact-search size %d; rebuild it '
                           '(`cnclip index build`) for faster approximate search', len(self), AUTO_EXACT_MAX)
        return len(ids)

    def add_embeddings(self, embeddings: Embeddings | str | os.PathLike, skip_existing: bool = False) -> int:
        """Add an embeddings dir (or :class:`Embeddings`) made by the index's model; returns how many were added.

        Raises:
            ValueError: embeddings of another model (fingerprints differ) or another image folder root.
        """
        emb = embeddings if isinstance(embeddings, Embeddings) else load_embeddings(embeddings)
        where = embeddings if not isinstance(embeddings, Embeddings) else 'the embeddings'
        theirs, ours = emb.model, self.model
        if ours.get('fingerprint') and theirs.get('fingerprint') and ours['fingerprint'] != theirs['fingerprint']:
            raise ValueError(f'{where} were made by model {theirs.get("source")!r} (fingerprint '
                             f'{theirs["fingerprint"]}), but this index holds embeddings of model '
                             f'{ours.get("source")!r} (fingerprint {ours["fingerprint"]}); embed the inputs with '
                             f'{ours.get("source")!r}, or build a separate index for the other model')
        if emb.dim != self.dim:
            raise ValueError(f'{where} have dimension {emb.dim}, the index {self.dim}')
        root = (emb.meta.get('input') or {}).get('root')
        adopt_root = not len(self) and not self.root
        sources = emb.sources or None
        if not adopt_root and self.root and root != self.root:
            theirs_desc = f'folder {root!r}' if root else 'no folder (their ids are not paths in one)'
            raise ValueError(f'{where} come from {theirs_desc}, the index from folder {self.root!r}: ids are paths '
                             f'relative to the folder, so they cannot share an index; embed a folder that contains '
                             f'both, or build a separate index')
        if root and not adopt_root and not self.root:  # a folder into an index without one: keep full paths
            sources = [os.path.join(root, i) for i in emb.ids]
        modality = emb.meta.get('modality')
        if modality and self.modality and modality != self.modality:
            logger.warning('adding %s embeddings to an index of %s embeddings', modality, self.modality)
        added = self.add(emb.ids, emb.vectors, sources, skip_existing=skip_existing)
        # Adopted only once the add succeeded: a refused add leaves the index as it was.
        self.root = root if adopt_root else self.root
        self.model = self.model or dict(theirs)
        self.modality = self.modality or modality
        return added

    # --- searching ----------------------------------------------------------------------------------------------

    def set_params(self, **params: Any) -> None:
        """Change search parameters (``nprobe``, ``efSearch`` or any faiss ParameterSpace name); saved with it."""
        self.params.update({k: v for k, v in params.items() if v is not None})

    def _apply_params(self, k: int) -> None:
        faiss = _faiss()
        space = faiss.ParameterSpace()
        for name, value in self.params.items():
            if name == 'efSearch':
                value = max(int(value), k)  # HNSW returns at most efSearch results
            try:
                space.set_index_parameter(self._faiss, name, value)
            except RuntimeError as e:
                raise ValueError(f'search parameter {name}={value!r} does not apply to {self.factory!r} '
                                 f'({_reason(e)})') from None

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` entries with the highest inner product with each query.

        Args:
            queries: ``(Q, D)`` or ``(D,)`` float vectors (L2-normalised for cosine similarity).
            k: results per query (fewer when the index holds fewer entries).

        Returns:
            One list of :class:`Hit` per query, best first.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f'queries of shape {np.shape(queries)}: expected (Q, {self.dim}) or ({self.dim},) '
                             f'for this index')
        if int(k) < 1:
            raise ValueError(f'k={k}: must be at least 1')
        if not len(self):
            return [[] for _ in range(len(q))]
        k = min(int(k), len(self))
        with self._search_lock:  # the parameters live in the shared faiss index: set and search together
            self._apply_params(k)
            scores, rows = self._faiss.search(np.ascontiguousarray(q), k)
        return [[Hit(self.ids[r], self.path_of(r), float(s), rank)
                 for rank, (s, r) in enumerate(((s, r) for s, r in zip(srow, rrow) if r >= 0), start=1)]
                for srow, rrow in zip(scores.tolist(), rows.tolist())]

    def check_model(self, fingerprint: str, source: str = '') -> None:
        """Refuse a model other than the one that built the index (when the index records one)."""
        ours = self.model.get('fingerprint')
        if not ours:
            logger.warning('%s records no model fingerprint; cannot check that %s made it', self.path or 'the index',
                           source or 'the model')
            return
        if fingerprint != ours:
            raise ValueError(f'{self.path or "the index"} was built from embeddings of model '
                             f'{self.model.get("source")!r} (fingerprint {ours}), but the model given is '
                             f'{source or "another model"} (fingerprint {fingerprint}); use it with the model that '
                             f'built it (or its export), or rebuild the index from embeddings made by this model '
                             f'(`cnclip embed` then `cnclip index build`)')

    # --- persistence --------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the index dir (see the module docstring); returns ``path``.

        The files go to a temporary dir beside ``path`` that is then renamed into place, so ``path`` is always
        either the previous index or the new one, never a mix.

        Args:
            path: a new or empty dir, or (with ``overwrite``) an index dir to replace: also the one this index was
                loaded from.
            overwrite: replace an index dir already at ``path``. A dir that is not an index is never replaced.

        Raises:
            FileExistsError: ``path`` holds an index and ``overwrite`` is false, or ``path`` exists and is not an
                index dir.
        """
        path = Path(path)
        if path.exists() and not (path / META).is_file() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f'{path} exists and is not an index dir; choose another path or remove it')
        if (path / META).is_file() and not overwrite:
            raise FileExistsError(f'{path} already holds an index; pass overwrite=True (cnclip index build '
                                  f'--overwrite) to replace it, or choose another path')
        with atomic_dir(path) as tmp:
            self._write(tmp)
        self.path = path
        logger.info('saved %s', self)
        return path

    def _write(self, folder: Path) -> None:
        if self._faiss is not None:
            _faiss().write_index(self._faiss, str(folder / FAISS_FILE))
            _fsync_file(folder / FAISS_FILE)
        ids_data, ids_offsets = _pack_strings(self.ids)
        src_data, src_offsets = _pack_strings(self.sources)
        buf = io.BytesIO()
        np.savez(buf, ids_data=ids_data, ids_offsets=ids_offsets, sources_data=src_data, sources_offsets=src_offsets)
        atomic_write_bytes(folder / IDS_FILE, buf.getvalue())
        meta = {**self.info(), 'requested_kind': self.requested_kind,
                'options': self.options.to_dict(),
                'updated': time.strftime('%Y-%m-%dT%H:%M:%S')}
        atomic_write_bytes(folder / META, json.dumps(meta, ensure_ascii=False, indent=2).encode('utf-8'))

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_model: str | None = None) -> 'Index':
        """Read an index dir, checking that its parts agree.

        Args:
            path: an index dir (:meth:`save`, ``cnclip index build``).
            expect_model: the fingerprint of the model that will embed queries (``CNClip.fingerprint``); an index
                built by another model is refused.

        Raises:
            FileNotFoundError: not an index dir. ValueError: parts that disagree or cannot be read, another model.
        """
        path = Path(path)
        meta = read_meta(path)
        options = IndexOptions.from_dict(meta.get('options') or {}, where=str(path / META))
        index = cls(int(meta['dim']), meta.get('requested_kind') or meta['kind'], model=meta.get('model'),
                    root=meta.get('root'), modality=meta.get('modality'), options=options)
        index.path = path
        try:
            with np.load(path / IDS_FILE, allow_pickle=False) as z:
                index.ids = _unpack_strings(z['ids_data'], z['ids_offsets'])
                index.sources = _unpack_strings(z['sources_data'], z['sources_offsets'])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f'{path / IDS_FILE}: unreadable ({e}); rebuild the index with `cnclip index build`') \
                from None
        count = int(meta['count'])
        if (path / FAISS_FILE).is_file():
            try:
                index._faiss = _faiss().read_index(str(path / FAISS_FILE))
            except RuntimeError as e:
                raise ValueError(f'{path / FAISS_FILE}: not a readable faiss index ({_reason(e)}); rebuild the '
                                 f'index with `cnclip index build`') from None
            if index._faiss.d != index.dim:
                raise ValueError(f'{path}: the faiss index has dimension {index._faiss.d}, meta.json says {index.dim}')
            index._kind, index.factory = meta['kind'], meta.get('factory')
            index.build_params, index.params = meta.get('build') or {}, meta.get('params') or {}
        ntotal = index._faiss.ntotal if index._faiss is not None else 0
        if not len(index.ids) == count == ntotal or (index.sources and len(index.sources) != count):
            raise ValueError(f'{path}: inconsistent index ({len(index.ids)} ids, {len(index.sources)} sources, '
                             f'{ntotal} vectors, meta.json says {count}); rebuild it with `cnclip index build`')
        index._pos = {i: k for k, i in enumerate(index.ids)}
        if expect_model is not None:
            index.check_model(expect_model)
        logger.info('loaded %s', index)
        return index


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of an index dir (count, kind, model, ...) without loading the index."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        hint = ''
        if not path.exists():
            leftovers = sorted(path.parent.glob(f'.{path.name}.*.old')) if path.parent.is_dir() else []
            if leftovers:
                hint = f' (a save was interrupted: the previous index is in {leftovers[-1]}; rename it to {path})'
        raise FileNotFoundError(f'{path}: not an index dir (no {META}){hint}; make one with `cnclip index build`')
    return read_format_json(meta_path, FORMAT, VERSION)


# --- searching with a model --------------------------------------------------------------------------------------

QUERY_KINDS = ('text', 'image')
_LOOKS_LIKE_FILE = re.compile(r'^[^\s]+\.[A-Za-z0-9]{2,5}$')


def query_kind(query: Any) -> str:
    """``'image'`` for an existing file, an http(s) URL, a path object, PIL image, bytes or pixel array;
    ``'text'`` for any other str."""
    if isinstance(query, str):
        if query.startswith(('http://', 'https://')) or os.path.isfile(query):
            return 'image'
        if _LOOKS_LIKE_FILE.match(query) or os.sep in query:
            logger.warning('%r is not an existing file: searching it as text (pass kind="image" / --image to '
                           'treat it as an image)', query)
        return 'text'
    if isinstance(query, np.ndarray) and query.ndim == 1:
        raise TypeError(f'a 1-d array {query.shape} looks like an embedding: use Searcher.search_vectors for '
                        f'vectors; images are (H, W) or (H, W, C) uint8 arrays')
    if isinstance(query, (os.PathLike, bytes, bytearray, np.ndarray)) or hasattr(query, 'convert'):
        return 'image'
    raise TypeError(f'query of type {type(query).__name__}: use a str (text, image path or URL), a PIL image, '
                    f'image bytes or an (H, W, C) uint8 array')


class Searcher:
    """An :class:`Index` with the model that made it: search by text or image.

    Make one with :meth:`open`, which loads the model recorded in the index.
    """

    def __init__(self, index: Index, model: 'CNClip') -> None:
        index.check_model(model.fingerprint, model.source)
        if model.config.embed_dim != index.dim:
            raise ValueError(f'model {model.source!r} makes {model.config.embed_dim}-d embeddings, the index holds '
                             f'{index.dim}-d vectors')
        self.index = index
        self.model = model

    @classmethod
    def open(cls, index_path: str | os.PathLike, model: 'CNClip | str | os.PathLike | None' = None, *,
             device: str = 'cpu', precision: Precision | None = None, backend: Backend | None = None
             ) -> 'Searcher':
        """Load an index dir and the model to embed queries with.

        Args:
            index_path: an index dir (``cnclip index build``).
            model: ``None`` loads the model the index records; a :class:`~modelscope_cnclip.CNClip` or a source
                to load must be that same model (same fingerprint), e.g. the same weights moved elsewhere.
            device, precision, backend: for loading the model (see :func:`modelscope_cnclip.load`); e.g. an index
                built with the torch model is searched with its ONNX export (the same fingerprint).
        """
        from modelscope_cnclip.inference import CNClip, load
        index = Index.load(index_path)
        if model is None:
            source = index.model.get('source')
            if not source:
                raise ValueError(f'{index_path}: the index records no model; pass the model that made its '
                                 f'embeddings (model= / --model)')
            try:
                model = load(source, device=device, precision=precision, backend=backend)
            except (OSError, ValueError) as e:
                error = OSError if isinstance(e, OSError) else ValueError
                raise error(f'{index_path}: cannot load the model the index was built with ({source}): {e}; pass '
                            f'its current location with model= / --model') from None
        elif not isinstance(model, CNClip):
            model = load(model, device=device, precision=precision, backend=backend)
        return cls(index, model)

    def embed(self, query: Any, kind: str | None = None) -> np.ndarray:
        """The ``(D,)`` float32 embedding of a text or image query (``kind`` forces ``'text'`` or ``'image'``)."""
        if kind is None:
            kind = query_kind(query)
        elif kind not in QUERY_KINDS:
            raise ValueError(f'kind={kind!r}: use one of {list(QUERY_KINDS)} or None (guess from the query)')
        if kind == 'text':
            if not isinstance(query, str):
                raise TypeError(f'a text query must be a str, got {type(query).__name__}')
            vec = self.model.encode_text([query])
        else:
            vec = self.model.encode_image([query])
        return vec[0].float().cpu().numpy()

    def search(self, query: Any, k: int = 10, kind: str | None = None) -> list[Hit]:
        """The ``k`` best entries for one query: a text, or an image (file path, http(s) URL, PIL image, bytes,
        pixel array). A str is an image when it names an existing file or is a URL; ``kind`` forces it."""
        return self.index.search(self.embed(query, kind), k)[0]

    def search_vectors(self, vector: np.ndarray, k: int = 10) -> list[Hit]:
        """The ``k`` best entries for one query embedding ``(D,)`` (use ``.index.search`` for a batch)."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.ndim == 2 and vector.shape[0] == 1:
            vector = vector[0]
        if vector.ndim != 1:
            raise ValueError(f'one query vector ({self.index.dim},) expected, got shape {vector.shape}; '
                             f'search a batch with searcher.index.search')
        return self.index.search(vector, k)[0]
