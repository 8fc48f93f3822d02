"""What a server is allowed to do, as data: limits, batching, authentication and URL fetching."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from modelscope_cnclip.config import finite_number, positive_ints

API_KEY_ENV = 'CNCLIP_API_KEY'
MiB = 1 << 20


def _check_key(key: str, where: str) -> str:
    if not key.strip() or key != key.strip() or not all(33 <= ord(c) < 127 for c in key):
        raise ValueError(f'{where}: an API key must be printable ASCII without blanks (e.g. from `openssl rand -hex '
                         f'32`); unset it for no authentication')
    return key


@dataclass(frozen=True)
class ServeSettings:
    """Limits and options of ``cnclip serve`` (every one is a ``--flag`` of the same name).

    Attributes:
        host, port: where to listen; ``127.0.0.1`` unless told otherwise (``0.0.0.0`` exposes it).
        model_name: the ``model`` id served (``GET /v1/models``); requests may name it, the model's source or nothing.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``; ``None`` reads
            the ``CNCLIP_API_KEY`` environment variable (unset: no authentication).
        max_batch_size: items (texts or images) per model batch, merged across concurrent requests.
        batch_wait_ms: how long a batch waits for more items before it runs, in milliseconds.
        max_items: items per request (``input`` list length, texts or images to rank).
        max_body_bytes: request body size; larger bodies get 413 before they are read in full.
        max_text_chars: characters per text (texts are cut at the model's context length after tokenisation; this
            bounds the tokeniser's work).
        max_top_k: largest ``top_k`` of ``/v1/search``.
        allow_urls: fetch ``http(s)://`` image URLs (off: such inputs are refused). Even when on, loopback,
            private, link-local and other non-public addresses are refused, also after redirects.
        url_timeout_s, url_max_bytes, url_max_redirects: limits of one image URL fetch; max_url_items: image URLs
            per request.
        read_timeout_s: time a client has to send its request headers (then the connection is closed, in the
            single-process server) and its body (then 408).
        limit_concurrency: connections and requests in progress at once; beyond it new ones get 503 (a slow or
            stalled client cannot exhaust the server's file descriptors).
        decode_threads: threads decoding and preprocessing images (0: one per core, up to 8).
        drain_timeout_s: on SIGTERM / Ctrl-C, how long in-flight requests may take to finish.
    """

    host: str = '127.0.0.1'
    port: int = 8000
    model_name: str = 'cnclip'
    api_key: str | None = field(default=None, repr=False)
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    max_items: int = 256
    max_body_bytes: int = 64 * MiB
    max_text_chars: int = 2000
    max_top_k: int = 1000
    allow_urls: bool = False
    url_timeout_s: float = 10.0
    url_max_bytes: int = 20 * MiB
    url_max_redirects: int = 3
    max_url_items: int = 16
    read_timeout_s: float = 30.0
    limit_concurrency: int = 1024
    decode_threads: int = 0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f'port={self.port!r}: expected 0 (any free port) to 65535')
        positive_ints(self, '', ('max_batch_size', 'max_items', 'max_body_bytes', 'max_text_chars', 'max_top_k',
                                 'url_max_bytes', 'max_url_items', 'limit_concurrency'))
        for name in ('batch_wait_ms', 'url_timeout_s', 'drain_timeout_s', 'read_timeout_s'):
            finite_number(self, '', name, 0, math.inf)
        if not isinstance(self.url_max_redirects, int) or self.url_max_redirects < 0:
            raise ValueError(f'url_max_redirects={self.url_max_redirects!r}: expected an integer >= 0')
        if not isinstance(self.decode_threads, int) or self.decode_threads < 0:
            raise ValueError(f'decode_threads={self.decode_threads!r}: expected an integer >= 0 (0: automatic)')
        if self.api_key is not None:
            _check_key(self.api_key, 'api_key')

    @property
    def key(self) -> str | None:
        """The API key in force: ``api_key``, else ``$CNCLIP_API_KEY`` (unset or empty: ``None``, no
        authentication).

        Raises:
            ValueError: a key of blanks only, with surrounding blanks, or with characters outside printable ASCII
                (HTTP headers cannot carry them reliably).
        """
        if self.api_key is not None:
            return self.api_key
        value = os.environ.get(API_KEY_ENV)
        return _check_key(value, API_KEY_ENV) if value else None

    def to_dict(self) -> dict[str, Any]:
        """Every field but the key (safe to log or print)."""
        out = asdict(self)
        out['api_key'] = '<set>' if self.key else None
        return out

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
