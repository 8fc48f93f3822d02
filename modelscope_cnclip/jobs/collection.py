"""Collections to embed: every input form a user has, as one ordered list of ``(id, source)`` items.

* an image (or video) folder, scanned recursively; an item's id is its path relative to the folder, with ``/``;
  also a folder behind a URI (``s3://bucket/photos``, ``gs://``, ``hdfs://``, ``file://``) through ``pyarrow.fs``;
* a ``.jsonl`` or ``.csv`` / ``.tsv`` (with a header) of paths or URLs and/or texts, with optional ids;
* the official Chinese-CLIP split (``{split}_imgs.tsv`` + ``{split}_texts.jsonl``) or its LMDB form.

The order is deterministic (a resumed job must see the same list), and :meth:`Collection.read` returns what the
model's preprocessing takes: a path or URL string, encoded bytes, or the text itself.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from modelscope_cnclip.config import MODALITIES, Modality
from modelscope_cnclip.data import open_split, parse_id, read_jsonl, split_forms

__all__ = ['Item', 'Collection', 'open_collection', 'IMAGE_EXTENSIONS', 'VIDEO_EXTENSIONS', 'MODALITIES', 'Modality']

logger = logging.getLogger(__name__)
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.flv', '.m4v', '.mpg', '.mpeg', '.wmv', '.ts', '.3gp',
                    '.ogv', '.mts', '.m2ts', '.vob', '.asf')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm',
                    '.jfif')

# Column names recognised in jsonl/csv inputs, first match wins; override with ``columns``.
DEFAULT_COLUMNS = {
    'id': ('id', 'image_id', 'text_id', 'video_id', 'key'),
    'image': ('image', 'img', 'path', 'image_path', 'url', 'image_url', 'file'),
    'video': ('video', 'video_path', 'video_url'),
    'text': ('text', 'query', 'caption', 'title'),
}


@dataclass(frozen=True)
class Item:
    """One input: ``id`` names it in the output; ``source`` says where it comes from (path, URL, text)."""

    id: str
    source: str


@dataclass
class Collection:
    """An ordered list of items of one modality, and how to read each.

    Picklable (it travels to Ray workers): readers of official/LMDB data are reopened lazily in each process.
    """

    items: list[Item]
    modality: str
    kind: str  # 'folder' | 'uri' | 'jsonl' | 'csv' | 'official' | 'lmdb'
    location: str
    root: str | None = None  # folder inputs: ids are paths relative to it
    split: str | None = None
    _reader: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state['_reader'] = None  # file handles and LMDB environments do not cross processes
        return state

    def describe(self) -> dict[str, Any]:
        """The ``input`` entry of an embeddings dir's meta.json."""
        return {'kind': self.kind, 'location': self.location, 'root': self.root, 'split': self.split,
                'modality': self.modality, 'count': len(self.items)}

    def read(self, item: Item) -> Any:
        """What the model's preprocessing takes for ``item``: a path/URL, image bytes, or the text."""
        if self.modality == 'text':
            return item.source
        if self.kind == 'official' or self.kind == 'lmdb':
            return self._open().image_bytes(parse_id(item.id))
        if self.kind == 'uri':
            filesystem, base = self._open()
            with filesystem.open_input_file(f'{base.rstrip("/")}/{item.id}') as f:
                return f.read()
        return item.source

    def _open(self) -> Any:
        """The split reader (official/LMDB data) or ``(filesystem, base path)`` (URIs), opened once per process."""
        if self._reader is None:
            self._reader = _uri_fs(self.location) if self.kind == 'uri' else open_split(self.location, self.split)
        return self._reader


def _has_ext(name: str, exts: tuple[str, ...]) -> bool:
    return name.lower().endswith(exts)


def _scan_folder(root: Path, exts: tuple[str, ...]) -> list[Item]:
    """Every file with one of ``exts`` under ``root``, following links to folders, each folder once: a link back
    up the tree (a loop) or a second link to a folder already seen is skipped with a warning."""
    items = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            logger.warning('%s: a folder already scanned (a symlink loop or a second link to it); skipped', dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for name in filenames:
            if not name.startswith('.') and _has_ext(name, exts):
                path = Path(dirpath) / name
                items.append(Item(path.relative_to(root).as_posix(), str(path)))
    return sorted(items, key=lambda i: i.id)


def _uri_fs(uri: str) -> tuple[Any, str]:
    try:
        from pyarrow import fs
    except ImportError:
        raise ImportError(f'{uri}: reading URIs needs pyarrow (pip install "modelscope_cnclip[ray]")') from None
    return fs.FileSystem.from_uri(uri)


def _scan_uri(uri: str, exts: tuple[str, ...]) -> list[Item]:
    from pyarrow import fs as pafs
    filesystem, base = _uri_fs(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    prefix = uri.rstrip('/')
    items = []
    for info in infos:
        rel = info.path[len(base):].lstrip('/')
        if info.type == pafs.FileType.File and _has_ext(info.base_name, exts) and \
                not any(part.startswith('.') for part in rel.split('/')):
            items.append(Item(rel, f'{prefix}/{rel}'))
    return sorted(items, key=lambda i: i.id)


def _pick(row: Mapping[str, Any], role: str, columns: Mapping[str, str]) -> str | None:
    if role in columns:
        return columns[role] if columns[role] in row else None
    return next((c for c in DEFAULT_COLUMNS[role] if c in row), None)


def _table_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == '.jsonl':
        rows = []
        for n, row in read_jsonl(path):
            if not isinstance(row, dict):
                raise ValueError(f'{path}:{n}: expected a JSON object per line, got {type(row).__name__}')
            rows.append({**row, '_line': n})
        return rows
    delimiter = '\t' if path.suffix == '.tsv' else ','
    rows = []
    with open(path, encoding='utf-8-sig', newline='') as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for row in reader:
                if None in row:  # DictReader files surplus fields under None
                    raise ValueError(f'{path}:{reader.line_num}: {len(reader.fieldnames or []) + len(row[None])} '
                                     f'fields, but the header names {len(reader.fieldnames or [])}; quote values '
                                     f'that contain {delimiter!r}')
                rows.append({**row, '_line': reader.line_num})
        except csv.Error as e:
            raise ValueError(f'{path}:{reader.line_num}: not a readable {path.suffix[1:]} row ({e})') from None
    return rows


def _table_items(path: Path, modality: str, columns: Mapping[str, str], root: Path | None) -> tuple[list[Item], str]:
    rows = _table_rows(path)
    if not rows:
        raise ValueError(f'{path}: no rows to embed')
    first = rows[0]
    if modality == 'auto':
        modality = next((m for m in ('image', 'video', 'text') if _pick(first, m, columns)), '')
        if not modality:
            raise ValueError(f'{path}: no image, video or text column among {sorted(k for k in first if k != "_line")}'
                             f'; name them with columns={{"image": ..., "text": ...}} (CLI: --column image=NAME)')
    named_id = columns.get('id')
    if named_id is not None and named_id not in first:
        raise ValueError(f'{path}: no id column {named_id!r} (columns {sorted(k for k in first if k != "_line")}); '
                         f'name an existing one with --column id=NAME, or leave it out to number the rows')
    base = root or path.parent
    items = []
    for row in rows:
        col, id_col = _pick(row, modality, columns), _pick(row, 'id', columns)
        value = row.get(col) if col else None
        if not isinstance(value, str) or (modality != 'text' and not value.strip()):
            names = sorted(k for k in row if k != '_line')
            raise ValueError(f'{path}:{row["_line"]}: no {modality} value (columns {names}'
                             f'); name the column with columns={{"{modality}": NAME}} (CLI: --column {modality}=NAME)')
        item_id = str(row[id_col]) if id_col and row.get(id_col) not in (None, '') else str(row['_line'])
        if modality != 'text' and '://' not in value and not os.path.isabs(value):
            value = str(base / value)
        items.append(Item(item_id, value))
    return items, modality


def open_collection(location: str | os.PathLike, modality: Modality = 'auto', *, split: str | None = None,
                    columns: Mapping[str, str] | None = None, root: str | os.PathLike | None = None) -> Collection:
    """Open anything embeddable as a :class:`Collection`.

    Args:
        location: a folder (images, or videos with ``modality='video'``), a URI of one, a ``.jsonl``/``.csv``/``.tsv``
            file, an official-format dir (with ``split``) or its LMDB form.
        modality: ``'image'``, ``'text'``, ``'video'`` or ``'auto'`` (folders: images; tables: the first of
            image, video, text columns present; official data: images).
        split: the split of official/LMDB data (``'valid'`` by default when the dir holds one).
        columns: jsonl/csv column names by role (``id``, ``image``, ``video``, ``text``).
        root: the folder that relative paths in a jsonl/csv are relative to (default: the file's folder).
    Raises:
        FileNotFoundError / ValueError naming the input and what was expected.
    """
    if modality not in ('auto', *MODALITIES):
        raise ValueError(f'modality {modality!r}: expected one of auto, {", ".join(MODALITIES)}')
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f'columns {unknown}: the known roles are {sorted(DEFAULT_COLUMNS)}')
    text = str(location)
    if '://' in text and not text.startswith(('http://', 'https://')):
        mod = 'image' if modality == 'auto' else modality
        if mod == 'text':
            raise ValueError(f'{text}: a URI folder holds images or videos, not texts')
        items = _scan_uri(text, VIDEO_EXTENSIONS if mod == 'video' else IMAGE_EXTENSIONS)
        return _nonempty(Collection(items, mod, 'uri', text, root=text), mod)
    path = Path(os.path.expanduser(text))
    if path.is_file() and path.suffix in ('.jsonl', '.csv', '.tsv') and not path.name.endswith('_imgs.tsv'):
        items, mod = _table_items(path, modality, columns, Path(root) if root else None)
        return _nonempty(Collection(items, mod, path.suffix.lstrip('.').replace('tsv', 'csv'), str(path.resolve()),
                                    root=str(Path(root).resolve()) if root else None), mod)
    if path.is_file() and path.name.endswith('_imgs.tsv'):  # an official split named by its image file
        split, path = split or path.name[:-len('_imgs.tsv')], path.parent
    if path.is_dir():
        official = _official_form(path, split)
        if official:
            return _nonempty(_official_collection(path, *official, modality), modality)
        mod = 'image' if modality == 'auto' else modality
        if mod == 'text':
            raise ValueError(f'{path}: a folder holds images or videos; texts come from a .jsonl/.csv file or an '
                             f'official-format dir')
        exts = VIDEO_EXTENSIONS if mod == 'video' else IMAGE_EXTENSIONS
        return _nonempty(Collection(_scan_folder(path, exts), mod, 'folder', str(path.resolve()),
                                    root=str(path.resolve())), mod, exts)
    raise FileNotFoundError(f'{location}: not found; give an image/video folder, a URI (s3://...), a .jsonl/.csv '
                            f'file, or an official-format dir')


def _official_form(path: Path, split: str | None) -> tuple[str, str] | None:
    """``(kind, split)`` when ``path`` holds official tsv+jsonl (kind ``'official'``) or LMDB data (``'lmdb'``), the
    split guessed when unique (``valid`` when there are several)."""
    for form, splits in split_forms(path).items():
        kind = 'official' if form == 'tsv' else form
        if not splits:
            continue
        if split is None:
            if len(splits) > 1 and 'valid' not in splits:
                raise ValueError(f'{path}: holds splits {splits}; choose one with split= (CLI: --split)')
            split = 'valid' if 'valid' in splits else splits[0]
        if split not in splits:
            raise ValueError(f'{path}: no split {split!r} ({kind} form has {splits})')
        return kind, split
    return None


def _official_collection(path: Path, kind: str, split: str, modality: str) -> Collection:
    reader = open_split(path, split)
    if modality in ('auto', 'image'):
        items = [Item(str(i), f'{path}#{split}/{i}') for i in reader.image_ids]
        mod = 'image'
    elif modality == 'text':
        items = [Item(str(t.text_id), t.text) for t in reader.texts]
        mod = 'text'
    else:
        raise ValueError(f'{path}: official data holds images and texts, not {modality}s')
    return Collection(items, mod, kind, str(path.resolve()), split=split, _reader=reader)


def _nonempty(c: Collection, modality: str, exts: tuple[str, ...] = ()) -> Collection:
    if not c.items:
        what = f' (extensions {", ".join(exts)})' if exts else ''
        raise ValueError(f'{c.location}: no {modality} inputs found{what}')
    seen: set[str] = set()
    dups = [i.id for i in c.items if i.id in seen or seen.add(i.id)]
    if dups:
        raise ValueError(f'{c.location}: duplicate ids {dups[:5]}; ids must be unique (give an id column, or '
                         f'leave it out to number the lines)')
    return c
