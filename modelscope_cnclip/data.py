"""Image-text data in the official Chinese-CLIP format, and a generated dataset with known answers.

Official format, per split: ``{split}_imgs.tsv`` (``image_id<TAB>base64 image`` per line) and
``{split}_texts.jsonl`` (``{"text_id", "text", "image_ids": [...]}`` per line). Images are indexed by file offset
and decoded on demand, so a large split costs no memory up front.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw

__all__ = ['TextRecord', 'OfficialSplit', 'open_split', 'parse_id', 'read_jsonl', 'read_texts_jsonl',
           'write_official_split', 'make_synthetic_split', 'LmdbSplit', 'write_lmdb_split']

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextRecord:
    text_id: int | str
    text: str
    image_ids: tuple


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of each non-blank line of a jsonl file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found')
    out = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}:{n}: not a JSON object ({e})') from None
    return out


def read_texts_jsonl(path: str | Path) -> list[TextRecord]:
    """Read ``{split}_texts.jsonl``; errors name the file and line."""
    records = []
    for n, obj in read_jsonl(path):
        try:
            rec = TextRecord(obj['text_id'], obj['text'], tuple(obj.get('image_ids', ())))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f'{path}:{n}: expected {{"text_id", "text", "image_ids"}} JSON ({e!r})') from None
        if not isinstance(rec.text, str):
            raise ValueError(f'{path}:{n}: "text" must be a string')
        records.append(rec)
    return records


class OfficialSplit:
    """One split of an official-format dataset dir: its texts and lazily decoded images.

    Args:
        data_dir: folder with ``{split}_imgs.tsv`` and ``{split}_texts.jsonl``.
        split: ``'train'``, ``'valid'``, ``'test'``, ...
    """

    def __init__(self, data_dir: str | Path, split: str) -> None:
        d = Path(data_dir)
        self.imgs_path, texts_path = d / f'{split}_imgs.tsv', d / f'{split}_texts.jsonl'
        missing = [p.name for p in (self.imgs_path, texts_path) if not p.is_file()]
        if missing:
            found = sorted(p.name for p in d.iterdir()) if d.is_dir() else 'no such directory'
            raise FileNotFoundError(f'{d}: split {split!r} needs {missing} (official Chinese-CLIP format); '
                                    f'found {found}')
        self.texts = read_texts_jsonl(texts_path)
        self._offsets: dict = {}
        with open(self.imgs_path, 'rb') as f:
            offset = 0
            for n, line in enumerate(f, 1):
                key, sep, _ = line.partition(b'\t')
                if not sep:
                    raise ValueError(f'{self.imgs_path}:{n}: expected "image_id<TAB>base64"')
                image_id = parse_id(key.decode('utf-8').strip())
                self._offsets[image_id] = offset
                offset += len(line)
        unknown = sorted({i for t in self.texts for i in t.image_ids if i not in self._offsets}, key=str)
        if unknown:
            raise ValueError(f'{texts_path}: image ids {unknown[:5]} are not in {self.imgs_path.name}')

    @property
    def image_ids(self) -> list:
        return list(self._offsets)

    def image_bytes(self, image_id: int | str) -> bytes:
        """The encoded image of ``image_id``."""
        with open(self.imgs_path, 'rb') as f:
            f.seek(self._offsets[image_id])
            _, _, b64 = f.readline().partition(b'\t')
        try:
            return base64.urlsafe_b64decode(b64.strip()) if b'-' in b64 or b'_' in b64 else base64.b64decode(b64)
        except binascii.Error as e:
            raise ValueError(f'{self.imgs_path}: image {image_id!r} is not valid base64 ({e})') from None

    def pairs(self) -> Iterator[tuple[int | str, str, int | str]]:
        """Every (text_id, text, image_id) pair, the unit of contrastive training."""
        for t in self.texts:
            for image_id in t.image_ids:
                yield t.text_id, t.text, image_id


def parse_id(raw: str) -> int | str:
    """An image id as the official tools key it: an int when all digits, else the string."""
    return int(raw) if raw.isdigit() else raw


def write_official_split(data_dir: str | Path, split: str, images: dict, texts: list[TextRecord]) -> None:
    """Write ``{split}_imgs.tsv`` (images as PIL images or encoded bytes) and ``{split}_texts.jsonl``."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f'{split}_imgs.tsv', 'w', encoding='utf-8') as f:
        for image_id, img in images.items():
            if isinstance(img, Image.Image):
                buf = io.BytesIO()
                img.save(buf, format='JPEG', quality=90)
                img = buf.getvalue()
            f.write(f'{image_id}\t{base64.urlsafe_b64encode(img).decode("ascii")}\n')
    with open(d / f'{split}_texts.jsonl', 'w', encoding='utf-8') as f:
        for t in texts:
            f.write(json.dumps({'text_id': t.text_id, 'text': t.text, 'image_ids': list(t.image_ids)},
                               ensure_ascii=False) + '\n')


# --- the official LMDB form (cn_clip's build_lmdb_dataset.py) ---------------------------------------------------

class _NoGlobalsUnpickler(pickle.Unpickler):
    """The pairs DB stores pickled ``(image_id, text_id, text)`` tuples; refuse anything that is not plain data."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f'refusing to load {module}.{name} from an LMDB pair: only plain tuples of '
                                     f'ids and text are expected')


def _unpickle_pair(raw: bytes, where: str) -> tuple:
    try:
        pair = _NoGlobalsUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f'{where}: not an (image_id, text_id, text) pair ({e})') from None
    if not (isinstance(pair, tuple) and len(pair) == 3 and isinstance(pair[2], str)):
        raise ValueError(f'{where}: expected (image_id, text_id, text), got {type(pair).__name__}')
    return pair


_LMDB_ENVS: dict = {}


def _lmdb_env(path: Path) -> Any:
    """One read-only environment per database and process (lmdb forbids opening one twice in a process, and an
    environment must not cross a fork into DataLoader workers)."""
    import lmdb
    key = (str(path.resolve()), os.getpid())
    if key not in _LMDB_ENVS:
        _LMDB_ENVS[key] = lmdb.open(str(path), readonly=True, create=False, lock=False, readahead=False,
                                    meminit=False)
    return _LMDB_ENVS[key]


class LmdbSplit:
    """One split of the official LMDB form: ``{lmdb_dir}/{split}/imgs`` (image id -> base64) and
    ``{lmdb_dir}/{split}/pairs`` (index -> ``(image_id, text_id, text)``, plus ``num_samples``). Needs ``lmdb``
    (``pip install modelscope_cnclip[train]``)."""

    def __init__(self, lmdb_dir: str | Path, split: str) -> None:
        try:
            import lmdb  # noqa: F401
        except ImportError:
            raise ImportError('reading the LMDB form needs the lmdb package: pip install "modelscope_cnclip[train]"'
                              ) from None
        d = Path(lmdb_dir) / split
        if not (d / 'imgs').is_dir() or not (d / 'pairs').is_dir():
            raise FileNotFoundError(f'{d}: expected LMDB databases imgs/ and pairs/ (official Chinese-CLIP LMDB form)')
        self._imgs_path = d / 'imgs'
        with _lmdb_env(d / 'pairs').begin() as txn:
            n = int(txn.get(b'num_samples').decode())
            self.pairs_list = [_unpickle_pair(txn.get(str(i).encode()), f'{d}/pairs[{i}]') for i in range(n)]

    @property
    def image_ids(self) -> list:
        """Every image id in the imgs database, in key order (the ``num_images`` count key left out)."""
        with _lmdb_env(self._imgs_path).begin() as txn:
            keys = [k.decode('utf-8') for k in txn.cursor().iternext(keys=True, values=False)]
        return [parse_id(k) for k in keys if k != 'num_images']

    def image_bytes(self, image_id: int | str) -> bytes:
        with _lmdb_env(self._imgs_path).begin() as txn:
            raw = txn.get(str(image_id).encode())
        if raw is None:
            raise ValueError(f'image {image_id!r} is not in the LMDB imgs database')
        return base64.urlsafe_b64decode(raw)

    def pairs(self) -> Iterator[tuple[int | str, str, int | str]]:
        """Every (text_id, text, image_id) pair, like :meth:`OfficialSplit.pairs`."""
        for image_id, text_id, text in self.pairs_list:
            yield text_id, text, image_id

    @property
    def texts(self) -> list[TextRecord]:
        """The split's texts with all their images, in order of first appearance (like the jsonl's records)."""
        grouped: dict = {}
        for image_id, text_id, text in self.pairs_list:
            grouped.setdefault(text_id, (text, []))[1].append(image_id)
        return [TextRecord(t, text, tuple(dict.fromkeys(ids))) for t, (text, ids) in grouped.items()]


def open_split(data_dir: str | Path, split: str) -> OfficialSplit | LmdbSplit:
    """The ``split`` of an official-format dir: ``{split}_imgs.tsv`` + ``{split}_texts.jsonl``, or the LMDB form
    ``{split}/imgs`` + ``{split}/pairs``."""
    d = Path(data_dir)
    if (d / split / 'imgs').is_dir() and (d / split / 'pairs').is_dir() and not (d / f'{split}_imgs.tsv').is_file():
        return LmdbSplit(d, split)
    return OfficialSplit(d, split)


def write_lmdb_split(split: OfficialSplit, lmdb_dir: str | Path, name: str) -> None:
    """Pack an official tsv + jsonl split into the LMDB form (as cn_clip's build_lmdb_dataset.py does)."""
    import lmdb
    d = Path(lmdb_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    with lmdb.open(str(d / 'imgs'), map_size=1 << 36) as env, env.begin(write=True) as txn:
        for image_id in split.image_ids:
            txn.put(str(image_id).encode(), base64.urlsafe_b64encode(split.image_bytes(image_id)))
        txn.put(b'num_images', str(len(split.image_ids)).encode())
    with lmdb.open(str(d / 'pairs'), map_size=1 << 32) as env, env.begin(write=True) as txn:
        n = 0
        for text_id, text, image_id in split.pairs():
            txn.put(str(n).encode(), pickle.dumps((image_id, text_id, text)))
            n += 1
        txn.put(b'num_samples', str(n).encode())


# --- a generated dataset with known answers ------------------------------------------------------------------------

COLORS = {'红色': (220, 40, 40), '绿色': (40, 170, 60), '蓝色': (40, 70, 220), '黄色': (235, 200, 30),
          '紫色': (140, 50, 170), '黑色': (20, 20, 20)}
SHAPES = ('圆形', '正方形', '三角形')
PLACES = {'左边': 0.28, '右边': 0.72}


def _draw(color: tuple, shape: str, x: float, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new('RGB', (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.16, 0.22)
    cx, cy = x * size + rng.uniform(-4, 4), size * rng.uniform(0.4, 0.6)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == '圆形':
        draw.ellipse(box, fill=color)
    elif shape == '正方形':
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def make_synthetic_split(data_dir: str | Path, split: str, n_images: int, seed: int = 0,
                         size: int = 64, unique: bool = False) -> OfficialSplit:
    """Generate images of one coloured shape on the left or right, captioned in Chinese
    ("左边有一个红色的圆形"), in the official format. The caption fully describes the image, so retrieval has
    known answers; there are 6 x 3 x 2 = 36 distinct scenes. With ``unique`` every image is a different scene
    (at most 36), so no two pairs tie."""
    rng = random.Random(seed)
    scenes = [(c, s, p) for c in COLORS for s in SHAPES for p in PLACES]
    if unique:
        if n_images > len(scenes):
            raise ValueError(f'unique=True allows at most {len(scenes)} images, got n_images={n_images}')
        rng.shuffle(scenes)
    images, texts = {}, []
    templates = ('{place}有一个{color}的{shape}', '一个{color}{shape}在{place}', '{color}的{shape}，位于{place}')
    for i in range(n_images):
        color, shape, place = scenes[i] if unique else rng.choice(scenes)
        image_id = 1000 + i
        images[image_id] = _draw(COLORS[color], shape, PLACES[place], size, rng)
        text = rng.choice(templates).format(place=place, color=color, shape=shape)
        texts.append(TextRecord(i, text, (image_id,)))
    write_official_split(data_dir, split, images, texts)
    logger.info('wrote %d generated images to %s (%s split)', n_images, data_dir, split)
    return OfficialSplit(data_dir, split)
