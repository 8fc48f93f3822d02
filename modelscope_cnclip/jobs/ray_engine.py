"""Scale-out of embedding jobs on Ray Data: the shards of a job become rows of a Ray dataset, mapped by a pool of
actors that each load the model once and write their shards into the same embeddings dir as a local job would.

Local: ``ray.init()`` starts a Ray instance on this machine. A cluster: start it (``ray start --head`` on one node,
``ray start --address=HEAD:6379`` on the others, or a KubeRay/cloud launcher), then pass ``ray_address='auto'``
(on a cluster node) or ``'ray://HEAD:10001'`` (Ray Client). Every worker must be able to read the inputs (a
shared filesystem, URLs, or ``s3://``-style URIs) and the model (a shared path or a ModelScope hub id), and write
``out`` (a shared filesystem).

Before any work is submitted, the job checks that one node can hold a worker (its GPUs and CPUs together; cluster
totals are not enough, a worker runs on one node). On a Ray instance this module started itself, nothing will add
nodes, so a request no node meets is refused at once (``ValueError``). On a cluster given by ``ray_address`` (or one
the caller connected to), an autoscaler may add nodes: the job warns, asks for the resources and waits up to
``schedule_timeout`` seconds (``TimeoutError``). Errors raised in a worker reach the caller as the same exception,
with the same message, as in a local job.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from modelscope_cnclip.config import DEFAULT_SCHEDULE_TIMEOUT
from modelscope_cnclip.inference import CNClip
from modelscope_cnclip.jobs.collection import Collection
from modelscope_cnclip.jobs.shards import ShardSettings, embed_shard
from modelscope_cnclip.transform import max_image_pixels
from modelscope_cnclip.utils import default_threads

__all__ = ['RayOptions', 'run_ray', 'ShardWorker', 'WorkerRequest', 'unschedulable', 'DEFAULT_SCHEDULE_TIMEOUT']

logger = logging.getLogger(__name__)

_POLL_S = 2.0  # how often a wait for nodes looks at the cluster again
_started_here: str | None = None  # the GCS address of the Ray instance run_ray started in this process


@dataclass(frozen=True)
class RayOptions:
    """Where and how a job runs on Ray (validated on creation).

    Attributes:
        address: the cluster (``'auto'`` on a cluster node, ``'ray://HEAD:10001'``); ``None`` starts a local Ray
            instance.
        workers: actors, each loading the model once (default: one per GPU with ``gpus_per_worker``, else 1).
        gpus_per_worker: GPUs per actor (0: CPU workers).
        schedule_timeout: seconds to wait for a node of an external cluster that can hold a worker (an autoscaler
            may add one) before giving up (``None``: no limit); a Ray instance the job starts itself refuses such a
            request at once.
    Raises:
        ValueError: a value out of range (named).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    schedule_timeout: float | None = DEFAULT_SCHEDULE_TIMEOUT

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f'workers={self.workers!r}: expected a whole number >= 1 (Ray actors)')
        if not (isinstance(self.gpus_per_worker, (int, float)) and 0 <= self.gpus_per_worker < float('inf')):
            raise ValueError(f'gpus_per_worker={self.gpus_per_worker!r}: expected a number >= 0 (0: CPU workers)')
        if self.schedule_timeout is not None and not (isinstance(self.schedule_timeout, (int, float))
                                                      and 0 <= self.schedule_timeout < float('inf')):
            raise ValueError(f'schedule_timeout={self.schedule_timeout!r}: expected seconds >= 0, or None for no '
                             f'limit')


class ShardWorker:
    """A Ray actor's callable: loads the model once, then embeds and writes the shards it is given.

    It never raises: Ray would wrap the error (``ActorDiedError``, ``RayTaskError(UserCodeException)``) in a
    message holding the remote traceback and drop the original exception, so an error travels back as data (the
    pickled exception, and ``"Type: message"`` in case the driver cannot rebuild it) and the driver re-raises it.
    An error while loading the model is reported with the first shard.
    """

    def __init__(self, source: str, fingerprint: str, device: str, precision: str, fast_decode: bool,
                 coll: Collection, out: str, settings: ShardSettings, batch_size: int,
                 max_image_pixels: int | None = None, backend: str = 'torch') -> None:
        self.coll, self.out, self.settings, self.batch_size = coll, Path(out), settings, [batch_size]
        # a worker's share of the node: OMP_NUM_THREADS as Ray sets it from the actor's CPUs
        self.threads = settings.num_threads or default_threads(int(os.environ.get('OMP_NUM_THREADS', '0')) or 8)
        self.load_error: tuple[str, bytes] | None = None
        try:
            self.model = _load_on_worker(source, fingerprint, device, precision, fast_decode, max_image_pixels,
                                         backend)
        except Exception as e:  # re-raised on the driver with the first shard (see the class docstring)
            self.load_error = _pack(e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards = [int(k) for k in batch['shard']]
        error = self.load_error
        if error is None:
            try:
                return _result(shards, *self._embed(shards))
            except Exception as e:  # re-raised on the driver (see the class docstring)
                error = _pack(e)
        return _result(shards, [0] * len(shards), [0] * len(shards), error)

    def _embed(self, shards: list[int]) -> tuple[list[int], list[int]]:
        """Embed and write ``shards``; returns their (embedded, failed) counts."""
        from concurrent.futures import ThreadPoolExecutor

        done, failed = [], []
        with ThreadPoolExecutor(self.threads, thread_name_prefix='cnclip-ray') as pool:
            for k in shards:
                n, bad = embed_shard(self.model, self.coll, self.out, k, self.settings, self.batch_size, pool=pool)
                done.append(n)
                failed.append(bad)
        return done, failed


def _load_on_worker(source: str, fingerprint: str, device: str, precision: str, fast_decode: bool,
                    max_pixels: int | None, backend: str = 'torch') -> CNClip:
    """Load the driver's model on a worker and check it is the same one."""
    from modelscope_cnclip.inference import load
    from modelscope_cnclip.transform import set_max_image_pixels
    set_max_image_pixels(max_pixels)  # the driver's limit, also on nodes that did not inherit its env
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'gpus_per_worker > 0, but the Ray worker on {socket.gethostname()} sees no CUDA device '
                         f'(torch.cuda.is_available() is False): install a CUDA build of torch on the GPU nodes, or '
                         f'drop --gpus-per-worker to run on CPUs')
    model = load(source, device=device, precision=precision, fast_decode=fast_decode, backend=backend)
    if model.fingerprint != fingerprint:
        raise ValueError(f'the model at {source!r} on the Ray worker on {socket.gethostname()} differs from the '
                         f'driver\'s (fingerprint {model.fingerprint} vs {fingerprint}); give every node the same '
                         f'weights')
    return model


def _result(shards: list[int], done: Sequence[int], failed: Sequence[int],
            error: tuple[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """One output row per shard; a packed ``error`` (see :func:`_pack`) is set on every row when it failed."""
    text, packed = error or ('', b'')
    n = len(shards)
    return {'shard': np.asarray(shards), 'embedded': np.asarray(done), 'failed': np.asarray(failed),
            'error': np.asarray([text] * n, dtype=object), 'exception': np.asarray([packed] * n, dtype=object)}


def _pack(error: Exception) -> tuple[str, bytes]:
    """``("Type: message", pickled exception)`` of a worker's error; the worker's traceback rides along as a note
    (shown with ``cnclip -v``, not in the one-line message)."""
    if hasattr(error, 'add_note'):  # Python >= 3.11
        error.add_note(f'raised on the Ray worker on {socket.gethostname()} (pid {os.getpid()}):\n'
                       + ''.join(traceback.format_exception(error)).rstrip())
    try:
        packed = pickle.dumps(error)
        pickle.loads(packed)
    except Exception:  # an exception class that does not pickle: the driver gets "Type: message"
        packed = b''
    return f'{type(error).__name__}: {error}', packed


def _raise_worker_error(row: Mapping[str, Any]) -> None:
    """Re-raise the error a :class:`ShardWorker` returned in ``row``, if any."""
    if not row['error']:
        return
    try:
        error = pickle.loads(row['exception'])
    except Exception:  # no packed exception, or a class this process cannot import
        error = None
    if not isinstance(error, Exception):
        error = RuntimeError(f'a Ray worker failed: {row["error"]}')
    raise error


# --- where workers can run ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerRequest:
    """What one Ray worker asks of a node."""

    cpus: float
    gpus: float = 0.0

    def fits(self, node: Mapping[str, float]) -> bool:
        """Whether a node with these total resources can hold the worker."""
        return node.get('CPU', 0.0) >= self.cpus and node.get('GPU', 0.0) >= self.gpus

    def bundle(self) -> dict[str, float]:
        """The request as a placement-group bundle (Ray refuses zero amounts)."""
        return {k: v for k, v in (('CPU', self.cpus), ('GPU', self.gpus)) if v > 0}


def worker_request(nodes: Sequence[Mapping[str, float]], workers: int, gpus_per_worker: float) -> WorkerRequest:
    """A GPU worker takes one CPU; CPU workers share the cluster's CPUs, each asking for at most what the largest
    node has (more would never be scheduled) and at least one."""
    if gpus_per_worker:
        return WorkerRequest(1.0, gpus_per_worker)
    total = sum(n.get('CPU', 0.0) for n in nodes)
    largest = max((n.get('CPU', 0.0) for n in nodes), default=0.0)
    return WorkerRequest(max(1.0, min(total / workers, largest)))


def _amount(n: float, unit: str) -> str:
    return f'{n:g} {unit}' + ('s' if n == 0 or n > 1 else '')


def _describe(nodes: Sequence[Mapping[str, float]]) -> str:
    """``"2 nodes: 8 CPUs + 1 GPU, 8 CPUs + 1 GPU"``: each node's total resources."""
    each = ', '.join(f'{_amount(n.get("CPU", 0.0), "CPU")} + {_amount(n.get("GPU", 0.0), "GPU")}'
                     for n in nodes[:8]) + (', ...' if len(nodes) > 8 else '')
    return f'{_amount(len(nodes), "node")}: {each}'


def unschedulable(request: WorkerRequest, nodes: Sequence[Mapping[str, float]], where: str) -> str | None:
    """Why no node of ``nodes`` (each node's total resources) can hold a worker asking for ``request``, with the
    fix, as one line; ``None`` when one can. ``where`` names the cluster (``"this Ray instance"``)."""
    if any(request.fits(n) for n in nodes):
        return None
    gpus = sum(n.get('GPU', 0.0) for n in nodes)
    most_gpus = max((n.get('GPU', 0.0) for n in nodes), default=0.0)
    if request.gpus > most_gpus:
        need = (f'--gpus-per-worker {request.gpus:g} (gpus_per_worker={request.gpus:g}) needs a node with '
                f'{_amount(request.gpus, "GPU")}')
        if not gpus:
            cpus = sum(n.get('CPU', 0.0) for n in nodes)
            return (f'{need}; {where} has 0 GPUs (CPUs: {cpus:g}): drop --gpus-per-worker to run on CPUs, or use a '
                    f'cluster with GPUs')
        return (f'{need}; {where} has at most {_amount(most_gpus, "GPU")} on one node ({_describe(nodes)}): lower '
                f'--gpus-per-worker to {most_gpus:g} or less, or drop it to run on CPUs')
    need = f'a Ray worker needs a node with {_amount(request.cpus, "CPU")}'
    if request.gpus:
        need += f' and {_amount(request.gpus, "GPU")}'
    return (f'{need}; {where} has none ({_describe(nodes)}): give a node CPUs (ray start --num-cpus N), or drop '
            f'--gpus-per-worker to run on CPU nodes')


def _alive_nodes(ray: ModuleType) -> list[dict[str, float]]:
    """Each live node's total resources."""
    return [dict(n.get('Resources', {})) for n in ray.nodes() if n.get('Alive')]


def _wait_for_node(ray: ModuleType, request: WorkerRequest, where: str, timeout: float | None) -> None:
    """Return once a node can hold a worker, waiting up to ``timeout`` seconds (``None``: no limit) for a cluster
    to grow; a pending placement group makes the wanted resources visible to an autoscaler meanwhile."""
    reason = unschedulable(request, _alive_nodes(ray), where)
    if reason is None:
        return
    limit = 'no time limit' if timeout is None else f'up to {timeout:g} s (--schedule-timeout)'
    logger.warning('Ray: %s. Waiting %s for a node that can hold a worker (an autoscaler may add one)', reason, limit)
    from ray.util.placement_group import placement_group, remove_placement_group
    group = placement_group([request.bundle()], strategy='STRICT_PACK')
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            left = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            if group.wait(left) or unschedulable(request, _alive_nodes(ray), where) is None:
                logger.info('Ray: a node that can hold a worker has joined')
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f'no node could hold a Ray worker after waiting {timeout:g} s (schedule_timeout, '
                                   f'CLI: --schedule-timeout): {reason}')
    finally:
        remove_placement_group(group)


# --- the job ------------------------------------------------------------------------------------------------------

def _import_ray() -> ModuleType:
    try:
        import ray
        import ray.data  # noqa: F401  # Ray Data is an extra of ray
    except ImportError:
        raise ImportError('engine="ray" needs Ray Data: pip install "modelscope_cnclip[ray]"') from None
    return ray


def _connect(ray: ModuleType, address: str | None) -> bool:
    """Connect to Ray at ``address``, or start a local instance when there is none; returns whether the instance
    is one this module started (whose nodes are all there is: no autoscaler will add any)."""
    global _started_here
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False,
                 **({} if address else {'num_cpus': os.cpu_count()}))
        if not address:  # with num_cpus, ray.init only succeeds by starting a new instance
            _started_here = ray.get_runtime_context().gcs_address
    return not address and _started_here is not None and ray.get_runtime_context().gcs_address == _started_here


def _ensure_schedulable(ray: ModuleType, own: bool, address: str | None, request: WorkerRequest,
                        nodes: Sequence[Mapping[str, float]], timeout: float | None) -> None:
    """Refuse at once (a Ray instance this module started: ``own``) or after waiting up to ``timeout`` seconds (a
    cluster, which may grow) a worker request that no node can meet."""
    if not own:
        _wait_for_node(ray, request, f'the Ray cluster at {address}' if address else 'the Ray cluster', timeout)
        return
    reason = unschedulable(request, nodes, 'this Ray instance')
    if reason is not None:
        raise ValueError(reason)


def _collect(ray: ModuleType, results: Any) -> list[int]:
    """Run the job; returns the shards written. The first error stops it, as in a local job."""
    written = []
    try:
        for row in results.iter_rows():
            _raise_worker_error(row)
            written.append(int(row['shard']))
    except ray.exceptions.RayError as e:
        raise _ray_failure(ray, e) from e
    return sorted(written)


def _ray_failure(ray: ModuleType, error: Exception) -> Exception:
    """What a failure Ray raised stands for: a task's own exception when Ray kept it, else a one-line
    ``RuntimeError`` (a worker killed, e.g. out of memory, or a node lost)."""
    cause = getattr(error, 'cause', None)
    if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
        return cause
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return RuntimeError(f'the Ray job failed ({type(error).__name__}: {first.strip()}); rerun the same command to '
                        f'finish it (the shards written so far are kept)')


def run_ray(model: CNClip, coll: Collection, out: Path, todo: list[int], settings: ShardSettings, batch_size: int,
            options: RayOptions = RayOptions()) -> None:
    """Embed shards ``todo`` of ``coll`` into ``out`` on Ray (see the module docstring for clusters), each as
    ``settings`` say, ``batch_size`` inputs per forward pass.

    Raises:
        ValueError: no node of a Ray instance this function started can hold a worker.
        TimeoutError: none of a cluster's nodes could after ``options.schedule_timeout`` seconds.
        Exception: the error a worker raised (same type and message as in a local job).
    """
    address, gpus_per_worker = options.address, options.gpus_per_worker
    ray = _import_ray()
    if not model.source:
        raise ValueError('engine="ray": the model has no source path or hub id to load on the workers; load it with '
                         'modelscope_cnclip.load(PATH_OR_HUB_ID)')
    own = _connect(ray, address)
    nodes = _alive_nodes(ray)
    gpus = sum(n.get('GPU', 0.0) for n in nodes)
    workers = min(options.workers or (max(1, int(gpus // gpus_per_worker)) if gpus_per_worker else 1), len(todo))
    request = worker_request(nodes, workers, gpus_per_worker)
    _ensure_schedulable(ray, own, address, request, nodes, options.schedule_timeout)
    device = 'cuda' if gpus_per_worker else 'cpu'
    kwargs = dict(source=model.source, fingerprint=model.fingerprint, device=device, precision=model.precision,
                  backend=model.backend,
                  fast_decode=model.transform.fast_decode, coll=coll, out=str(out.resolve()), settings=settings,
                  batch_size=batch_size, max_image_pixels=max_image_pixels())
    logger.info('Ray: %d shards over %d workers (%s, %s each; %s)', len(todo), workers, device, request.bundle(),
                _describe(nodes))
    ds = ray.data.from_items([{'shard': k} for k in todo], override_num_blocks=len(todo))
    results = ds.map_batches(ShardWorker, fn_constructor_kwargs=kwargs, batch_size=1,
                             compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=request.cpus,
                             num_gpus=request.gpus or None)
    written = _collect(ray, results)
    if written != sorted(todo):
        raise RuntimeError(f'Ray finished shards {sorted(written)} but {sorted(todo)} were asked for; rerun to resume')
