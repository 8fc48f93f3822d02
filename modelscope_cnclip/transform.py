"""Image input: turn anything a user has into a PIL image, then into normalised pixels, bit for bit like the
official ``Resize((R, R), BICUBIC) -> convert('RGB') -> ToTensor -> Normalize`` (PIL + numpy + torch only).
"""
from __future__ import annotations

import io
import os
import urllib.request
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import PreprocessConfig

__all__ = ['ImageInput', 'load_image', 'ImageTransform', 'image_transform', 'map_ahead']

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, np.ndarray]
_RESAMPLE = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR}
_ACCEPTED = 'a PIL image, a file path, a pathlib.Path, an http(s) URL, raw bytes or a numpy HxWxC uint8 array'
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


def _describe(obj: Any) -> str:
    if isinstance(obj, (bytes, bytearray)):
        return f'<{len(obj)} bytes>'
    if isinstance(obj, np.ndarray):
        return f'<array shape={obj.shape} dtype={obj.dtype}>'
    return repr(obj) if len(repr(obj)) < 200 else repr(obj)[:200] + '...'


def _open_bytes(data: bytes, what: str, draft: int | None = None) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        if draft:
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling), keeping both sides >= draft.
            img.draft(img.mode, (draft, draft))
        img.load()  # decode now, so a truncated file fails here and not deep in a batch
    except UnidentifiedImageError:
        raise ValueError(f'cannot decode image {what}: not an image format that PIL reads '
                         f'({len(data)} bytes starting {data[:8]!r})') from None
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot decode image {what}: {e}') from None
    return img


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise TypeError(f'image array {_describe(arr)}: expected dtype uint8 (HxWxC, 0-255); '
                        f'convert with (arr * 255).clip(0, 255).astype(np.uint8) if it holds floats in [0, 1]')
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(arr))
    raise ValueError(f'image array {_describe(arr)}: expected HxW or HxWxC with C in (1, 3, 4); '
                     f'a CxHxW array needs arr.transpose(1, 2, 0)')


def load_image(obj: ImageInput, timeout: float = 30.0, draft: int | None = None) -> Image.Image:
    """Open one image input as a decoded PIL image (in its own mode; preprocessing converts it).

    Args:
        obj: a PIL image, file path (str or ``os.PathLike``), http(s) URL, raw encoded bytes, or a numpy
            ``HxW`` / ``HxWxC`` uint8 array (RGB order).
        timeout: seconds allowed for a URL download.
        draft: decode JPEGs at a reduced size no smaller than ``draft`` x ``draft`` (much faster for photos,
            slightly different pixels); ``None`` decodes exactly.

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: bytes or a file that is not an image.
        TypeError: an unsupported input type.
    """
    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(obj), _describe(obj), draft)
    if isinstance(obj, np.ndarray):
        return _from_array(obj)
    if isinstance(obj, str) and obj.startswith(('http://', 'https://')):
        try:
            with urllib.request.urlopen(obj, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
                data = resp.read()
        except OSError as e:
            raise OSError(f'cannot download image {obj}: {e}') from None
        return _open_bytes(data, obj, draft)
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f'image file {str(obj)!r} not found (looked in {path.resolve().parent})')
        return _open_bytes(path.read_bytes(), repr(str(obj)), draft)
    raise TypeError(f'unsupported image input {type(obj).__name__}: {_describe(obj)}; use {_ACCEPTED}')


class ImageTransform:
    """Preprocess images for one model: ``__call__`` for one, :meth:`batch` for many (inputs loaded in threads).

    Args:
        cfg: the model's preprocessing.
        fast_decode: decode JPEG files/bytes/URLs with reduced-size DCT decoding before the bicubic resize
            (several times faster on large photos; embeddings change slightly, see benchmarks/RESULTS.md).
    """

    def __init__(self, cfg: PreprocessConfig, fast_decode: bool = False) -> None:
        self.cfg = cfg
        self.size = cfg.image_size
        self.fast_decode = fast_decode
        self._resample = _RESAMPLE[cfg.interpolation]
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """Squash-resize in the image's own mode, then convert to RGB: ``(R, R, 3)`` uint8."""
        # The reference resizes first and converts after (P and 1 images resize with NEAREST in PIL).
        img = img.resize((self.size, self.size), self._resample).convert('RGB')
        return np.asarray(img, dtype=np.uint8)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(..., R, R, 3)`` uint8 -> ``(..., 3, R, R)`` float32 with the same ops, in the same order, as
        torchvision's ToTensor + Normalize (so the result is identical bit for bit)."""
        x = pixels.movedim(-1, -3).contiguous().to(torch.float32).div(255)
        return x.sub_(self._mean).div_(self._std)

    def load(self, image: ImageInput, index: int | None = None) -> np.ndarray:
        """Decode and resize one input -> ``(R, R, 3)`` uint8; errors name ``img[index]`` when given."""
        try:
            return self.to_uint8(load_image(image, draft=self.size if self.fast_decode else None))
        except (OSError, ValueError, TypeError) as e:
            if index is None:
                raise
            raise type(e)(f'img[{index}]: {e}') from None

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """One image input -> ``(3, R, R)`` float32."""
        return self.normalize(torch.from_numpy(self.load(image).copy()))

    def batch(self, images: Sequence[ImageInput], num_threads: int = 0) -> torch.Tensor:
        """Many image inputs -> ``(N, 3, R, R)`` float32, decoded in threads (see :meth:`batches`)."""
        items = list(images)
        out = list(self.batches(items, max(1, len(items)), num_threads))
        return out[0] if out else torch.empty(0, 3, self.size, self.size)

    def batches(self, images: Sequence[ImageInput], batch_size: int, num_threads: int = 0,
                prefetch: int = 2) -> Iterator[torch.Tensor]:
        """Yield ``(n, 3, R, R)`` batches while decoding up to ``prefetch`` batches ahead in ``num_threads``
        threads (0: one per CPU, at most 8), so decoding overlaps the model's work on the current batch.
        PIL releases the GIL while it decodes and resizes. Errors name the index of the failing input."""
        items = list(images)
        threads = num_threads or min(8, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(threads, thread_name_prefix='cnclip-decode') if threads > 1 and len(items) > 1 \
            else None
        try:
            arrays = map_ahead(lambda ix: self.load(ix[1], ix[0]), enumerate(items), pool,
                               batch_size * (prefetch + 1))
            for start in range(0, len(items), batch_size):
                n = min(batch_size, len(items) - start)
                yield self.normalize(torch.from_numpy(np.stack([next(arrays) for _ in range(n)])))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def image_transform(cfg: PreprocessConfig | None = None, image_size: int | None = None,
                    fast_decode: bool = False) -> ImageTransform:
    """The preprocessing of a model (``cfg``), or the standard one at ``image_size`` (224 by default)."""
    if cfg is None:
        cfg = PreprocessConfig(image_size=image_size or 224)
    return ImageTransform(cfg, fast_decode)
