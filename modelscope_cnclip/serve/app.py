"""The HTTP application (FastAPI): routes, authentication, limits, JSON errors and Prometheus metrics.

``create_app`` wraps an :class:`~modelscope_cnclip.serve.service.EmbeddingService` (or a function that loads one in
the background, so ``/health`` answers 503 until the model is ready). The same app runs in the single-process server
(uvicorn) and in each Ray Serve replica.
"""
import base64
import hmac
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import numpy as np

from modelscope_cnclip.serve.schema import ApiError, parse_embeddings, parse_rank, parse_search, read_json
from modelscope_cnclip.serve.service import EmbeddingService
from modelscope_cnclip.serve.settings import API_KEY_ENV, ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations (Request), which
# live in create_app's scope, where the web framework is imported on first use.
logger = logging.getLogger(__name__)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Prometheus metrics of one app, in their own registry (``GET /metrics``)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        self.requests = Counter('cnclip_requests', 'HTTP requests answered', ['route', 'status'],
                                registry=self.registry)
        self.errors = Counter('cnclip_request_errors', 'requests answered with an error', ['route', 'code'],
                              registry=self.registry)
        self.latency = Histogram('cnclip_request_seconds', 'request latency', ['route'], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.items = Counter('cnclip_items', 'texts and images embedded', ['modality'], registry=self.registry)
        self.batch = Histogram('cnclip_batch_size', 'items per model batch', ['modality'], buckets=BATCH_BUCKETS,
                               registry=self.registry)
        self.ready = Gauge('cnclip_model_ready', '1 once the model is loaded', registry=self.registry)

    def on_batch(self, modality: str, n: int) -> None:
        self.batch.labels(modality).observe(n)
        self.items.labels(modality).inc(n)

    def render(self) -> 'Response':
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _State:
    """The service once loaded, or why it is not."""

    def __init__(self) -> None:
        self.service: EmbeddingService | None = None
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.started = int(time.time())


async def read_body(request: 'Request', limit: int, timeout: float = 30.0) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed), with 415 when
    it is compressed, and with 408 when the client has not sent all of it within ``timeout`` seconds."""
    import asyncio
    encoding = request.headers.get('content-encoding', 'identity').strip().lower()
    if encoding not in ('', 'identity'):
        raise ApiError(415, f'Content-Encoding {encoding!r} is not supported: send the JSON uncompressed',
                       code='unsupported_encoding')
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f'the request body did not arrive within {timeout:g} s', code='timeout') from None


async def _read_body(request: 'Request', limit: int) -> bytes:
    declared = request.headers.get('content-length', '')
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f'request body of {int(declared):,} bytes is more than the limit of {limit:,}',
                       code='body_too_large')
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f'request body is more than the limit of {limit:,} bytes', code='body_too_large')
        chunks.append(chunk)
    return b''.join(chunks)


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One embedding as OpenAI sends it: a list of floats, or base64 of little-endian float32 bytes."""
    vector = np.asarray(vector, dtype='<f4')
    return base64.b64encode(vector.tobytes()).decode('ascii') if encoding_format == 'base64' else vector.tolist()


def create_app(service: EmbeddingService | Callable[[], EmbeddingService], settings: ServeSettings | None = None,
               ) -> 'FastAPI':
    """The FastAPI app of ``cnclip serve``.

    Args:
        service: a loaded service, or a function that loads one (called in a thread at startup; until it returns,
            ``/health`` answers 503 and other routes 503 ``model_loading``; if it raises, ``/health`` says why).
        settings: limits and the API key (default: :class:`ServeSettings`'s defaults).

    Routes: ``POST /v1/embeddings``, ``POST /v1/rank``, ``POST /v1/search``, ``GET /v1/models``, ``GET /health``,
    ``GET /metrics``. Errors are ``{"error": {"message", "type", "param", "code", "index"}}`` with a 4xx status
    (5xx only for faults on the server, logged there, never with a stack trace in the answer).
    """
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    settings = settings or ServeSettings()
    state, metrics = _State(), Metrics()
    key = settings.key

    def adopt(svc: EmbeddingService) -> None:
        svc.on_batch = metrics.on_batch
        state.service = svc
        metrics.ready.set(1)

    def load_in_background(loader: Callable[[], EmbeddingService]) -> None:
        try:
            adopt(loader())
            logger.info('model loaded: %s', state.service.model.source)
        except Exception as e:  # noqa: BLE001 - reported by /health and by the CLI
            state.error, state.exception = f'{type(e).__name__}: {e}', e
            logger.error('cannot load the model: %s', state.error)

    async def lifespan(app: Any):  # type: ignore[no-untyped-def]
        if isinstance(service, EmbeddingService):
            adopt(service)
        else:
            threading.Thread(target=load_in_background, args=(service,), name='cnclip-load', daemon=True).start()
        yield
        if state.service is not None:
            state.service.close()

    # with a key, the API description is not published either (every route but /health needs the key)
    docs = {} if key is None else {'docs_url': None, 'openapi_url': None}
    app = FastAPI(title='modelscope_cnclip', description='Chinese CLIP embeddings, ranking and search '
                  '(OpenAI embeddings API)', lifespan=lifespan, redoc_url=None, **docs)
    logger.warning('authentication: %s', 'Bearer key required' if key else
                   f'off (set {API_KEY_ENV} or --api-key to require a key)')
    app.state.cnclip = state
    app.state.metrics = metrics

    def ready() -> EmbeddingService:
        if state.service is None:
            raise ApiError(503, f'the model failed to load: {state.error}' if state.error else
                           'the model is still loading; retry when GET /health answers 200', code='model_loading')
        return state.service

    async def body(request: Request) -> Any:
        return read_json(await read_body(request, settings.max_body_bytes, settings.read_timeout_s))

    def check_model(name: str | None, svc: EmbeddingService) -> str:
        if name is None or name in (settings.model_name, Path(svc.model.source).name):
            return settings.model_name
        raise ApiError(404, f'model {name!r} is not served here; this server serves {settings.model_name!r} '
                            f'(GET /v1/models)', param='model', code='model_not_found')

    def authorize(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get('authorization', '')
        scheme, _, token = header.partition(' ')
        if scheme.lower() != 'bearer' or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, 'missing or wrong API key: send "Authorization: Bearer <key>"',
                           type='authentication_error', code='invalid_api_key')

    async def answer(route: str, request: Request, handler: Callable[[], Awaitable[Any]], *,
                     auth: bool = True) -> Response:
        start = time.perf_counter()
        try:
            if auth:
                authorize(request)
            result = await handler()
            response = result if isinstance(result, Response) else JSONResponse(result)
        except ClientDisconnect:  # the client left mid-request: nobody to answer, nothing wrong here
            metrics.errors.labels(route, 'client_disconnected').inc()
            metrics.requests.labels(route, '499').inc()
            return Response(status_code=499)
        except asyncio.CancelledError:  # shutting down past the drain timeout
            metrics.errors.labels(route, 'shutting_down').inc()
            metrics.requests.labels(route, '503').inc()
            return JSONResponse(ApiError(503, 'the server is shutting down; retry', code='shutting_down').to_dict(),
                                status_code=503)
        except ApiError as e:
            metrics.errors.labels(route, e.code or str(e.status)).inc()
            headers = {'WWW-Authenticate': 'Bearer'} if e.status == 401 else None
            response = JSONResponse(e.to_dict(), status_code=e.status, headers=headers)
        except Exception:  # noqa: BLE001 - logged here, answered without details
            incident = uuid.uuid4().hex[:12]
            logger.exception('internal error on %s (incident %s)', route, incident)
            metrics.errors.labels(route, 'internal').inc()
            response = JSONResponse(ApiError(500, f'internal error (incident {incident}; details are in the '
                                                  f'server log)', code='internal').to_dict(), status_code=500)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    def post(path: str, parse: Callable[[Any, ServeSettings], Any],
             run: Callable[[EmbeddingService, Any, str], Awaitable[dict[str, Any]]]) -> None:
        """Register ``POST path``: parse the body, check the model name, ``run(service, request, model name)``."""
        async def endpoint(request: Request) -> Response:
            async def handle() -> dict[str, Any]:
                svc = ready()
                req = parse(await body(request), settings)
                return await run(svc, req, check_model(req.model, svc))
            return await answer(path, request, handle)
        endpoint.__name__ = path.strip('/').replace('/', '_')
        app.add_api_route(path, endpoint, methods=['POST'])

    async def embeddings(svc: EmbeddingService, req: Any, name: str) -> dict[str, Any]:
        if req.modality == 'text':  # the token counts are the usage, and the check for texts with none
            tokens = sum(svc.check_texts(req.items, 'input'))
            vectors = await svc.embed_texts(req.items)
        else:
            tokens, vectors = 0, await svc.embed_images(req.items)
        return {'object': 'list', 'model': name,
                'data': [{'object': 'embedding', 'index': i, 'embedding': encode_vector(v, req.encoding_format)}
                         for i, v in enumerate(vectors)],
                'usage': {'prompt_tokens': tokens, 'total_tokens': tokens}}

    async def rank(svc: EmbeddingService, req: Any, name: str) -> dict[str, Any]:
        scores = await svc.rank(req.query, req.query_modality, req.candidates)
        return {'object': 'rank', 'model': name, 'query_modality': req.query_modality, **scores}

    async def search(svc: EmbeddingService, req: Any, name: str) -> dict[str, Any]:
        return {'object': 'list', 'model': name, 'data': await svc.search(req.query, req.modality, req.top_k)}

    post('/v1/embeddings', parse_embeddings, embeddings)
    post('/v1/rank', parse_rank, rank)
    post('/v1/search', parse_search, search)

    @app.get('/v1/models')
    async def models(request: Request) -> Response:
        async def handle() -> dict[str, Any]:
            svc = ready()
            info = {'id': settings.model_name, 'object': 'model', 'created': state.started,
                    'owned_by': 'modelscope_cnclip', 'backend': 'torch', **svc.model.info(),
                    'source': Path(svc.model.source).name,  # not the server's directories
                    'modalities': ['text', 'image'], 'index': None}
            if svc.index is not None:  # without the server's directories
                index = svc.index.info()
                info['index'] = {k: index[k] for k in ('count', 'dim', 'kind', 'modality')}
            return {'object': 'list', 'data': [info]}
        return await answer('/v1/models', request, handle)

    @app.get('/health')
    async def health(request: Request) -> Response:
        async def handle() -> Response:
            if state.service is None:
                status = 'failed' if state.error else 'loading'
                return JSONResponse({'status': status, 'error': state.error}, status_code=503)
            return JSONResponse({'status': 'ok', 'model': settings.model_name})
        return await answer('/health', request, handle, auth=False)

    @app.get('/metrics')
    async def prometheus(request: Request) -> Response:
        async def handle() -> Response:
            return metrics.render()
        return await answer('/metrics', request, handle)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: 'not_found', 405: 'method_not_allowed'}.get(exc.status_code, 'http_error')
        message = (f'no route {request.method} {request.url.path}' if exc.status_code in (404, 405)
                   else str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, message, code=code).to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse(ApiError(400, str(exc.errors()[:1]), code='invalid_request').to_dict(), status_code=400)

    return app
