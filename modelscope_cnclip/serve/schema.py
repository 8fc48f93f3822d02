"""The HTTP API's requests, parsed and checked as plain functions (no web framework here).

Every parser takes the decoded JSON body and returns a typed request, or raises :class:`ApiError` with the HTTP
status, the parameter and, for one bad item of a list, its index. Bodies follow OpenAI's embeddings API
(https://platform.openai.com/docs/api-reference/embeddings) plus the fields documented in the README's "Serve".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

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
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ApiError(400, f'malformed JSON: {e}', code='invalid_json') from None


_MISSING = object()


def _fields(data: Any, spec: dict[str, tuple[tuple[type, ...], Any]]) -> dict[str, Any]:
    """Check a JSON object against ``{name: (types, default)}`` (``_MISSING``: required); unknown fields are
    ignored, as OpenAI's API does (clients send ``user``, ...). ``bool`` is never an ``int`` here."""
    if not isinstance(data, dict):
        raise ApiError(400, f'the request body must be a JSON object, not {_json_type(data)}',
                       code='invalid_request')
    out = {}
    for name, (types, default) in spec.items():
        value = data.get(name)
        if value is None:  # absent or null: the default
            value = default
        if value is _MISSING:
            raise ApiError(400, f'{name!r} is required', param=name, code='invalid_request')
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            wanted = ' or '.join('array' if t is list else 'string' if t is str else t.__name__ for t in types)
            raise ApiError(400, f'{name}: expected {wanted}, got {_json_type(value)}', param=name,
                           code='invalid_request')
        out[name] = value
    return out


def _json_type(value: Any) -> str:
    return {dict: 'object', list: 'array', str: 'string', bool: 'boolean', int: 'integer', float: 'number',
            type(None): 'null'}.get(type(value), type(value).__name__)


def _choice(fields: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = fields[name]
    if value not in choices:
        raise ApiError(400, f'{name}={value!r}: expected one of {list(choices)}', param=name, code='invalid_request')
    return value


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
            raise ApiError(400, f'{param}[{i}]: expected a string, got {_json_type(item)}', param=param,
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
    if text[:len(IMAGE_URI_PREFIX)].lower() == IMAGE_URI_PREFIX and ';base64,' in text[:100].lower():
        raise ApiError(400, f'{where} is an image data URI sent as text: set "modality": "image"', param=param,
                       index=index, code='image_as_text')
    if len(text) > settings.max_text_chars:
        raise ApiError(413, f'{where}: {len(text):,} characters, more than the limit of {settings.max_text_chars:,} '
                            f'(the model reads only its first tokens anyway)', param=param, index=index,
                       code='text_too_long')


def parse_embeddings(data: Any, settings: ServeSettings) -> EmbeddingsRequest:
    """``POST /v1/embeddings``: ``input`` a string or a list of strings (texts, or images as data URIs / base64 when
    ``modality`` is ``"image"``), ``encoding_format`` ``float`` | ``base64``, optional ``model``."""
    f = _fields(data, {'input': ((str, list), _MISSING), 'model': ((str,), None),
                       'encoding_format': ((str,), 'float'), 'modality': ((str,), 'text'),
                       'dimensions': ((int,), None)})
    encoding = _choice(f, 'encoding_format', ('float', 'base64'))
    modality = _choice(f, 'modality', MODALITIES)
    items = _check_items([f['input']] if isinstance(f['input'], str) else f['input'], 'input', modality, settings)
    if f['dimensions'] is not None:
        raise ApiError(400, 'dimensions: this model\'s embeddings have a fixed size; omit "dimensions"',
                       param='dimensions', code='unsupported')
    return EmbeddingsRequest(items, modality, encoding, f['model'])


def parse_rank(data: Any, settings: ServeSettings) -> RankRequest:
    """``POST /v1/rank``: ``{"image", "texts"}`` (a probability over the texts) or ``{"text", "images"}``."""
    f = _fields(data, {'image': ((str,), None), 'texts': ((list,), None), 'text': ((str,), None),
                       'images': ((list,), None), 'model': ((str,), None)})
    if f['image'] is not None and f['texts'] is not None and f['text'] is None and f['images'] is None:
        if not f['image']:
            raise ApiError(400, 'image: empty image string', param='image', code='empty_input')
        return RankRequest(f['image'], 'image', _check_items(f['texts'], 'texts', 'text', settings), f['model'])
    if f['text'] is not None and f['images'] is not None and f['image'] is None and f['texts'] is None:
        check_text(f['text'], 'text', None, settings)
        return RankRequest(f['text'], 'text', _check_items(f['images'], 'images', 'image', settings), f['model'])
    raise ApiError(400, 'send {"image": ..., "texts": [...]} (which text fits the image) or {"text": ..., "images": '
                        '[...]} (which image fits the text)', code='invalid_request')


def parse_search(data: Any, settings: ServeSettings) -> SearchRequest:
    """``POST /v1/search``: ``query`` (text, or an image with ``"modality": "image"``), ``top_k``."""
    f = _fields(data, {'query': ((str,), _MISSING), 'top_k': ((int,), 10), 'modality': ((str,), 'text'),
                       'model': ((str,), None)})
    modality = _choice(f, 'modality', MODALITIES)
    if not 1 <= f['top_k'] <= settings.max_top_k:
        raise ApiError(400, f'top_k={f["top_k"]}: expected 1 to {settings.max_top_k}', param='top_k',
                       code='invalid_request')
    if modality == 'text':
        check_text(f['query'], 'query', None, settings)
    elif not f['query']:
        raise ApiError(400, 'query: empty image string', param='query', code='empty_input')
    return SearchRequest(f['query'], modality, f['top_k'], f['model'])
