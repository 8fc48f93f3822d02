"""Running the app: one process with uvicorn (the default), or replicas on Ray Serve.

Both serve the same :func:`~modelscope_cnclip.serve.app.create_app` with the same :class:`ServeSettings`; on Ray
each replica loads its own model and batches its own requests, and Ray Serve's proxy spreads requests over the
replicas (autoscaled between a minimum and a maximum when asked).
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from modelscope_cnclip.serve.settings import ServeSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What to load in each process or replica: a model source and how, plus an optional index dir.

    ``load_options`` are :func:`modelscope_cnclip.load`'s keywords (device, precision, backend, config).
    """

    source: str
    load_options: dict[str, Any] = field(default_factory=dict)
    index: str | None = None

    def build(self, settings: ServeSettings, device: str | None = None) -> Any:
        """Load the model (and index) and return an :class:`EmbeddingService`."""
        from modelscope_cnclip.index import Index
        from modelscope_cnclip.inference import load
        from modelscope_cnclip.serve.service import EmbeddingService
        options = dict(self.load_options)
        if device is not None:
            options['device'] = device
        model = load(self.source, **options)
        index = Index.load(self.index) if self.index else None
        try:
            return EmbeddingService(model, settings, index)
        except ValueError as e:
            raise ValueError(f'--index {self.index}: {e}') from None


def header_timeout_protocol(seconds: float) -> Any:
    """uvicorn's httptools protocol, closing a connection whose request line and headers do not all arrive within
    ``seconds`` (uvicorn waits forever for them: a slow-headers client would hold a connection indefinitely). The
    body has its own limit (``read_timeout_s`` in :func:`~modelscope_cnclip.serve.app.read_body`). Without httptools,
    ``'auto'`` (uvicorn's default, no header limit)."""
    import asyncio
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return 'auto'

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = asyncio.get_running_loop().call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            logger.info('closing a connection whose request headers took more than %g s', seconds)
            self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a client that connects and sends nothing

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # every request on the connection, keep-alive ones too

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def serve_local(spec: ModelSpec, settings: ServeSettings, *, ready: Callable[[Any], None] | None = None) -> int:
    """Serve in this process until SIGTERM / SIGINT; in-flight requests are drained (up to
    ``settings.drain_timeout_s``; requests still running then get 503) and the process then ends through the
    signal, as uvicorn re-raises it (exit status 143 for SIGTERM). Returns 0 when stopped otherwise; raises the
    loading error when the model (or index) cannot be loaded, after stopping the server.

    The port is bound at once; the model loads in the background (``GET /health``: 503 until it is ready).
    ``ready(server)`` is called with the uvicorn server once it listens (tests use it to read the bound port).
    """
    import socket

    import uvicorn

    from modelscope_cnclip.serve.app import create_app
    try:  # a clear error for a taken port or an unknown host, before anything is loaded
        family = socket.AF_INET6 if ':' in settings.host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    except OSError as e:
        raise OSError(f'cannot listen on {settings.host}:{settings.port} ({e.strerror or e}); choose another --port '
                      f'or --host') from None
    app = create_app(lambda: spec.build(settings), settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level='warning', access_log=False,
                            timeout_graceful_shutdown=settings.drain_timeout_s, lifespan='on',
                            limit_concurrency=settings.limit_concurrency,
                            http=header_timeout_protocol(settings.read_timeout_s))
    server = uvicorn.Server(config)
    state = app.state.cnclip

    def watch() -> None:  # stop the server when loading fails, so the command exits with the error
        while not server.should_exit:
            if state.error is not None:
                logger.error('stopping: %s', state.error)
                server.should_exit = True
                return
            if state.service is not None and server.started:
                port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port
                logger.warning('ready: http://%s:%d (model %s)', settings.host, port, spec.source)
                if ready is not None:
                    ready(server)
                return
            threading.Event().wait(0.05)

    threading.Thread(target=watch, name='cnclip-watch', daemon=True).start()
    logger.warning('serving %s on http://%s:%d (model loading; GET /health)', spec.source, settings.host,
                   settings.port)
    server.run()
    if state.exception is not None:
        raise state.exception
    return 0


@dataclass(frozen=True)
class RayServeOptions:
    """How the app deploys on Ray Serve.

    Attributes:
        address: the Ray cluster (``ray://host:10001``, ``auto``); ``None`` starts a local Ray instance.
        replicas: fixed replica count, when ``autoscale`` is not given.
        autoscale: ``(min_replicas, max_replicas)``: Ray Serve adds replicas while each has more than
            ``target_ongoing`` requests in flight and removes idle ones.
        target_ongoing: requests in flight per replica that autoscaling aims at.
        gpus_per_replica, cpus_per_replica: resources each replica reserves (a GPU replica loads on ``cuda``).
        max_ongoing_requests: requests one replica accepts at once (queued beyond that by Ray Serve's proxy).
    """

    address: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_ongoing: float = 16.0
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 256

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f'replicas={self.replicas}: expected at least 1')
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f'autoscale={self.autoscale}: expected (min, max) with 0 <= min <= max, max >= 1')
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError('gpus_per_replica and cpus_per_replica must be >= 0')

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            'ray_actor_options': {'num_cpus': self.cpus_per_replica, 'num_gpus': self.gpus_per_replica},
            'max_ongoing_requests': self.max_ongoing_requests,
            'health_check_period_s': 10}
        if self.autoscale is not None:
            options['autoscaling_config'] = {'min_replicas': self.autoscale[0], 'max_replicas': self.autoscale[1],
                                             'initial_replicas': max(1, self.autoscale[0]),
                                             'target_ongoing_requests': self.target_ongoing}
        else:
            options['num_replicas'] = self.replicas
        return options


def ray_application(spec: ModelSpec, settings: ServeSettings, options: RayServeOptions) -> Any:
    """The Ray Serve application (``serve.run(...)`` it, or ``serve deploy`` a config that imports it)."""
    from ray import serve

    device = 'cuda' if options.gpus_per_replica > 0 else None

    def build_app() -> Any:  # runs in each replica
        from modelscope_cnclip.serve.app import create_app
        return create_app(spec.build(settings, device=device), settings)

    deployment = serve.deployment(serve.ingress(build_app)(), name='cnclip', **options.deployment_options())
    return deployment.bind()


def serve_ray(spec: ModelSpec, settings: ServeSettings, options: RayServeOptions, *,
              stop: threading.Event | None = None) -> int:
    """Deploy on Ray Serve, listening on ``settings.host:port``, and block until SIGTERM / SIGINT (or ``stop``);
    then Serve shuts down (draining in-flight requests)."""
    import ray
    from ray import serve

    settings = replace(settings, api_key=settings.key)  # replicas may not see this process's environment
    if options.address is None:
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    else:
        ray.init(address=options.address, configure_logging=False)
    stop = stop or threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)
                if threading.current_thread() is threading.main_thread()}
    try:
        serve.start(http_options={'host': settings.host, 'port': settings.port},
                    graceful_shutdown_timeout_s=settings.drain_timeout_s)
        serve.run(ray_application(spec, settings, options), name='cnclip', route_prefix='/')
        logger.warning('serving %s on Ray Serve at http://%s:%d (%s)', spec.source, settings.host, settings.port,
                       f'autoscale {options.autoscale}' if options.autoscale else f'{options.replicas} replica(s)')
        stop.wait()
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        serve.shutdown()
        if options.address is None:
            ray.shutdown()


def app_builder(args: dict[str, Any]) -> Any:
    """A Ray Serve application builder, for ``serve run`` / ``serve deploy`` config files and KubeRay RayServices::

        applications:
          - name: cnclip
            route_prefix: /
            import_path: modelscope_cnclip.serve.server:app_builder
            args: {model: /models/vitb16, index: /data/photos.index, precision: bf16, replicas: 2}

    ``args``: ``model`` (required), ``index``, :func:`modelscope_cnclip.load` options (``device``, ``precision``,
    ``backend``, ``config``), any :class:`ServeSettings` field (``api_key`` is best left to the ``CNCLIP_API_KEY``
    environment variable of the replicas), and :class:`RayServeOptions` fields (``replicas``, ``autoscale`` as
    ``[min, max]``, ``gpus_per_replica``, ...; ``address`` is the cluster's own).

    Raises:
        ValueError: an unknown or missing argument, named.
    """
    args = dict(args)
    if 'model' not in args:
        raise ValueError('app_builder args: "model" (a model source) is required')
    load_keys = ('device', 'precision', 'backend', 'config')
    ray_keys = tuple(f for f in RayServeOptions.__dataclass_fields__ if f != 'address')
    unknown = set(args) - {'model', 'index', *load_keys, *ServeSettings.names(), *ray_keys}
    if unknown:
        raise ValueError(f'app_builder args: unknown {sorted(unknown)}; known: model, index, {", ".join(load_keys)}, '
                         f'{", ".join(ServeSettings.names())}, {", ".join(ray_keys)}')
    spec = ModelSpec(str(args.pop('model')), {k: args.pop(k) for k in load_keys if k in args}, args.pop('index', None))
    ray_options = {k: args.pop(k) for k in ray_keys if k in args}
    if 'autoscale' in ray_options and ray_options['autoscale'] is not None:
        ray_options['autoscale'] = tuple(ray_options['autoscale'])
    return ray_application(spec, ServeSettings(**args), RayServeOptions(**ray_options))
