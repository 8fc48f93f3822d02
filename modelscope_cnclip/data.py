"""Image-text data in the official Chinese-CLIP format, and a generated dataset with known answers.

Official format, per split: ``{split}_imgs.tsv`` (``image_id<TAB>base64 image`` per line) and
``{split}_texts.jsonl`` (``{"text_id", "text", "image_ids": [...]}`` per line). Images are indexed by file offset
and decoded on demand, so a large split costs no memory up front.

Ids are compared as the official code compares them: as strings (``"{}".format(id)`` in its LMDB build and its
dataset look-ups), so a jsonl id ``"1000"`` names the tsv image ``1000``. Inside, every id has one canonical form
(:func:`canonical_id`: ``1000`` for both). Files saved by Windows tools (a UTF-8 byte-order mark, ``\\r\\n`` line
ends) are read as the official tools read them; ids that still do not match are reported with the reason.
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
import re
from dataclasses import dataclass
from decimal import Decimal
from itertools import islice
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

from PIL import Image, ImageDraw

__all__ = ['TextRecord', 'OfficialSplit', 'open_split', 'split_form', 'split_forms', 'parse_id', 'id_key',
           'canonical_id', 'read_jsonl', 'read_texts_jsonl', 'write_official_split', 'make_synthetic_split',
           'draw_scene', 'LmdbSplit', 'write_lmdb_split']

logger = logging.getLogger(__name__)

BOM = '\ufeff'
_NUMBER = re.compile(r'[+-]?\d+(\.\d*)?')


@dataclass(frozen=True)
class TextRecord:
    """One line of ``{split}_texts.jsonl``, its ids in canonical form (:func:`canonical_id`)."""

    text_id: int | str
    text: str
    image_ids: tuple


# --- ids as the official tools compare them ----------------------------------------------------------------------

def id_key(value: Any) -> str:
    """The string an id is looked up by in the official tools (``"{}".format(id)``): ``1000`` and ``"1000"``
    are the same image, ``1000.0`` and ``"01000"`` are not."""
    return '{}'.format(value)


def parse_id(raw: str) -> int | str:
    """An id read as text (a tsv or LMDB key): an int when the text is an int's own decimal form (``"1000"``),
    else the text itself (``"01000"``, ``"1000.0"``, ``"a7"``), so that ``id_key(parse_id(s)) == s``."""
    return int(raw) if raw.isascii() and raw.isdigit() and (raw == '0' or raw[0] != '0') else raw


def canonical_id(value: Any, where: str = 'id') -> int | str:
    """An id from a JSON or pickled value in the one form used inside: ``parse_id(id_key(value))`` (``"1000"``
    and ``1000`` -> ``1000``; ``1000.0`` -> ``"1000.0"``, which matches no image ``1000``, as in the official code).

    Raises:
        ValueError: ``value`` is not an int, a string or a float (``where`` names the file and line).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise ValueError(f'{where}: id {value!r} must be an integer or a string')
    return parse_id(id_key(value))


def _plain(key: str) -> str:
    return key.replace(BOM, '').strip()


def _number(key: str) -> Decimal | None:
    text = _plain(key)
    return Decimal(text) if _NUMBER.fullmatch(text) else None


def _mismatch_cause(key: str, plain: Mapping[str, str], numbers: Mapping[Decimal, str]) -> tuple[str, str | None]:
    """Why the id ``key`` is not among the keys: ``(cause, the key it probably means)``."""
    near = plain.get(_plain(key))
    if near is not None:
        cause = 'a UTF-8 byte-order mark (BOM, U+FEFF) inside the id' if BOM in key + near else 'surrounding whitespace'
        return cause, near
    number = _number(key)
    near = numbers.get(number) if number is not None else None
    if near is not None:
        return ('a whole number written as a decimal' if '.' in key + near else 'leading zeros'), near
    return 'absent', None


def id_mismatch_error(where: str, missing: Sequence[Any], keys: Collection[str], images: str) -> ValueError:
    """The error for the image ids ``missing`` of ``where`` that ``images`` (with id ``keys``) lacks. It names the
    cause of each kind of mismatch (surrounding whitespace, a BOM, ``1000.0`` vs ``1000``, leading zeros, or
    simply absent) with a few examples of both sides."""
    plain = {_plain(k): k for k in keys}
    numbers = {n: k for k in keys if (n := _number(k)) is not None}
    by_cause: dict[str, list[tuple[Any, str | None]]] = {}
    for image_id in missing:
        cause, near = _mismatch_cause(id_key(image_id), plain, numbers)
        by_cause.setdefault(cause, []).append((image_id, near))
    parts = []
    for cause, found in by_cause.items():
        more = ', ...' if len(found) > 3 else ''
        if cause == 'absent':
            shown = ', '.join(repr(i) for i, _ in found[:3])
            parts.append(f'{len(found)} absent ({shown}{more}; {images} holds {len(keys)} ids such as '
                         f'{[parse_id(k) for k in islice(keys, 3)]})')
        else:
            shown = ', '.join(f'{i!r} vs {parse_id(k)!r} there' for i, k in found[:3])
            parts.append(f'{len(found)} differ only by {cause} ({shown}{more})')
    return ValueError(f'{where}: image ids {list(missing[:5])} are not in {images}: {"; ".join(parts)}. Ids are '
                      f'compared as strings, as the official tools do ("{{}}".format(id): 1000 and "1000" match; '
                      f'"01000", "1000.0" and " 1000" do not): write each id the same way in both files')


# --- the official tsv + jsonl form ---------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of each non-blank line of a jsonl file; errors name the file and line.

    Accepts what Windows tools write: a UTF-8 byte-order mark (also at the start of a later line, as in files
    joined with ``cat``) and ``\\r\\n`` line ends.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found')
    out = []
    with open(path, encoding='utf-8') as f:
        try:
            for n, line in enumerate(f, 1):
                line = line.lstrip(BOM)
                if not line.strip():
                    continue
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f'{path}:{n}: not a JSON object ({e})') from None
        except UnicodeDecodeError as e:
            raise ValueError(f'{path}: not UTF-8 text ({e}); save it as UTF-8') from None
    return out


def read_texts_jsonl(path: str | Path) -> list[TextRecord]:
    """Read ``{split}_texts.jsonl`` with canonical ids; a missing ``image_ids`` is ``[]`` (an unlabelled text, as
    in MUGE's test set). Errors name the file and line."""
    records = []
    for n, obj in read_jsonl(path):
        where = f'{path}:{n}'
        try:
            text_id, text, image_ids = obj['text_id'], obj['text'], obj.get('image_ids', [])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f'{where}: expected {{"text_id", "text", "image_ids"}} JSON ({e!r})') from None
        if not isinstance(text, str):
            raise ValueError(f'{where}: "text" must be a string')
        if not isinstance(image_ids, list):
            raise ValueError(f'{where}: "image_ids" must be a list of ids (e.g. [1000]), got {image_ids!r}')
        records.append(TextRecord(canonical_id(text_id, where), text,
                                  tuple(canonical_id(i, where) for i in image_ids)))
    return records


_UTF16_BOMS = (b'\xff\xfe', b'\xfe\xff')


def _index_tsv(path: Path) -> dict[str, int]:
    """``{image id: byte offset of its line}`` of an ``image_id<TAB>base64`` file. Ids lose a BOM and surrounding
    whitespace; blank lines are skipped; a repeated id keeps its last line (as the official LMDB build does)."""
    offsets: dict[str, int] = {}
    repeated = 0
    with open(path, 'rb') as f:
        offset = 0
        for n, line in enumerate(f, 1):
            if n == 1 and line[:2] in _UTF16_BOMS:
                raise ValueError(f'{path}: the file is UTF-16 (Windows "Unicode" text); save it as UTF-8')
            key, sep, _ = line.partition(b'\t')
            if sep:
                try:
                    image_id = key.decode('utf-8').lstrip(BOM).strip()
                except UnicodeDecodeError:
                    raise ValueError(f'{path}:{n}: image id {key[:40]!r} is not UTF-8 text; save the file as UTF-8'
                                     ) from None
                repeated += image_id in offsets
                offsets[image_id] = offset
            elif line.strip():
                raise ValueError(f'{path}:{n}: expected "image_id<TAB>base64"')
            offset += len(line)
    if repeated:
        logger.warning('%s: %d image ids appear on more than one line; the last line of each is used', path, repeated)
    return offsets


class OfficialSplit:
    """One split of an official-format dataset dir: its texts and lazily decoded images.

    Args:
        data_dir: folder with ``{split}_imgs.tsv`` and ``{split}_texts.jsonl``.
        split: ``'train'``, ``'valid'``, ``'test'``, ...
    Raises:
        FileNotFoundError: a file is missing. ValueError: a malformed line, or image ids of the texts that the tsv
            lacks, with the cause (whitespace, a BOM, ``1000.0``, leading zeros, or absent).
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
        self._offsets = _index_tsv(self.imgs_path)
        self._image_ids = [parse_id(k) for k in self._offsets]
        unknown = list(dict.fromkeys(i for t in self.texts for i in t.image_ids if id_key(i) not in self._offsets))
        if unknown:
            raise id_mismatch_error(str(texts_path), unknown, self._offsets.keys(), self.imgs_path.name)

    @property
    def image_ids(self) -> list:
        """Every image id of the tsv, in file order."""
        return list(self._image_ids)

    def image_bytes(self, image_id: int | str) -> bytes:
        """The encoded image of ``image_id`` (``1000`` or ``"1000"``).

        Raises:
            ValueError: no such image, or not valid base64.
        """
        offset = self._offsets.get(id_key(image_id))
        if offset is None:
            raise ValueError(f'{self.imgs_path}: no image {image_id!r}')
        with open(self.imgs_path, 'rb') as f:
            f.seek(offset)
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
    (``pip install modelscope_cnclip[train]``).

    Ids are compared as strings, as in :class:`OfficialSplit`. The form stores (image, text) pairs only: a text
    without images (an unlabelled test split) is not in it, so :attr:`texts` holds the labelled texts only.

    Raises:
        FileNotFoundError: a database is missing. ValueError: a malformed pair, or pairs naming images that the
            imgs database lacks (with the cause, as :class:`OfficialSplit` reports it).
    """

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
        with _lmdb_env(self._imgs_path).begin() as txn:
            raw_keys = [k for k in txn.cursor().iternext(keys=True, values=False) if k != b'num_images']
        # id -> the key as stored (one written from a tsv with a BOM keeps it)
        self._keys = {k.decode('utf-8', 'replace').lstrip(BOM).strip(): k for k in raw_keys}
        with _lmdb_env(d / 'pairs').begin() as txn:
            count = txn.get(b'num_samples')
            if count is None:
                raise ValueError(f'{d}/pairs: no num_samples key; is it an official Chinese-CLIP pairs database?')
            self.pairs_list = [self._pair(txn.get(str(i).encode()), f'{d}/pairs[{i}]') for i in range(int(count))]
        unknown = list(dict.fromkeys(i for i, _, _ in self.pairs_list if id_key(i) not in self._keys))
        if unknown:
            raise id_mismatch_error(f'{d}/pairs', unknown, self._keys.keys(), f'{d}/imgs')

    @staticmethod
    def _pair(raw: bytes | None, where: str) -> tuple[int | str, int | str, str]:
        if raw is None:
            raise ValueError(f'{where}: missing (num_samples counts more pairs than the database holds)')
        image_id, text_id, text = _unpickle_pair(raw, where)
        return canonical_id(image_id, where), canonical_id(text_id, where), text

    @property
    def image_ids(self) -> list:
        """Every image id in the imgs database, in key order (the ``num_images`` count key left out)."""
        return [parse_id(k) for k in self._keys]

    def image_bytes(self, image_id: int | str) -> bytes:
        """The encoded image of ``image_id`` (``1000`` or ``"1000"``).

        Raises:
            ValueError: no such image.
        """
        key = self._keys.get(id_key(image_id))
        with _lmdb_env(self._imgs_path).begin() as txn:
            raw = txn.get(key) if key is not None else None
        if raw is None:
            raise ValueError(f'image {image_id!r} is not in the LMDB imgs database {self._imgs_path}')
        return base64.urlsafe_b64decode(raw)

    def pairs(self) -> Iterator[tuple[int | str, str, int | str]]:
        """Every (text_id, text, image_id) pair, like :meth:`OfficialSplit.pairs`."""
        for image_id, text_id, text in self.pairs_list:
            yield text_id, text, image_id

    @property
    def texts(self) -> list[TextRecord]:
        """The split's labelled texts with all their images, in order of first appearance (like the jsonl's
        records; texts without images are not stored in the LMDB form)."""
        grouped: dict = {}
        for image_id, text_id, text in self.pairs_list:
            grouped.setdefault(text_id, (text, []))[1].append(image_id)
        return [TextRecord(t, text, tuple(dict.fromkeys(ids))) for t, (text, ids) in grouped.items()]


SPLIT_FORMS = ('tsv', 'lmdb')


def split_forms(data_dir: str | Path) -> dict[str, list[str]]:
    """The splits an official-format dir holds, by form: ``{'tsv': [...], 'lmdb': [...]}`` (sorted names).

    ``tsv``: ``{split}_imgs.tsv`` and ``{split}_texts.jsonl``; ``lmdb``: ``{split}/imgs`` and ``{split}/pairs``
    databases (cn_clip's ``build_lmdb_dataset.py``). The one place these forms are recognised.
    """
    d = Path(data_dir)
    if not d.is_dir():
        return {form: [] for form in SPLIT_FORMS}
    # either file names the split (OfficialSplit then names the missing one)
    tsv = sorted({p.name[:-len('_imgs.tsv')] for p in d.glob('*_imgs.tsv')} |
                 {p.name[:-len('_texts.jsonl')] for p in d.glob('*_texts.jsonl')})
    lmdb = sorted(p.name for p in d.iterdir() if (p / 'imgs').is_dir() and (p / 'pairs').is_dir())
    return {'tsv': tsv, 'lmdb': lmdb}


def split_form(data_dir: str | Path, split: str) -> str | None:
    """``'tsv'`` or ``'lmdb'``: the form in which ``data_dir`` holds ``split`` (tsv when it has both), else ``None``."""
    forms = split_forms(data_dir)
    return next((form for form in SPLIT_FORMS if split in forms[form]), None)


def open_split(data_dir: str | Path, split: str) -> OfficialSplit | LmdbSplit:
    """The ``split`` of an official-format dir in either form (:func:`split_form`).

    Raises:
        FileNotFoundError: ``data_dir`` holds no such split (the message lists what it holds).
    """
    return LmdbSplit(data_dir, split) if split_form(data_dir, split) == 'lmdb' else OfficialSplit(data_dir, split)


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


def draw_scene(color: str, shape: str, place: str = '左边', *, size: int = 64, seed: int = 0) -> Image.Image:
    """One picture of the generated dataset (:func:`make_synthetic_split`): a ``color`` (one of :data:`COLORS`,
    e.g. ``'红色'``) ``shape`` (``'圆形'``, ``'正方形'``, ``'三角形'``) on the ``place`` side (``'左边'`` / ``'右边'``),
    ``size`` x ``size`` RGB; ``seed`` varies the background and jitter.

    Raises:
        ValueError: a name not among the dataset's colours, shapes or places.
    """
    for name, value, known in (('color', color, COLORS), ('shape', shape, SHAPES), ('place', place, PLACES)):
        if value not in known:
            raise ValueError(f'{name}={value!r}: choose one of {list(known)}')
    return _draw(COLORS[color], shape, PLACES[place], size, random.Random(seed))


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
