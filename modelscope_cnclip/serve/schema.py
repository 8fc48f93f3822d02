"""The HTTP API's requests, parsed and checked as plain functions (no web framework here).

Every parser takes the decoded JSON body and returns a typed request, or raises :class:`ApiError` with the HTTP
status, the parameter and, for one bad item of a list, its index. Bodies follow OpenAI's embeddings API
(https://platform.openai.com/docs/api-reference/embeddings) plus the fields documented in the README's "Serve".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from modelscope_cnclip.serve.settings import ServeSettings

Modality = Literal['text', 'image']
MODALITIES = ('text', 'image')
IMAGE_URI_PREFIX = 'data:image/'


class ApiError(Exception):
    """An error answered as JSON: ``{"error": {"message", "type", "param", "code", "index"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, index: int | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.index, self.code = status, message, param, index, code
        self.type = type or ('invalid_request_error' if status < 500 else 'server_error')

    def to_dict(self) -> dict[str, Any]:
        return {'error': {'message': self.message, 'type': self.type, 'param': self.param, 'code': self.code,
                          'index': self.index}}


class _Strict(BaseModel):
    # Unknown fields are ignored, as OpenAI's API does (clients send `user`, `dimensions`, ...).
    model_config = ConfigDict(extra='ignore', strict=True)


class _Embeddings(_Strict):
    input: str | list[Any]
    model: str | None = None
    encoding_format: Literal['float', 'base64'] = 'float'
    modality: Modality = 'text'
    dimensions: int | None = None


class _Rank(_Strict):
    image: str | None = None
    texts: list[Any] | None = None
    text: str | None = None
    images: list[Any] | None = None
    model: str | None = None


class _Search(_Strict):
    query: str
    top_k: int = 10
    modality: Modality = 'text'
    model: str | None = None


@dataclass(frozen=True)
class EmbeddingsRequest:
    items: list[str]
    modality: Modality
    encoding_format: str
    model: str | None


@dataclass(frozen=True)
class RankRequest:
    """One query against candidates: ``query_modality`` is the query's; candidates are the other modality."""
    query: str
    query_modality: Modality
    candidates: list[str]
    model: str | None


@dataclass(frozen=True)
class SearchRequest:
    query: str
    modality: Modality
    top_k: int
    model: str | None


def read_json(body: bytes) -> Any:
    """Decode a request body; malformed JSON or text that is not UTF-8 is a 400."""
    if not body.strip():
        raise ApiError(400, 'empty request body: send a JSON object', code='invalid_json')
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, 'the request body is not UTF-8 JSON', code='invalid_json') from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f'malformed JSON: {e.msg} at line {e.lineno} column {e.colno}',
                       code='invalid_json') from None
    except RecursionError:
        raise ApiError(400, 'malformed JSON: nested too deeply', code='invalid_json') from None


def _validate(cls: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, f'the request body must be a JSON object, not {type(data).__name__}',
                       code='invalid_request')
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err['loc'] if not str(p).startswith(('str', 'list['))]
        index = next((p for p in err['loc'] if isinstance(p, int)), None)
        param = str(loc[0]) if loc else None
        message = err['msg']
        if err['type'] == 'missing':
            message = f'{param!r} is required'
        elif param is not None:
            message = f'{param}' + (f'[{index}]' if index is not None else '') + f': {message}'
        raise ApiError(400, message, param=param, index=index, code='invalid_request') from None


def _check_items(items: list[Any], param: str, modality: Modality, settings: ServeSettings) -> list[str]:
    if not items:
        raise ApiError(400, f'{param} is empty: send at least one item', param=param, code='empty_input')
    if len(items) > settings.max_items:
        raise ApiError(413, f'{param} has {len(items)} items, more than the limit of {settings.max_items} a request; '
                            f'split it into several requests', param=param, code='too_many_items')
    for i, item in enumerate(items):
        if isinstance(item, (list, int)) and not isinstance(item, bool):
            raise ApiError(400, f'{param}[{i}]: token ids are not accepted; send the text itself', param=param,
                           index=i, code='token_ids')
        if not isinstance(item, str):
            raise ApiError(400, f'{param}[{i}]: expected a string, got {type(item).__name__}', param=param,
                           index=i, code='invalid_type')
        if modality == 'text':
            check_text(item, param, i, settings)
        elif not item:
            raise ApiError(400, f'{param}[{i}]: empty image string', param=param, index=i, code='empty_input')
    return items


def check_text(text: str, param: str, index: int | None, settings: ServeSettings) -> None:
    where = f'{param}[{index}]' if index is not None else param
    if not text.strip():
        raise ApiError(400, f'{where}: empty text', param=param, index=index, code='empty_input')
    if len(text) > settings.max_text_chars:
        raise ApiError(413, f'{where}: {len(text):,} characters, more than the limit of {settings.max_text_chars:,} '
                            f'(the model reads only its first tokens anyway)', param=param, index=index,
                       code='text_too_long')
    if text.startswith(IMAGE_URI_PREFIX) and ';base64,' in text[:100]:
        raise ApiError(400, f'{where} is an image data URI sent as text: set "modality": "image"', param=param,
                       index=index, code='image_as_text')


def parse_embeddings(data: Any, settings: ServeSettings) -> EmbeddingsRequest:
    """``POST /v1/embeddings``: ``input`` a string or a list of strings (texts, or images as data URIs / base64 when
    ``modality`` is ``"image"``), ``encoding_format`` ``float`` | ``base64``, optional ``model``."""
    req = _validate(_Embeddings, data)
    items = [req.input] if isinstance(req.input, str) else req.input
    items = _check_items(items, 'input', req.modality, settings)
    if req.dimensions is not None:
        raise ApiError(400, 'dimensions: this model\'s embeddings have a fixed size; omit "dimensions"',
                       param='dimensions', code='unsupported')
    return EmbeddingsRequest(items, req.modality, req.encoding_format, req.model)


def parse_rank(data: Any, settings: ServeSettings) -> RankRequest:
    """``POST /v1/rank``: ``{"image", "texts"}`` (a probability over the texts) or ``{"text", "images"}``."""
    req = _validate(_Rank, data)
    if req.image is not None and req.texts is not None and req.text is None and req.images is None:
        if not req.image:
            raise ApiError(400, 'image: empty image string', param='image', code='empty_input')
        return RankRequest(req.image, 'image', _check_items(req.texts, 'texts', 'text', settings), req.model)
    if req.text is not None and req.images is not None and req.image is None and req.texts is None:
        check_text(req.text, 'text', None, settings)
        return RankRequest(req.text, 'text', _check_items(req.images, 'images', 'image', settings), req.model)
    raise ApiError(400, 'send {"image": ..., "texts": [...]} (which text fits the image) or {"text": ..., "images": '
                        '[...]} (which image fits the text)', code='invalid_request')


def parse_search(data: Any, settings: ServeSettings) -> SearchRequest:
    """``POST /v1/search``: ``query`` (text, or an image with ``"modality": "image"``), ``top_k``."""
    req = _validate(_Search, data)
    if not 1 <= req.top_k <= settings.max_top_k:
        raise ApiError(400, f'top_k={req.top_k}: expected 1 to {settings.max_top_k}', param='top_k',
                       code='invalid_request')
    if req.modality == 'text':
        check_text(req.query, 'query', None, settings)
    elif not req.query:
        raise ApiError(400, 'query: empty image string', param='query', code='empty_input')
    return SearchRequest(req.query, req.modality, req.top_k, req.model)
