"""Scale-out of embedding jobs on Ray Data: the shards of a job become rows of a Ray dataset, mapped by a pool of
actors that each load the model once and write their shards into the same embeddings dir as a local job would.

Local: ``ray.init()`` starts a Ray instance on this machine. A cluster: start it (``ray start --head`` on one node,
``ray start --address=HEAD:6379`` on the others, or a KubeRay/cloud launcher), then pass ``ray_address='auto'``
(on a cluster node) or ``'ray://HEAD:10001'`` (Ray Client). Every worker must be able to read the inputs (a
shared filesystem, URLs, or ``s3://``-style URIs) and the model (a shared path or a ModelScope hub id), and write
``out`` (a shared filesystem).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .collection import Collection
from .inference import CNClip
from .transform import max_image_pixels

__all__ = ['run_ray', 'ShardWorker']

logger = logging.getLogger(__name__)


class ShardWorker:
    """A Ray actor's callable: loads the model once, then embeds and writes the shards it is given."""

    def __init__(self, source: str, fingerprint: str, device: str, precision: str, fast_decode: bool,
                 coll: Collection, out: str, shard_size: int, batch_size: int, num_threads: int,
                 video_options: Mapping[str, Any], max_image_pixels: int | None = None) -> None:
        from .inference import load
        from .transform import set_max_image_pixels
        set_max_image_pixels(max_image_pixels)  # the driver's limit, also on nodes that did not inherit its env
        if device == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError('this Ray worker was given no GPU; pass gpus_per_worker > 0 for CUDA models')
        self.model = load(source, device=device, precision=precision, fast_decode=fast_decode)
        if self.model.fingerprint != fingerprint:
            raise RuntimeError(f'the model at {source!r} on this worker differs from the driver\'s '
                               f'(fingerprint {self.model.fingerprint} vs {fingerprint}); give every node the same '
                               f'weights')
        self.coll, self.out, self.shard_size = coll, Path(out), shard_size
        self.batch_size, self.video_options = [batch_size], dict(video_options)
        self.threads = num_threads or max(1, min(8, int(os.environ.get('OMP_NUM_THREADS', '0')) or
                                                 (os.cpu_count() or 1)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from concurrent.futures import ThreadPoolExecutor

        from .embed import embed_shard
        done, failed = [], []
        with ThreadPoolExecutor(self.threads, thread_name_prefix='cnclip-ray') as pool:
            for k in batch['shard']:
                n, bad = embed_shard(self.model, self.coll, self.out, int(k), self.shard_size, self.batch_size,
                                     pool, None, self.video_options)
                done.append(n)
                failed.append(bad)
        return {'shard': np.asarray(batch['shard']), 'embedded': np.asarray(done), 'failed': np.asarray(failed)}


def run_ray(model: CNClip, coll: Collection, out: Path, todo: list[int], shard_size: int, batch_size: int,
            num_threads: int, address: str | None, num_workers: int | None, gpus_per_worker: float,
            video_options: Mapping[str, Any]) -> None:
    """Embed shards ``todo`` of ``coll`` into ``out`` on Ray (see the module docstring for clusters)."""
    try:
        import ray
    except ImportError:
        raise ImportError('engine="ray" needs Ray Data: pip install "modelscope_cnclip[ray]"') from None
    if not model.source:
        raise ValueError('engine="ray": the model has no source path or hub id to load on the workers; load it with '
                         'modelscope_cnclip.load(PATH_OR_HUB_ID)')
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False,
                 **({} if address else {'num_cpus': os.cpu_count()}))
    cpus = float(ray.cluster_resources().get('CPU', 1))
    workers = num_workers or max(1, int(ray.cluster_resources().get('GPU', 0) // gpus_per_worker)
                                 if gpus_per_worker else 1)
    workers = min(workers, len(todo))
    device = 'cuda' if gpus_per_worker else 'cpu'
    kwargs = dict(source=model.source, fingerprint=model.fingerprint, device=device, precision=model.precision,
                  fast_decode=model.transform.fast_decode, coll=coll, out=str(out.resolve()), shard_size=shard_size,
                  batch_size=batch_size, num_threads=num_threads, video_options=video_options,
                  max_image_pixels=max_image_pixels())
    logger.info('Ray: %d shards over %d workers (%s, %.0f CPUs in the cluster)', len(todo), workers, device, cpus)
    ds = ray.data.from_items([{'shard': k} for k in todo], override_num_blocks=len(todo))
    results = ds.map_batches(ShardWorker, fn_constructor_kwargs=kwargs, batch_size=1, concurrency=workers,
                             num_gpus=gpus_per_worker or None, num_cpus=max(1.0, cpus / workers) if not
                             gpus_per_worker else 1).take_all()
    written = sorted(int(r['shard']) for r in results)
    if written != sorted(todo):
        raise RuntimeError(f'Ray finished shards {written} but {sorted(todo)} were asked for; rerun to resume')
