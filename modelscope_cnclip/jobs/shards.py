"""One shard of an embedding job: read and decode its inputs ahead of the model (threads), embed them in batches
(halved on CUDA out-of-memory), and write the shard atomically with its failures. The local engine
(:mod:`.run`), the Ray engine (:mod:`.ray_engine`) and the evaluation's image stream all use these."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from modelscope_cnclip.config import DEFAULT_SHARD_SIZE
from modelscope_cnclip.embeddings import write_shard
from modelscope_cnclip.inference import CNClip
from modelscope_cnclip.jobs.collection import Collection, Item
from modelscope_cnclip.utils import map_ahead
from modelscope_cnclip.video import DEFAULT_SAMPLING, FrameSampling

__all__ = ['ShardSettings', 'embed_items', 'shard_items', 'embed_shard', 'DEFAULT_SHARD_SIZE']

logger = logging.getLogger(__name__)
T = TypeVar('T')


def _whole(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f'{name}={value!r}: expected a whole number >= {low}')


@dataclass(frozen=True)
class ShardSettings:
    """How each shard of an embedding job is embedded, under every engine (validated on creation).

    Attributes:
        shard_size: inputs per output shard (the unit of resumption and of Ray tasks).
        batch_size: inputs per forward pass (``None``: a size that suits the device, see
            :func:`~modelscope_cnclip.jobs.run.auto_batch_size`; halved on CUDA out-of-memory).
        num_threads: input decoding threads (0: one per CPU, at most 8).
        sampling: the frames of video inputs (:class:`~modelscope_cnclip.video.FrameSampling`).
    Raises:
        ValueError: a size or count out of range (named).
    """

    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int | None = None
    num_threads: int = 0
    sampling: FrameSampling = field(default_factory=FrameSampling)

    def __post_init__(self) -> None:
        _whole('shard_size', self.shard_size, 1)
        if self.batch_size is not None:
            _whole('batch_size', self.batch_size, 1)
        _whole('num_threads', self.num_threads, 0)
        if not isinstance(self.sampling, FrameSampling):
            raise TypeError(f'sampling: expected a FrameSampling, got {type(self.sampling).__name__}')


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e)


def _with_backoff(fn: Callable[[Any, int], T], batch: Any, batch_size: list[int]) -> T:
    """``fn(batch, size)``, halving ``batch_size[0]`` (shared across calls) on CUDA out-of-memory errors."""
    while True:
        try:
            return fn(batch, batch_size[0])
        except RuntimeError as e:
            if not _is_oom(e) or batch_size[0] <= 1:
                raise
            torch.cuda.empty_cache()
            batch_size[0] //= 2
            logger.warning('CUDA out of memory: batch size lowered to %d', batch_size[0])


def _failure(item: Item, error: BaseException | str) -> dict[str, str]:
    reason = error if isinstance(error, str) else f'{type(error).__name__}: {error}'
    return {'id': item.id, 'source': item.source, 'error': reason}


def _decoded(model: CNClip, coll: Collection, items: Sequence[Item], pool: ThreadPoolExecutor | None,
             ahead: int) -> Iterator[tuple[Item, Any]]:
    """Yield ``(item, uint8 array | exception)`` in order, decoding up to ``ahead`` items ahead in ``pool``."""
    def load(item: Item) -> tuple[Item, Any]:
        try:
            return item, model.transform.load(coll.read(item))
        except Exception as e:  # any decoder failure is a per-input error, reported with its id
            return item, e
    return map_ahead(load, items, pool, ahead)


def embed_items(model: CNClip, coll: Collection, items: Sequence[Item], batch_size: int | list[int], *,
                pool: ThreadPoolExecutor | None = None, progress: Callable[[int], None] | None = None,
                sampling: FrameSampling = DEFAULT_SAMPLING) -> tuple[list[Item], np.ndarray, list[dict[str, str]]]:
    """Embed ``items`` of ``coll`` -> ``(embedded items, (n, D) float32 vectors, failures)``.

    ``batch_size`` may be a one-element list, shared between calls, that CUDA out-of-memory errors halve; images
    are decoded in ``pool`` ahead of the model; ``sampling`` picks the frames of videos.
    """
    size = batch_size if isinstance(batch_size, list) else [batch_size]
    if size[0] < 1:
        raise ValueError(f'batch_size={size[0]}: must be >= 1')
    step = progress or (lambda n: None)
    done: list[Item] = []
    failed: list[dict[str, str]] = []
    outs: list[torch.Tensor] = []
    if coll.modality == 'text':
        texts = [coll.read(i) for i in items]
        outs.append(_with_backoff(lambda b, s: model.encode_text(b, batch_size=s).cpu(), texts, size))
        done = list(items)
        step(len(items))
    elif coll.modality == 'video':
        from modelscope_cnclip.video import encode_videos
        vectors, errors = _with_backoff(
            lambda b, s: encode_videos(model, b, sampling, batch_size=s, skip_errors=True),
            [coll.read(i) for i in items], size)
        bad = {index: reason for index, _, reason in errors}
        done = [i for n, i in enumerate(items) if n not in bad]
        failed = [_failure(items[n], reason) for n, reason in sorted(bad.items())]
        outs.append(vectors.cpu())
        step(len(items))
    else:
        arrays: list[np.ndarray] = []
        batch_items: list[Item] = []

        def flush() -> None:
            pixels = model.transform.normalize(torch.from_numpy(np.stack(arrays)))
            outs.append(_with_backoff(lambda b, s: model.encode_image(b, batch_size=s).cpu(), pixels, size))
            done.extend(batch_items)
            step(len(batch_items))
            arrays.clear()
            batch_items.clear()

        for item, result in _decoded(model, coll, items, pool, ahead=3 * size[0]):
            if isinstance(result, BaseException):
                failed.append(_failure(item, result))
                logger.warning('cannot read %s (%s): %s', item.id, item.source, failed[-1]['error'])
                step(1)
                continue
            arrays.append(result)
            batch_items.append(item)
            if len(arrays) >= size[0]:
                flush()
        if arrays:
            flush()
    dim = model.config.embed_dim
    vectors = torch.cat(outs).float().numpy() if outs else np.zeros((0, dim), np.float32)
    return done, vectors.reshape(-1, dim), failed


def shard_items(coll: Collection, k: int, shard_size: int) -> list[Item]:
    return coll.items[k * shard_size:(k + 1) * shard_size]


def embed_shard(model: CNClip, coll: Collection, out: Path, k: int, settings: ShardSettings, batch_size: list[int],
                *, pool: ThreadPoolExecutor | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Embed shard ``k`` and write it; returns (embedded, failed). ``batch_size`` is the shared one-element list
    (see :func:`embed_items`)."""
    done, vectors, failed = embed_items(model, coll, shard_items(coll, k, settings.shard_size), batch_size,
                                        pool=pool, progress=progress, sampling=settings.sampling)
    write_shard(out, k, [i.id for i in done], [i.source for i in done], vectors, failed)
    return len(done), len(failed)
