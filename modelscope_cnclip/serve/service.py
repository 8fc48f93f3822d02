"""The model behind the HTTP API: decoding, dynamic batching and search.

One :class:`EmbeddingService` runs in each server process (the single-process server) or in each Ray Serve replica.
Concurrent requests' items are merged into model batches of up to ``max_batch_size`` items, waiting at most
``batch_wait_ms`` for a batch to fill, by mixedbread's ``batched`` library (``batched.aio.AsyncBatchProcessor``;
plain asyncio, so the same code batches in uvicorn and inside Ray Serve replicas; Ray Serve's own ``serve.batch``
runs only inside a Serve replica). The model runs one batch at a time in a worker thread, so the event loop keeps
answering (``/health``, ``/metrics``, parsing) while it computes.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from modelscope_cnclip.serve.fetch import UrlRefused, fetch_public
from modelscope_cnclip.serve.schema import ApiError, Modality
from modelscope_cnclip.serve.settings import ServeSettings
from modelscope_cnclip.utils import default_threads

if TYPE_CHECKING:
    import torch

    from modelscope_cnclip.index import Index
    from modelscope_cnclip.inference import CNClip

logger = logging.getLogger(__name__)
_DATA_URI = re.compile(r'data:image/[A-Za-z0-9.+-]+(;[A-Za-z0-9=.+-]+)*;base64,', re.ASCII | re.IGNORECASE)
_BASE64 = re.compile(r'[A-Za-z0-9+/_-]+={0,2}', re.ASCII)
_PATH_LIKE = re.compile(r'(/|\./|~/|[A-Za-z]:\\)|.{1,200}\.(jpe?g|png|webp|gif|bmp|tiff?)$', re.IGNORECASE)


def image_bytes(item: str, where: str, settings: ServeSettings,
                fetch: Callable[..., bytes] = fetch_public) -> bytes:
    """The encoded image an API string carries: a ``data:image/...;base64,`` URI, plain base64 or, only when
    ``settings.allow_urls``, an ``http(s)://`` URL. A string is never read as a path on the server.

    Raises:
        ApiError: 400 naming ``where`` for anything else, undecodable base64 or a refused URL.
    """
    if item[:8].lower().startswith(('http://', 'https://')):
        if not settings.allow_urls:
            raise ApiError(400, f'{where}: image URLs are not fetched by this server (start it with --allow-urls); '
                                f'send the image as a data URI or base64', code='urls_disabled')
        try:
            return fetch(item, timeout=settings.url_timeout_s, max_bytes=settings.url_max_bytes,
                         max_redirects=settings.url_max_redirects)
        except UrlRefused as e:
            raise ApiError(400, f'{where}: {e}', code='url_refused') from None
    payload = item
    if item[:5].lower() == 'data:':
        match = _DATA_URI.match(item)
        if not match:
            raise ApiError(400, f'{where}: a data URI must be data:image/<type>;base64,<data>', code='invalid_image')
        payload = item[match.end():]
    payload = ''.join(payload.split())  # line-wrapped base64 is common
    if not payload or not _BASE64.fullmatch(payload):
        raise ApiError(400, f'{where}: not an image: expected a data:image/...;base64 URI or base64 data (a server '
                            f'never reads file paths)', code='invalid_image')
    if len(payload) * 3 // 4 > settings.max_body_bytes:
        raise ApiError(413, f'{where}: the image is larger than the body limit', code='too_large')
    try:
        alt = b'-_' if ('-' in payload or '_' in payload) else None
        return base64.b64decode(payload + '=' * (-len(payload) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f'{where}: invalid base64 ({e})', code='invalid_image') from None


class EmbeddingService:
    """A loaded model (any backend) with batched embedding, ranking and search over an optional index.

    Args:
        model: a :class:`~modelscope_cnclip.CNClip` (torch or an exported dir).
        settings: limits and batching (:class:`ServeSettings`).
        index: an :class:`~modelscope_cnclip.index.Index` made by this model, for :meth:`search`.

    Methods return float32 numpy arrays, L2-normalised, exactly what ``model.encode_text`` / ``encode_image`` give
    for the same inputs up to the float rounding that a different batch composition brings (max abs ~1e-6).
    """

    def __init__(self, model: CNClip, settings: ServeSettings | None = None, index: Index | None = None) -> None:
        from batched.aio import AsyncBatchProcessor

        self.model = model
        self.settings = settings or ServeSettings()
        self.index = index
        if index is not None:
            index.check_model(model.fingerprint, model.source)
        self._forward = ThreadPoolExecutor(1, thread_name_prefix='cnclip-model')
        self._decode = ThreadPoolExecutor(self.settings.decode_threads or default_threads(),
                                          thread_name_prefix='cnclip-decode')
        batching = dict(batch_size=self.settings.max_batch_size, timeout_ms=self.settings.batch_wait_ms)
        self._text_batch = AsyncBatchProcessor(self._texts_in_batch, **batching)
        self._image_batch = AsyncBatchProcessor(self._images_in_batch, **batching)
        self.on_batch: Callable[[Modality, int], None] | None = None  # metrics hook: (modality, items)
        self._logit_scale = float(model.temperature.reciprocal().item())

    # --- batches (each runs in the model thread) ---

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._forward, fn, *args)

    async def _texts_in_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.on_batch:
            self.on_batch('text', len(texts))
        vectors = await self._run(self._encode_texts, texts)
        return list(vectors)

    async def _images_in_batch(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        if self.on_batch:
            self.on_batch('image', len(pixels))
        vectors = await self._run(self._encode_pixels, pixels)
        return list(vectors)

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_text(texts, batch_size=len(texts)).float().cpu().numpy()

    def _encode_pixels(self, pixels: list[torch.Tensor]) -> np.ndarray:
        import torch
        return self.model.encode_image(torch.stack(pixels), batch_size=len(pixels)).float().cpu().numpy()

    # --- inputs ---

    def _pixels(self, item: str, where: str) -> torch.Tensor:
        data = image_bytes(item, where, self.settings)
        try:
            return self.model.transform(data)
        except (ValueError, TypeError, OSError) as e:
            message = str(e).replace(f'<{len(data)} bytes>', where, 1)
            if where not in message:
                message = f'{where}: {message}'
            if 'decompression bombs' in message:  # the library's advice is for whoever runs the server
                message = message.split('; if the image is trusted')[0] + ' (this server\'s limit)'
            if _PATH_LIKE.match(item):
                message += '; a server never reads file paths: send the file\'s bytes as base64 or a data URI'
            status = 413 if 'more than the limit' in message else 400
            raise ApiError(status, message, code='invalid_image' if status == 400 else 'image_too_large') from None

    async def pixels(self, items: list[str], param: str) -> list[torch.Tensor]:
        """Decode and preprocess image strings in the decode threads. The first bad one raises its ApiError (named
        ``param[i]`` for a list) and the request's other items still waiting are cancelled, so one bad request
        does not keep the shared decode threads busy."""
        urls = sum(item[:8].lower().startswith(('http://', 'https://')) for item in items)
        if urls > self.settings.max_url_items:
            raise ApiError(413, f'{param}: {urls} image URLs, more than the limit of {self.settings.max_url_items} a '
                                f'request; send the images as data URIs or split the request', param=param,
                           code='too_many_urls')
        listed = param in ('input', 'images')
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._decode, self._pixels, item, f'{param}[{i}]' if listed else param)
                   for i, item in enumerate(items)]
        try:
            for i, future in enumerate(futures):
                try:
                    await future
                except ApiError as e:
                    e.param, e.index = param, (i if listed else None)
                    raise
        finally:
            for future in futures:
                future.cancel()
        return [f.result() for f in futures]

    # --- the API ---

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        """``(N, D)`` float32 text embeddings, each text batched with other requests' texts."""
        # shielded: a request cancelled while queued must not cancel its items' futures under the batcher
        return np.stack(await asyncio.shield(self._text_batch(list(texts))))

    async def embed_images(self, items: list[str], param: str = 'input') -> np.ndarray:
        """``(N, D)`` float32 image embeddings of API image strings (data URIs, base64, allowed URLs)."""
        return await self._embed_pixels(await self.pixels(items, param))

    async def _embed_pixels(self, pixels: list[torch.Tensor]) -> np.ndarray:
        return np.stack(await asyncio.shield(self._image_batch(pixels)))

    def check_texts(self, texts: list[str], param: str, *, listed: bool = True) -> list[int]:
        """Tokens the model reads per text (with [CLS]/[SEP], capped at the context length: the API's ``usage``); a
        text the tokenizer reduces to nothing (control or zero-width characters only) is a
        400 like an empty one, naming ``param[i]``."""
        counts = self.model.tokenizer.num_tokens(texts)
        for i, n in enumerate(counts):
            if n <= 2:  # [CLS] [SEP] only
                where = f'{param}[{i}]' if listed else param
                raise ApiError(400, f'{where}: no text left after tokenisation (only control, zero-width or '
                                    f'whitespace characters)', param=param, index=i if listed else None,
                               code='empty_input')
        return counts

    async def embed(self, items: list[str], modality: Modality, param: str = 'input') -> np.ndarray:
        if modality == 'text':
            self.check_texts(items, param, listed=param == 'input')
            return await self.embed_texts(items)
        return await self.embed_images(items, param)

    async def rank(self, query: str, query_modality: Modality, candidates: list[str]) -> dict[str, list[float]]:
        """Probabilities (softmax of ``logit_scale * cosine``, as ``CNClip.probabilities``) and cosine similarities
        of one query over its candidates (texts for an image, images for a text)."""
        # every input is checked (images decoded, texts tokenised) before anything is embedded
        if query_modality == 'image':
            self.check_texts(candidates, 'texts')
            pixels = await self.pixels([query], 'image')
            q, c = await asyncio.gather(self._embed_pixels(pixels), self.embed_texts(candidates))
        else:
            self.check_texts([query], 'text', listed=False)
            pixels = await self.pixels(candidates, 'images')
            q, c = await asyncio.gather(self.embed_texts([query]), self._embed_pixels(pixels))
        sims = (c @ q[0]).astype(np.float64)
        logits = self._logit_scale * sims
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        return {'probabilities': probs.tolist(), 'similarities': sims.tolist()}

    async def search(self, query: str, modality: Modality, top_k: int) -> list[dict[str, Any]]:
        """The ``top_k`` index entries nearest to a text or image query: ``[{rank, id, score, path}]``."""
        if self.index is None:
            raise ApiError(404, 'no index is loaded: start the server with --index INDEX_DIR', code='no_index')
        vector = (await self.embed([query], modality, 'query'))[0]
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(self._decode, lambda: self.index.search(vector, top_k)[0])
        return [hit.to_dict() for hit in hits]

    def close(self) -> None:
        for processor in (self._text_batch, self._image_batch):
            if processor._task is not None:  # the library's batching loop: stop it with its event loop
                processor._task.cancel()
        self._forward.shutdown(wait=False, cancel_futures=True)
        self._decode.shutdown(wait=False, cancel_futures=True)
