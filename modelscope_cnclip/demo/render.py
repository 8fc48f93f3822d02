"""Pictures of results, drawn with PIL (no plotting library): a grid of search hits with captions and scores, and a
heat map of images x texts. Both return a ``PIL.Image``, which Jupyter shows inline and the Gradio app displays.

Chinese labels need a CJK font; the first one found is used (Noto CJK, WenQuanYi, Source Han, Microsoft YaHei,
PingFang, ...; ``CNCLIP_FONT=/path/to/font`` chooses one), else PIL's default font, which draws CJK as boxes.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_ENV = 'CNCLIP_FONT'
MAX_CELLS = 10_000  # a heat map of 100 x 100 is already ~10k px wide
_FONT_FILES = ('NotoSansCJK-Regular.ttc', 'NotoSansCJKsc-Regular.otf', 'NotoSerifCJK-Regular.ttc',
               'wqy-microhei.ttc', 'wqy-zenhei.ttc', 'SourceHanSansSC-Regular.otf', 'msyh.ttc', 'simhei.ttf',
               'PingFang.ttc', 'Arial Unicode.ttf')
_FONT_DIRS = ('/usr/share/fonts', '/usr/local/share/fonts', '~/.fonts', '~/.local/share/fonts', '/Library/Fonts',
              '/System/Library/Fonts', 'C:/Windows/Fonts')


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> str | None:
    """A font file that draws Chinese, or ``None``."""
    if os.environ.get(FONT_ENV):
        return os.environ[FONT_ENV]
    for d in _FONT_DIRS:
        root = Path(d).expanduser()
        if root.is_dir():
            for name in _FONT_FILES:
                found = next(root.rglob(name), None)
                if found is not None:
                    return str(found)
    try:  # fontconfig knows the fonts of most Linux desktops
        out = subprocess.run(['fc-match', '-f', '%{file}', ':lang=zh'], capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout and Path(out.stdout).is_file():
            return out.stdout
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def font(size: int) -> Any:
    path = cjk_font_path()
    if path:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size)


def _thumbnail(image: Any, side: int) -> Image.Image:
    from modelscope_cnclip.transform import load_image
    try:
        img = load_image(image).convert('RGB')
    except (OSError, ValueError, TypeError):
        img = Image.new('RGB', (side, side), (230, 230, 230))  # a missing file still gets its cell and caption
    img.thumbnail((side, side))
    cell = Image.new('RGB', (side, side), 'white')
    cell.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return cell


def _fit(draw: ImageDraw.ImageDraw, text: str, fnt: Any, width: int) -> str:
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + '…', font=fnt) > width:
        text = text[:-1]
    return text + '…'


def hits_grid(images: Sequence[Any], captions: Sequence[str], *, columns: int = 5, side: int = 160) -> Image.Image:
    """A grid of images (paths, PIL images, bytes, arrays: anything :func:`~modelscope_cnclip.load_image` reads),
    each with a caption line under it (e.g. ``"img_12 · 0.873"``); unreadable images get a grey cell.

    Raises:
        ValueError: ``images`` and ``captions`` of different lengths, or ``columns`` / ``side`` < 1.
    """
    if len(images) != len(captions):
        raise ValueError(f'{len(images)} images but {len(captions)} captions')
    if columns < 1 or side < 1:
        raise ValueError('columns and side must be at least 1')
    n = max(len(images), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fnt = font(max(12, side // 11))
    line = int(side // 11 * 1.6) + 6
    grid = Image.new('RGB', (cols * (side + 8) + 8, rows * (side + line + 8) + 8), 'white')
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = 8 + (i % cols) * (side + 8), 8 + (i // cols) * (side + line + 8)
        grid.paste(_thumbnail(image, side), (x, y))
        draw.text((x, y + side + 3), _fit(draw, caption, fnt, side), fill=(30, 30, 30), font=fnt)
    return grid


def show_hits(hits: Sequence[Any], *, columns: int = 5, side: int = 160) -> Image.Image:
    """:func:`hits_grid` of search hits (:class:`~modelscope_cnclip.index.Hit`, or ``{"id", "path", "score"}``
    dicts as ``/v1/search`` returns them), captioned ``id · score``."""
    paths, captions = [], []
    for h in hits:
        get = h.get if isinstance(h, dict) else lambda k, h=h: getattr(h, k)
        paths.append(get('path') or get('id'))
        captions.append(f'{get("id")} · {get("score"):.3f}')
    return hits_grid(paths, captions, columns=columns, side=side)


def _colour(value: float) -> tuple[int, int, int]:
    """0 -> pale, 1 -> deep blue (a sequential map that prints and reads in grey too)."""
    v = float(np.clip(value, 0, 1))
    low, high = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(c) for c in low + (high - low) * v)


def heatmap(values: Any, images: Sequence[Any], texts: Sequence[str], *, title: str = '',
            cell: int = 96) -> Image.Image:
    """An images x texts heat map: a thumbnail per row, a text per column, each cell coloured by its value
    (0-1, e.g. :meth:`CNClip.probabilities`; cosine similarities are rescaled from their min-max) and labelled.

    Args:
        values: ``(N_images, N_texts)`` numbers (tensor or array).
    Raises:
        ValueError: a shape that does not match ``images`` x ``texts``.
    """
    values = np.asarray(values.detach().cpu() if hasattr(values, 'detach') else values, dtype=np.float64)
    if values.shape != (len(images), len(texts)):
        raise ValueError(f'values of shape {values.shape} for {len(images)} images x {len(texts)} texts')
    if len(images) * len(texts) > MAX_CELLS:
        raise ValueError(f'{len(images)} images x {len(texts)} texts: more than {MAX_CELLS} cells to draw; '
                         f'show fewer')
    shade = values if values.size == 0 or (values.min() >= 0 and values.max() <= 1) else (
        (values - values.min()) / max(values.max() - values.min(), 1e-12))
    fnt, small = font(max(12, cell // 7)), font(max(11, cell // 8))
    head = int(cell * 0.9) + (cell // 3 if title else 0)
    width = cell + 8 + len(texts) * cell + 8
    img = Image.new('RGB', (width, head + len(images) * cell + 8), 'white')
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((8, 4), title, fill=(20, 20, 20), font=fnt)
    top = head - int(cell * 0.45)
    for j, text in enumerate(texts):
        draw.text((cell + 8 + j * cell + 4, top), _fit(draw, text, small, cell - 8), fill=(20, 20, 20), font=small)
    for i, image in enumerate(images):
        y = head + i * cell
        img.paste(_thumbnail(image, cell - 6), (4, y + 3))
        for j in range(len(texts)):
            x = cell + 8 + j * cell
            colour = _colour(shade[i, j])
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour)
            ink = (255, 255, 255) if sum(colour) < 380 else (20, 20, 20)
            label = f'{values[i, j]:.2f}'
            w = draw.textlength(label, font=fnt)
            draw.text((x + (cell - w) / 2, y + cell / 2 - cell // 12), label, fill=ink, font=fnt)
    return img
