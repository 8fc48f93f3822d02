"""Image input: turn anything a user has into a PIL image, then into normalised pixels, bit for bit like the
official ``Resize((R, R), BICUBIC) -> convert('RGB') -> ToTensor -> Normalize`` (PIL + numpy + torch only).
"""
from __future__ import annotations

import io
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import PreprocessConfig

__all__ = ['ImageInput', 'load_image', 'ImageTransform', 'image_transform']

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, np.ndarray]
_RESAMPLE = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR}
_ACCEPTED = 'a PIL image, a file path, a pathlib.Path, an http(s) URL, raw bytes or a numpy HxWxC uint8 array'


def _describe(obj: Any) -> str:
    if isinstance(obj, (bytes, bytearray)):
        return f'<{len(obj)} bytes>'
    if isinstance(obj, np.ndarray):
        return f'<array shape={obj.shape} dtype={obj.dtype}>'
    return repr(obj) if len(repr(obj)) < 200 else repr(obj)[:200] + '...'


def _open_bytes(data: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so a truncated file fails here and not deep in a batch
    except (UnidentifiedImageError, OSError, ValueError) as e:
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


def load_image(obj: ImageInput, timeout: float = 30.0) -> Image.Image:
    """Open one image input as a decoded PIL image (in its own mode; preprocessing converts it).

    Args:
        obj: a PIL image, file path (str or ``os.PathLike``), http(s) URL, raw encoded bytes, or a numpy
            ``HxW`` / ``HxWxC`` uint8 array (RGB order).
        timeout: seconds allowed for a URL download.

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: bytes or a file that is not an image.
        TypeError: an unsupported input type.
    """
    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(obj), _describe(obj))
    if isinstance(obj, np.ndarray):
        return _from_array(obj)
    if isinstance(obj, str) and obj.startswith(('http://', 'https://')):
        try:
            with urllib.request.urlopen(obj, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
                data = resp.read()
        except OSError as e:
            raise OSError(f'cannot download image {obj}: {e}') from None
        return _open_bytes(data, obj)
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f'image file {str(obj)!r} not found (looked in {path.resolve().parent})')
        return _open_bytes(path.read_bytes(), repr(str(obj)))
    raise TypeError(f'unsupported image input {type(obj).__name__}: {_describe(obj)}; use {_ACCEPTED}')


class ImageTransform:
    """Preprocess images for one model: ``__call__`` for one, :meth:`batch` for many (inputs loaded in threads)."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.size = cfg.image_size
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

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """One image input -> ``(3, R, R)`` float32."""
        return self.normalize(torch.from_numpy(self.to_uint8(load_image(image)).copy()))

    def batch(self, images: Sequence[ImageInput], num_threads: int = 0) -> torch.Tensor:
        """Many image inputs -> ``(N, 3, R, R)`` float32; decoding and resizing run in ``num_threads`` threads
        (0: up to 8, by CPU count). Errors name the index of the failing input."""
        def work(item: tuple[int, ImageInput]) -> np.ndarray:
            i, obj = item
            try:
                return self.to_uint8(load_image(obj))
            except (OSError, ValueError, TypeError) as e:
                raise type(e)(f'img[{i}]: {e}') from None

        items = list(enumerate(images))
        if not items:
            return torch.empty(0, 3, self.size, self.size)
        threads = num_threads or min(8, os.cpu_count() or 1, len(items))
        if threads <= 1 or len(items) == 1:
            arrays = [work(it) for it in items]
        else:
            with ThreadPoolExecutor(threads) as pool:
                arrays = list(pool.map(work, items))
        return self.normalize(torch.from_numpy(np.stack(arrays)))


def image_transform(cfg: PreprocessConfig | None = None, image_size: int | None = None) -> ImageTransform:
    """The preprocessing of a model (``cfg``), or the standard one at ``image_size`` (224 by default)."""
    if cfg is None:
        cfg = PreprocessConfig(image_size=image_size or 224)
    return ImageTransform(cfg)
