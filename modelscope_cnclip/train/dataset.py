"""Training and evaluation pairs from every data source users have, as tensors for the model."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from modelscope_cnclip.data import LmdbSplit, OfficialSplit, open_split, read_jsonl, split_form
from modelscope_cnclip.tokenizer import Tokenizer
from modelscope_cnclip.transform import ImageTransform

__all__ = ['PairDataset', 'SplitImage', 'collate_pairs', 'read_pairs', 'EpochShuffleSampler']

logger = logging.getLogger(__name__)


class PairDataset(Dataset):
    """(image, text) pairs -> ``{'pixel_values': (3,R,R), 'input_ids': (L,)}``.

    Args:
        pairs: a list of ``(image, text, image_id)``, where ``image`` is anything :func:`load_image` reads (or a
            zero-argument callable returning it, for lazily read images).
        transform, tokenizer: the model's preprocessing.
        skip_errors: replace an unreadable image by the next readable pair (logged with its id) instead of
            raising. Never silent: ``skipped`` lists the ids.
    """

    def __init__(self, pairs: Sequence[tuple[Any, str, Any]], transform: ImageTransform, tokenizer: Tokenizer,
                 skip_errors: bool = False) -> None:
        self.pairs = list(pairs)
        self.transform, self.tokenizer, self.skip_errors = transform, tokenizer, skip_errors
        self.skipped: list = []

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(len(self.pairs)):
            image, text, image_id = self.pairs[(index + offset) % len(self.pairs)]
            try:
                pixels = self.transform(image() if callable(image) else image)
            except (OSError, ValueError, TypeError) as e:
                if not self.skip_errors:
                    raise ValueError(f'image {image_id!r}: {e}; pass skip_errors=True to skip such images') from None
                if image_id not in self.skipped:
                    self.skipped.append(image_id)
                    logger.warning('skipping unreadable image %r: %s', image_id, e)
                continue
            ids = self.tokenizer(text, padding='longest')['input_ids'][0]
            return {'pixel_values': pixels, 'input_ids': ids}
        raise ValueError('no readable image in the dataset')


def collate_pairs(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack pixels; pad token ids to the longest text of the batch with [PAD]=0."""
    width = max(b['input_ids'].shape[0] for b in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, :b['input_ids'].shape[0]] = b['input_ids']
    return {'pixel_values': torch.stack([b['pixel_values'] for b in batch]), 'input_ids': ids}


@dataclass(frozen=True)
class SplitImage:
    """One image of an official split, read when called: ``SplitImage(split, image_id)()`` -> encoded bytes.

    A picklable object rather than a closure, so DataLoader workers started with ``spawn`` (macOS, Windows) or
    ``forkserver`` (Python 3.14's Linux default) receive the dataset.
    """

    split: OfficialSplit | LmdbSplit
    image_id: Any

    def __call__(self) -> bytes:
        return self.split.image_bytes(self.image_id)


def _official_pairs(split: OfficialSplit | LmdbSplit) -> list[tuple[SplitImage, str, Any]]:
    return [(SplitImage(split, image_id), text, image_id) for _, text, image_id in split.pairs()]


def _jsonl_pairs(path: Path) -> list[tuple[Any, str, Any]]:
    pairs = []
    for n, obj in read_jsonl(path):  # the one jsonl reader: BOM and CRLF as Windows tools write them
        if not isinstance(obj, dict) or 'image' not in obj or 'text' not in obj:
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f'{path}:{n}: expected {{"image": path, "text": ...}}, got {got}')
        image, text = obj['image'], obj['text']
        if isinstance(image, str) and not image.startswith(('http://', 'https://')) and not Path(image).is_absolute():
            image = str(path.parent / image)  # relative to the jsonl's folder
        pairs.append((image, text, obj.get('id', image)))
    return pairs


def read_pairs(data: Any, split: str = 'train', column_map: Mapping[str, str] | None = None) -> list[tuple]:
    """Pairs from an official-format dir (``{split}_imgs.tsv`` + ``{split}_texts.jsonl``, or its LMDB form
    ``{split}/imgs`` + ``{split}/pairs``), a jsonl of
    ``{"image": path, "text": ...}`` lines, or rows (dicts; an ``MsDataset``) with the ``column_map`` columns."""
    columns = {'img': 'img', 'text': 'text', **(column_map or {})}
    if isinstance(data, (str, Path)):
        path = Path(data)
        if split_form(path, split) is not None:
            return _official_pairs(open_split(path, split))
        if path.is_file() and path.suffix == '.jsonl':
            return _jsonl_pairs(path)
        if path.is_dir() and (path / f'{split}.jsonl').is_file():
            return _jsonl_pairs(path / f'{split}.jsonl')
        raise FileNotFoundError(f'{data}: expected an official-format dir ({split}_imgs.tsv + {split}_texts.jsonl),'
                                f' a dir with {split}.jsonl, or a .jsonl file of {{"image", "text"}} lines')
    if isinstance(data, (OfficialSplit, LmdbSplit)):
        return _official_pairs(data)
    pairs = []
    for n, row in enumerate(data):
        if columns['img'] not in row or columns['text'] not in row:
            raise KeyError(f'row {n} has columns {sorted(row)}; set dataset.column_map so that "img" and "text" '
                           f'name the image and caption columns (now {columns})')
        pairs.append((row[columns['img']], row[columns['text']], row.get('id', n)))
    return pairs


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)`` (never on the global RNG), sharded over ranks.

    So a run resumed at epoch ``e`` sees exactly the order an uninterrupted run would, and every rank of a DDP
    job draws a disjoint share (the order is padded to a multiple of the world size, as DistributedSampler does).
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        order = order.tolist()
        order += order[:(-len(order)) % self.world_size]  # pad so every rank gets as many
        return iter(order[self.rank::self.world_size])

    def __len__(self) -> int:
        return -(-self.size // self.world_size)
