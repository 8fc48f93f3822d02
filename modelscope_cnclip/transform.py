"""Image input: turn anything a user has into a PIL image, then into normalised pixels, bit for bit like the
official ``Resize((R, R), BICUBIC) -> convert('RGB') -> ToTensor -> Normalize`` (PIL + numpy + torch only).

Two guards the reference lacks, both applied by :func:`load_image` to every input:

* **Value range.** 16-bit images (modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, 16-bit PNGs opened as ``I``,
  ``uint16`` arrays) are scaled to 8 bits (``round(v / 257)``, the inverse of the usual ``v8 * 257``) before the
  resize; the reference clips them at 255 instead (a 16-bit photo becomes white). A mode ``I`` image whose values
  all lie in 0-255 is 8-bit data and is left as is (reference behaviour). Float images (mode ``F``) and ``I``
  images outside 0-65535 have no defined range and are refused with the fix. 8-bit images are untouched.
* **Size.** An encoded image with more pixels than :func:`max_image_pixels` (default: PIL's
  ``Image.MAX_IMAGE_PIXELS``, 89,478,485) is refused with a ``ValueError`` before it is decoded (a decompression
  bomb, or a huge scan); :func:`set_max_image_pixels`, ``CNCLIP_MAX_IMAGE_PIXELS`` or ``cnclip --max-image-pixels``
  raise it.
"""
from __future__ import annotations

import functools
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from modelscope_cnclip.config import PreprocessConfig
from modelscope_cnclip.utils import default_threads, fetch_url, map_ahead

__all__ = ['ImageInput', 'load_image', 'ImageTransform', 'image_transform', 'as_image_batch',
           'max_image_pixels', 'set_max_image_pixels', 'MAX_PIXELS_ENV']

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, np.ndarray, torch.Tensor]
_RESAMPLE = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR}
_ACCEPTED = ('a PIL image, a file path, a pathlib.Path, an http(s) URL, raw bytes, or a uint8 numpy array or '
             'torch tensor (HxW, HxWxC or CxHxW)')
_MODES_16BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N')
_TENSOR_IMAGE_DTYPES = (torch.uint8, getattr(torch, 'uint16', torch.uint8))  # torch.uint16: torch >= 2.3
#: Environment variable holding the pixel limit (an int; ``none`` for no limit); read at import, so DataLoader and
#: Ray workers started from a process that set it inherit it.
MAX_PIXELS_ENV = 'CNCLIP_MAX_IMAGE_PIXELS'
T = TypeVar('T')
R = TypeVar('R')


def _parse_limit(value: str | int | None, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ('none', '0', '')):
        return None
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise ValueError(f'{where}={value!r}: expected a number of pixels (e.g. 200000000) or "none"') from None
    if limit < 0:
        raise ValueError(f'{where}={value!r}: the pixel limit must be positive (or "none" for no limit)')
    return limit or None


def max_image_pixels() -> int | None:
    """The largest image (width x height) that is decoded; ``None``: no limit. It is PIL's
    ``Image.MAX_IMAGE_PIXELS`` (default 89,478,485), which :func:`set_max_image_pixels` sets."""
    return Image.MAX_IMAGE_PIXELS


def set_max_image_pixels(limit: int | str | None) -> None:
    """Set the pixel limit above which an encoded image is refused as a possible decompression bomb.

    Sets PIL's ``Image.MAX_IMAGE_PIXELS`` (so PIL's own check agrees) and the ``CNCLIP_MAX_IMAGE_PIXELS``
    environment variable, which worker processes started afterwards (DataLoader workers, Ray workers on this
    machine) read when they import this module.

    Args:
        limit: pixels (width x height); ``None``, ``0`` or ``'none'`` removes the limit (only for trusted input).
    Raises:
        ValueError: not a number of pixels.
    """
    parsed = _parse_limit(limit, 'max_image_pixels')
    Image.MAX_IMAGE_PIXELS = parsed
    os.environ[MAX_PIXELS_ENV] = str(parsed or 'none')


if os.environ.get(MAX_PIXELS_ENV) is not None:
    Image.MAX_IMAGE_PIXELS = _parse_limit(os.environ[MAX_PIXELS_ENV], MAX_PIXELS_ENV)


MAX_BYTES_ENV = 'CNCLIP_MAX_IMAGE_BYTES'
DEFAULT_MAX_IMAGE_BYTES = 512 << 20


def max_image_bytes() -> int:
    """Largest image file read (bytes): ``$CNCLIP_MAX_IMAGE_BYTES``, default 512 MiB (a 12 MP JPEG is ~5 MB, an
    uncompressed 100 MP TIFF ~300 MB)."""
    value = os.environ.get(MAX_BYTES_ENV, '').strip()
    if not value:
        return DEFAULT_MAX_IMAGE_BYTES
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f'{MAX_BYTES_ENV}={value!r}: expected a positive number of bytes')
    return int(value)


def _too_large(what: str, size: str) -> ValueError:
    return ValueError(
        f'cannot decode image {what}: {size} pixels is more than the limit of {max_image_pixels():,} (a guard '
        f'against decompression bombs); if the image is trusted, raise the limit with '
        f'modelscope_cnclip.set_max_image_pixels(N), the environment variable {MAX_PIXELS_ENV}=N or '
        f'`cnclip --max-image-pixels N`')


def _check_size(img: Image.Image, what: str) -> None:
    limit = max_image_pixels()
    width, height = img.size
    if limit is not None and width * height > limit:
        raise _too_large(what, f'{width}x{height} = {width * height:,}')


def _describe(obj: Any) -> str:
    if isinstance(obj, (bytes, bytearray)):
        return f'<{len(obj)} bytes>'
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return f'<{type(obj).__name__} shape={tuple(obj.shape)} dtype={obj.dtype}>'
    return repr(obj) if len(repr(obj)) < 200 else repr(obj)[:200] + '...'


# Formats PIL decodes by running an external program (EPS/PostScript: Ghostscript, which would execute the file):
# never opened, whoever sends the bytes.
_UNSAFE_FORMATS = frozenset({'EPS'})


@functools.lru_cache(maxsize=1)
def _safe_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in Image.OPEN if f not in _UNSAFE_FORMATS)


def _open_bytes(data: bytes, what: str, draft: int | None = None) -> Image.Image:
    try:
        # reads the header only; PIL warns between its limit and twice it
        img = Image.open(io.BytesIO(data), formats=_safe_formats())
        _check_size(img, what)  # ... and this refuses the image before it is decoded
        if draft:
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling), keeping both sides >= draft.
            img.draft(img.mode, (draft, draft))
        img.load()  # decode now, so a truncated file fails here and not deep in a batch
    except UnidentifiedImageError:
        raise ValueError(f'cannot decode image {what}: not an image format that PIL reads '
                         f'({len(data)} bytes starting {data[:8]!r})') from None
    except Image.DecompressionBombError as e:  # PIL's own check (above twice its limit), raised while opening
        pixels = re.search(r'\((\d+) pixels\)', str(e))
        raise _too_large(what, f'{int(pixels[1]):,}' if pixels else 'its size in') from None
    except (OSError, ValueError) as e:
        if str(e).startswith(f'cannot decode image {what}'):
            raise
        raise ValueError(f'cannot decode image {what}: {e}') from None
    return img


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """16-bit values -> 8-bit: ``round(v / 257)``, the exact inverse of the usual 8-to-16-bit ``v * 257``."""
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _as_8bit(img: Image.Image, what: str) -> Image.Image:
    """Bring an image whose values are not 0-255 to 8 bits (see the module docstring); others are returned as is."""
    if img.mode in _MODES_16BIT:
        return Image.fromarray(_scale_16bit(np.asarray(img)))
    if img.mode == 'I':
        arr = np.asarray(img)
        low, high = int(arr.min(initial=0)), int(arr.max(initial=0))
        if low < 0 or high > 65535:
            raise ValueError(f'image {what}: a 32-bit integer image (mode I) with values {low}..{high} has no 8- or '
                             f'16-bit range; scale it to 0-255 and convert it to mode L or RGB first')
        if high > 255 or img.format == 'PNG':  # a PNG in mode I is a 16-bit PNG
            return Image.fromarray(_scale_16bit(arr))
        return img
    if img.mode == 'F':
        raise ValueError(f'image {what}: a 32-bit float image (mode F) has no defined value range; convert it to '
                         f'8 bits first, e.g. Image.fromarray((np.asarray(img) * 255).clip(0, 255).astype(np.uint8)) '
                         f'for values in [0, 1]')
    return img


_CHANNELS = (1, 3, 4)


def _from_array(arr: np.ndarray, what: str = '') -> Image.Image:
    """An ``HxW``, ``HxWxC`` or ``CxHxW`` (C in 1, 3, 4: as decord and torchvision.io give) uint8 or uint16 array
    -> a PIL image (uint16 scaled to 8 bits). When both the first and the last axis could be channels (e.g.
    ``(3, 20, 4)``) the array is read as ``HxWxC``, numpy's and PIL's convention."""
    what = what or _describe(arr)
    if arr.dtype == np.uint16:
        arr = _scale_16bit(arr)
    if arr.dtype != np.uint8:
        raise TypeError(f'image array {what}: expected dtype uint8 (0-255) or uint16 (0-65535); convert with '
                        f'(arr * 255).clip(0, 255).astype(np.uint8) if it holds floats in [0, 1]')
    if arr.ndim == 3 and arr.shape[2] not in _CHANNELS and arr.shape[0] in _CHANNELS:
        arr = arr.transpose(1, 2, 0)  # CxHxW
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim in (2, 3) and 0 in arr.shape[:2]:
        raise ValueError(f'image array {what}: an empty image has no pixels to embed')
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(arr))
    raise ValueError(f'image array {what}: expected HxW, HxWxC or CxHxW with C in {_CHANNELS}; a batch of images '
                     f'is an (N, H, W, C) or (N, C, H, W) uint8 array or tensor, or a list')


def load_image(obj: ImageInput, timeout: float = 30.0, draft: int | None = None) -> Image.Image:
    """Open one image input as a decoded PIL image (in its own mode; preprocessing converts it).

    Args:
        obj: a PIL image, file path (str or ``os.PathLike``), http(s) URL, raw encoded bytes, or a uint8 (or
            uint16) numpy array or torch tensor, ``HxW``, ``HxWxC`` or ``CxHxW`` (C in 1, 3, 4; RGB order).
        timeout: seconds allowed for a URL download.
        draft: decode JPEGs at a reduced size no smaller than ``draft`` x ``draft`` (much faster for photos,
            slightly different pixels); ``None`` decodes exactly.

    Returns:
        The image, 16-bit data scaled to 8 bits (see the module docstring); any other mode is left for the
        preprocessing to convert after the resize, as the reference does.

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: bytes or a file that is not an image, an image
        above :func:`max_image_pixels`, a float (mode ``F``) image. TypeError: an unsupported input type.
    """
    if isinstance(obj, Image.Image):
        what = f'<PIL image mode={obj.mode} size={obj.size}>'
        if 0 in obj.size:
            raise ValueError(f'image {what}: an empty image has no pixels to embed')
        if isinstance(obj, ImageFile.ImageFile) and obj.tile:  # opened but not decoded yet: check before decoding
            _check_size(obj, what)
        return _as_8bit(obj, what)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        what = _describe(obj)
        return _as_8bit(_open_bytes(bytes(obj), what, draft), what)
    if isinstance(obj, torch.Tensor):
        if obj.dtype not in _TENSOR_IMAGE_DTYPES:
            raise TypeError(f'image tensor {_describe(obj)}: a tensor is an image only as uint8 (or uint16) pixels '
                            f'(HxW, HxWxC or CxHxW); a float tensor must be a batch of normalised pixels '
                            f'(N, 3, R, R), given directly as the image batch, not inside a list')
        return _from_array(obj.detach().cpu().numpy(), _describe(obj))
    if isinstance(obj, np.ndarray):
        return _from_array(obj)
    if isinstance(obj, str) and obj.startswith(('http://', 'https://')):
        return _as_8bit(_open_bytes(fetch_url(obj, timeout, 'image'), obj, draft), obj)
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f'image file {str(obj)!r} not found (looked in {path.resolve().parent})')
        what = repr(str(obj))
        size, limit = path.stat().st_size, max_image_bytes()
        if size > limit:  # read whole before decoding: refuse what no photo needs before it fills memory
            raise ValueError(f'cannot decode image {what}: the file is {size:,} bytes, more than the limit of '
                             f'{limit:,} for one image; raise it with {MAX_BYTES_ENV}=N if the file is trusted')
        return _as_8bit(_open_bytes(path.read_bytes(), what, draft), what)
    raise TypeError(f'unsupported image input {type(obj).__name__}: {_describe(obj)}; use {_ACCEPTED}')


def as_image_batch(images: Any) -> list | torch.Tensor:
    """One image input, a list of them, or pixels -> a list of image inputs, or a float pixel tensor
    ``(N, 3, R, R)`` (a ``(3, R, R)`` one gets its batch axis).

    A uint8 array or tensor is an image (``HxW``, ``HxWxC`` or ``CxHxW``), or a batch of images when it has four
    axes (``(N, H, W, C)`` as decord gives, ``(N, C, H, W)`` as torchvision.io gives); only a floating-point tensor
    is taken as preprocessed pixels (checked by :meth:`ImageTransform.check_pixels`).
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        return images.unsqueeze(0) if images.dim() == 3 else images
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    return list(images) if isinstance(images, (list, tuple)) else [images]


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

    def pixel_range(self) -> tuple[float, float]:
        """The lowest and highest value a normalised pixel can take (black and white through mean/std)."""
        low = min(-m / s for m, s in zip(self.cfg.mean, self.cfg.std))
        high = max((1 - m) / s for m, s in zip(self.cfg.mean, self.cfg.std))
        return low, high

    def check_pixels(self, pixels: torch.Tensor, name: str = 'img') -> torch.Tensor:
        """Check a batch of preprocessed pixels before it reaches the model; returns it unchanged.

        Raises:
            TypeError: not a floating-point tensor. ValueError: not ``(N, 3, R, R)`` at this model's ``R``, or
            NaN/inf values.
        Warns:
            UserWarning: values that look like raw ``[0, 1]`` or ``[0, 255]`` pixels rather than normalised ones.
        """
        size = self.size
        if not pixels.is_floating_point():
            raise TypeError(f'{name}: a pixel tensor must be floating point (normalised pixels), got {pixels.dtype}; '
                            f'uint8 pixels are images: pass them as (H, W, C), (C, H, W) or (N, H, W, C) uint8')
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f'{name}: a pixel tensor must be (N, 3, {size}, {size}) for this model (image size '
                             f'{size}), got {tuple(pixels.shape)}; pass images (PIL, paths, uint8 arrays or tensors) '
                             f'to have them resized, or preprocess them with model.transform')
        if pixels.numel() == 0:
            return pixels
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f'{name}: the pixel tensor holds NaN or infinite values')
        expected_low, expected_high = self.pixel_range()
        hint = None
        if high > expected_high + 0.05 or low < expected_low - 0.05:
            hint = 'raw [0, 255] pixels' if low >= 0 and high > 2 * expected_high else 'pixels normalised otherwise'
        elif low >= 0 and high <= 1:
            hint = 'raw [0, 1] pixels (ToTensor without Normalize)'
        if hint:
            warnings.warn(f'{name}: pixel values lie in [{low:.3g}, {high:.3g}], which looks like {hint}; this model '
                          f'expects (x / 255 - mean) / std with mean {self.cfg.mean} and std {self.cfg.std} (range '
                          f'[{expected_low:.2f}, {expected_high:.2f}]). Pass the images themselves, or preprocess '
                          f'them with model.transform', UserWarning, stacklevel=3)
        return pixels

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
        threads = num_threads or default_threads()
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


def image_transform(cfg: PreprocessConfig | None = None, *, image_size: int | None = None,
                    fast_decode: bool = False) -> ImageTransform:
    """The preprocessing of a model (``cfg``), or the standard one at ``image_size`` (224 by default)."""
    if cfg is None:
        cfg = PreprocessConfig(image_size=image_size or 224)
    return ImageTransform(cfg, fast_decode)
