"""Embedding jobs: a whole collection -> an embeddings dir (:mod:`modelscope_cnclip.embeddings`), resumable.

    report = embed_collection('damo/multi-modal_clip-vit-base-patch16_zh', 'photos/', 'photos.emb')

The job splits the collection into shards of ``shard_size`` inputs and writes each shard atomically, so an
interrupted job rerun with the same arguments skips the shards on disk and finishes the rest. Images are decoded and
resized in a thread pool ahead of the model. Inputs that cannot be read are listed in ``errors.jsonl`` with the
reason (and in the report), never dropped silently. ``engine='ray'`` spreads the shards over a Ray cluster, with
the same output.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import modelscope_cnclip.jobs.ray_engine as ray_engine
from modelscope_cnclip.config import ENGINES, Backend, Engine, Modality, Precision
from modelscope_cnclip.embeddings import (
    ERRORS,
    META,
    SHARDS,
    existing_shards,
    ids_digest,
    iter_shards,
    read_meta,
    read_shard,
    shard_path,
    write_meta,
)
from modelscope_cnclip.inference import CNClip, load
from modelscope_cnclip.jobs.collection import Collection, open_collection
from modelscope_cnclip.jobs.ray_engine import RayOptions
from modelscope_cnclip.jobs.shards import ShardSettings, embed_shard, shard_items
from modelscope_cnclip.utils import atomic_write_bytes, default_threads
from modelscope_cnclip.video import FrameSampling

__all__ = ['EmbedReport', 'embed_collection', 'auto_batch_size', 'ENGINES']

logger = logging.getLogger(__name__)

DEFAULT_SETTINGS = ShardSettings()
DEFAULT_RAY = RayOptions()


@dataclass
class EmbedReport:
    """What a job did: counts, where the output and the error list are, and how long it took."""

    out: str
    modality: str
    total: int
    embedded: int
    failed: int
    shards: int
    shards_resumed: int
    seconds: float
    errors_file: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def auto_batch_size(model: CNClip, modality: str) -> int:
    """A batch size that keeps the device busy without exhausting memory: on GPUs a starting point that
    :func:`embed_items` halves on out-of-memory; on CPUs a size past which throughput no longer grows."""
    if model.device.type == 'cuda':
        return 512 if modality == 'text' else 256
    return 64 if modality == 'text' else 16


# --- the job ------------------------------------------------------------------------------------------------------

def _prepare_out(out: Path, meta: dict[str, Any], overwrite: bool) -> list[int]:
    """Create or check ``out`` (not a file: :func:`_job_lock` checked); returns the shards already written by an
    earlier run of the same job."""
    if (out / META).is_file():
        old = read_meta(out)
        if overwrite:
            shutil.rmtree(out / SHARDS, ignore_errors=True)
            (out / ERRORS).unlink(missing_ok=True)
            (out / META).unlink()
        else:
            _check_same_job(out, old, meta)
            return existing_shards(out)
    elif out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise FileExistsError(f'--out {out}: the folder is not empty and is not an embeddings dir; '
                              f'choose a new or empty folder')
    out.mkdir(parents=True, exist_ok=True)
    return []


def _vector_options(model: CNClip, modality: str, sampling: FrameSampling) -> dict[str, Any]:
    """Every option besides the model and the inputs that changes the vectors: recorded in ``meta.json`` and
    compared when a job is rerun, so a resumed job is never a mix."""
    options: dict[str, Any] = {'precision': model.precision}
    if model.backend != 'torch':  # (torch jobs of earlier versions recorded no backend)
        options['backend'] = model.backend
    if modality == 'image':
        options['fast_decode'] = model.transform.fast_decode
    if modality == 'video':
        options['video'] = sampling.recorded()
    return options


def _flat(options: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[prefix + key] = value
    return out


def _check_same_job(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    checks = [('inputs', old.get('input', {}).get('digest'), new['input']['digest']),
              # the texts or paths behind the ids (dirs of earlier versions recorded the ids only)
              ('inputs', old.get('input', {}).get('sources_digest', new['input']['sources_digest']),
               new['input']['sources_digest']),
              ('model', old.get('model', {}).get('fingerprint'), new['model']['fingerprint']),
              ('precision', old.get('model', {}).get('precision'), new['model']['precision']),
              ('modality', old.get('modality'), new['modality']),
              ('shard size', old.get('shard_size'), new['shard_size'])]
    if 'options' in old:  # dirs written before options were recorded have none to compare
        before, now = _flat(old['options']), _flat(new['options'])
        checks += [(f'option {key}', before.get(key), now.get(key)) for key in sorted(set(before) | set(now))]
    for what, a, b in checks:
        if a != b:
            raise ValueError(f'{out} holds embeddings of another job (its {what} differs: {a!r} there, {b!r} now); '
                             f'rerun with the same arguments to resume it, pass overwrite=True (CLI: --overwrite) '
                             f'to replace it, or choose another output folder')


def _finish(out: Path, meta: dict[str, Any]) -> tuple[int, int]:
    """Write ``errors.jsonl`` and the final meta from the shards on disk (their ids and failures; the vectors are
    not read); returns (embedded, failed)."""
    embedded, failures = 0, []
    for _, (ids, _sources, _vectors, failed) in iter_shards(out, vectors=False):
        embedded += len(ids)
        failures += failed
    lines = ''.join(json.dumps(f, ensure_ascii=False) + '\n' for f in failures)
    atomic_write_bytes(out / ERRORS, lines.encode('utf-8'))
    write_meta(out, {**meta, 'complete': True, 'embedded': embedded, 'failed': len(failures)})
    return embedded, len(failures)


def _readable(out: Path, k: int) -> bool:
    """A shard written by an earlier run is resumed only if it still reads (a damaged disk or a hand-edited file
    is recomputed, with a warning, not trusted)."""
    try:
        read_shard(shard_path(out, k), vectors=True)
        return True
    except ValueError as e:
        logger.warning('%s; recomputing it', e)
        shard_path(out, k).unlink(missing_ok=True)
        return False


def embed_collection(model: CNClip | str | os.PathLike, inputs: str | os.PathLike | Collection,
                     out: str | os.PathLike, *, modality: Modality = 'auto', split: str | None = None,
                     columns: Mapping[str, str] | None = None, root: str | os.PathLike | None = None,
                     settings: ShardSettings = DEFAULT_SETTINGS, engine: Engine = 'local',
                     ray: RayOptions = DEFAULT_RAY, overwrite: bool = False, progress: bool | None = None,
                     device: str = 'cpu', precision: Precision | None = None, fast_decode: bool = False,
                     backend: Backend | None = None) -> EmbedReport:
    """Embed a whole collection into the embeddings dir ``out``, resuming an interrupted run of the same job.

    Args:
        model: a loaded :class:`CNClip` or anything :func:`modelscope_cnclip.load` takes, an exported dir too
            (loaded with ``device``, ``precision``, ``fast_decode``, ``backend``).
        inputs: anything :func:`~modelscope_cnclip.jobs.collection.open_collection` opens (with ``modality``,
            ``split``, ``columns``, ``root``), or an opened :class:`Collection`.
        settings: shard size, batch size, decoding threads and the frame sampling of videos
            (:class:`~modelscope_cnclip.jobs.shards.ShardSettings`).
        engine: ``'local'``, or ``'ray'`` as ``ray`` says (:class:`~modelscope_cnclip.jobs.ray_engine.RayOptions`;
            every worker must see ``out`` and the inputs, e.g. a shared filesystem).
        overwrite: replace an existing embeddings dir of another job instead of refusing.
        progress: show a progress bar (default: when stderr is a terminal).
    Returns:
        An :class:`EmbedReport`; failed inputs are in ``out/errors.jsonl``.
    Raises:
        ValueError: an invalid option (the settings are validated when made, so before anything is read, loaded or
            started, under every engine), or an ``out`` holding another job: other inputs, model, modality, shard
            size, or option that changes the vectors (``meta.json``'s ``options``: precision, ``fast_decode`` for
            images, the frame sampling for videos); ``overwrite=True`` recomputes instead.
    """
    if engine not in ENGINES:
        raise ValueError(f'engine={engine!r}: choose one of {list(ENGINES)}')
    started = time.perf_counter()
    coll = inputs if isinstance(inputs, Collection) else \
        open_collection(inputs, modality, split=split, columns=columns, root=root)
    if not isinstance(model, CNClip):
        model = load(model, device=device, precision=precision, fast_decode=fast_decode, backend=backend)
    out = Path(out)
    num_shards = -(-len(coll) // settings.shard_size)
    meta = {'model': model.info(), 'modality': coll.modality,
            'options': _vector_options(model, coll.modality, settings.sampling),
            'input': {**coll.describe(), 'digest': ids_digest([i.id for i in coll.items]),
                      'sources_digest': ids_digest([f'{i.id}\0{i.source}' for i in coll.items])},
            'shard_size': settings.shard_size, 'num_shards': num_shards, 'dtype': 'float32', 'normalized': True,
            'complete': False}
    with _job_lock(out):
        return _run_job(model, coll, out, meta, num_shards, overwrite, settings, engine, ray, progress, started)


LOCK = '.cnclip-job.lock'


@contextmanager
def _job_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for the whole job (a lock file in it), so a second job writing into the
    same folder at the same time is refused instead of mixing its shards in. The lock file stays in ``out``
    (removing it would let a third job lock a new file while the second still holds the old one)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f'--out {out}: a file is in the way; choose a folder path')
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, 'w') as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f'{out}: another embedding job is writing into it right now; wait for it to finish or '
                             f'choose another output folder') from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_job(model: CNClip, coll: Collection, out: Path, meta: dict[str, Any], num_shards: int, overwrite: bool,
             settings: ShardSettings, engine: str, ray: RayOptions, progress: bool | None,
             started: float) -> EmbedReport:
    resumed = [k for k in _prepare_out(out, meta, overwrite) if k < num_shards and _readable(out, k)]
    write_meta(out, meta)
    written = set(resumed)
    todo = [k for k in range(num_shards) if k not in written]
    if resumed:
        logger.info('%s: %d of %d shards already written; embedding the other %d', out, len(resumed), num_shards,
                    len(todo))
    size = settings.batch_size or auto_batch_size(model, coll.modality)
    if todo and engine == 'ray':
        ray_engine.run_ray(model, coll, out, todo, settings, size, ray)
    elif todo:
        _run_local(model, coll, out, todo, settings, size, progress)
    embedded, failed = _finish(out, meta)
    report = EmbedReport(str(out), coll.modality, len(coll), embedded, failed, num_shards, len(resumed),
                         round(time.perf_counter() - started, 3), str(out / ERRORS))
    if failed:
        logger.warning('%d of %d inputs could not be embedded; see %s', failed, len(coll), out / ERRORS)
    return report


def _progress_bar(total: int, initial: int, enabled: bool | None) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with ModelScope; without it, log per shard
        return None
    disable = not (enabled if enabled is not None else os.isatty(2))
    return tqdm(total=total, initial=initial, unit='input', desc='embedding', disable=disable)


def _run_local(model: CNClip, coll: Collection, out: Path, todo: list[int], settings: ShardSettings, batch_size: int,
               progress: bool | None) -> None:
    threads = settings.num_threads or default_threads()
    remaining = sum(len(shard_items(coll, k, settings.shard_size)) for k in todo)
    bar = _progress_bar(len(coll), len(coll) - remaining, progress)
    size = [batch_size]
    pool = ThreadPoolExecutor(threads, thread_name_prefix='cnclip-embed') if threads > 1 else None
    try:
        for k in todo:
            n, bad = embed_shard(model, coll, out, k, settings, size, pool=pool,
                                 progress=bar.update if bar else None)
            logger.debug('%s: shard %d written (%d embedded, %d failed)', out, k, n, bad)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
