"""Soak: mixed good and bad inputs streamed through the library and the server for minutes; throughput, error counts
and memory over time (a leak shows as RSS that keeps growing after the warm-up).

    python benchmarks/bench_soak.py --minutes 3 --out benchmarks/RESULTS_soak.md

Library phase: one loaded model (ViT-B-16 size, 2 threads) gets, in a fixed rotation, good photos, corrupt and
truncated files, decompression bombs, wrong types, good texts, empty and odd unicode texts; each call either returns
embeddings or raises the documented error, counted by type. Server phase: ``cnclip serve`` (a separate process,
127.0.0.1) gets the same mix as HTTP requests from 4 client threads (good embeddings and rank requests, malformed
JSON, wrong types, undecodable and oversized images, too many items). RSS is sampled every few seconds (the library
phase: this process; the server phase: the server's).
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO / 'tests'))

from bench_embed import SHORT_QUERIES, make_photos, spread_weights  # noqa: E402
from common import emit, header  # noqa: E402

from modelscope_cnclip import get_config, load  # noqa: E402
from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir  # noqa: E402

from helpers import bomb_png  # noqa: E402

logger = logging.getLogger('bench')


def rss_mb(pid: int | None = None) -> float:
    for line in Path(f'/proc/{pid or "self"}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return float('nan')


def jpeg(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, 'JPEG', quality=90)
    return buf.getvalue()


class Sampler:
    """RSS of ``pid`` every ``every`` seconds in a thread: ``[(seconds, MB)]``."""

    def __init__(self, pid: int | None, every: float) -> None:
        self.pid, self.every, self.samples, self._stop = pid, every, [], threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._start, rss_mb(self.pid)))
            self._stop.wait(self.every)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def growth(samples: list[tuple[float, float]], warmup: float) -> tuple[float, float, float]:
    """(RSS after warm-up, RSS at the end, slope MB/min of a least-squares line after warm-up)."""
    after = [(t, m) for t, m in samples if t >= warmup] or samples
    t, m = np.array(after).T
    slope = float(np.polyfit(t / 60, m, 1)[0]) if len(t) > 2 else float('nan')
    return float(m[0]), float(m[-1]), slope


def library_phase(model: Any, photos: list[bytes], seconds: float, every: float) -> dict[str, Any]:
    cases: list[tuple[str, Callable[[], Any]]] = [
        ('good images', lambda: model.encode_image(photos[:4])),
        ('good texts', lambda: model.encode_text(SHORT_QUERIES[:8])),
        ('corrupt bytes', lambda: model.encode_image([b'\xff\xd8\xff\xe0 broken jpeg'])),
        ('truncated jpeg', lambda: model.encode_image([photos[0][:len(photos[0]) // 3]])),
        ('decompression bomb', lambda: model.encode_image([bomb_png()])),
        ('wrong type', lambda: model.encode_image([3.5])),
        ('odd texts', lambda: model.encode_text(['', ' ', '\ud800', '😀' * 100, 'x' * 10000])),
        ('float tensor in a list', lambda: model.encode_image([torch.zeros(3, 8, 8)])),
    ]
    counts: dict[str, collections.Counter] = {name: collections.Counter() for name, _ in cases}
    sampler = Sampler(None, every)
    start, calls = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        for name, fn in cases:
            try:
                fn()
                counts[name]['ok'] += 1
            except (ValueError, TypeError, FileNotFoundError) as e:
                counts[name][type(e).__name__] += 1
            calls += 1
    return {'counts': counts, 'samples': sampler.stop(), 'calls': calls, 'seconds': time.monotonic() - start}


def server_phase(model_dir: Path, photos: list[bytes], seconds: float, every: float) -> dict[str, Any]:
    import httpx
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, '-m', 'modelscope_cnclip', 'serve', str(model_dir), '--port', str(port),
                             '--max-items', '16'], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'CNCLIP_API_KEY': '', 'OMP_NUM_THREADS': '2'})
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f'server did not start: {proc.communicate()[1][-2000:]}')
        try:
            if httpx.get(url + '/health', timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    uri = 'data:image/jpeg;base64,' + base64.b64encode(photos[0]).decode()
    bomb = 'data:image/png;base64,' + base64.b64encode(bomb_png()).decode()
    requests: list[tuple[str, str, Any]] = [
        ('good texts', '/v1/embeddings', {'input': SHORT_QUERIES[:4]}),
        ('good image', '/v1/embeddings', {'input': [uri], 'modality': 'image'}),
        ('good rank', '/v1/rank', {'image': uri, 'texts': SHORT_QUERIES[:4]}),
        ('malformed JSON', '/v1/embeddings', b'{"input": ['),
        ('wrong type', '/v1/embeddings', {'input': [1, 2]}),
        ('undecodable image', '/v1/embeddings', {'input': ['bm90IGFuIGltYWdl'], 'modality': 'image'}),
        ('decompression bomb', '/v1/embeddings', {'input': [bomb], 'modality': 'image'}),
        ('too many items', '/v1/embeddings', {'input': ['x'] * 17}),
        ('empty input', '/v1/embeddings', {'input': []}),
    ]
    counts: dict[str, collections.Counter] = {name: collections.Counter() for name, _, _ in requests}
    lock = threading.Lock()
    sampler = Sampler(proc.pid, every)
    start = time.monotonic()

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            i = offset
            while time.monotonic() - start < seconds:
                name, path, body = requests[i % len(requests)]
                i += 1
                try:
                    r = c.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                               headers={'content-type': 'application/json'})
                    outcome = str(r.status_code)
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                with lock:
                    counts[name][outcome] += 1
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    samples = sampler.stop()
    proc.terminate()
    proc.wait(30)
    return {'counts': counts, 'samples': samples, 'calls': sum(sum(c.values()) for c in counts.values()),
            'seconds': elapsed}


def table(phase: dict[str, Any], warmup: float) -> list[str]:
    outcomes = sorted({o for c in phase['counts'].values() for o in c})
    rows = ['| input | ' + ' | '.join(outcomes) + ' |', '|---|' + '---|' * len(outcomes)]
    rows += [f'| {name} | ' + ' | '.join(str(c.get(o, 0)) for o in outcomes) + ' |'
             for name, c in phase['counts'].items()]
    first, last, slope = growth(phase['samples'], warmup)
    peak = max(m for _, m in phase['samples'])
    rate = phase['calls'] / phase['seconds']
    trend = ', '.join(f'{t:.0f} s {m:.0f}' for t, m in phase['samples'][::max(1, len(phase['samples']) // 12)])
    return rows + ['', f'{phase["calls"]} calls in {phase["seconds"]:.0f} s ({rate:.1f}/s). RSS after the '
                       f'{warmup:.0f} s warm-up {first:.0f} MB, at the end {last:.0f} MB, peak {peak:.0f} MB; '
                       f'least-squares trend after warm-up **{slope:+.1f} MB/min**.', '',
                   f'RSS (MB) over time: {trend}', '']


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--minutes', type=float, default=3.0, help='per phase')
    ap.add_argument('--warmup', type=float, default=30.0, help='seconds excluded from the memory trend')
    ap.add_argument('--every', type=float, default=5.0, help='seconds between RSS samples')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = get_config('ViT-B-16')
    report = header(f'Soak: {args.minutes:g} min of mixed good and bad inputs per phase, ViT-B-16 size', argv)
    photos = [jpeg(p) for p in make_photos(8, (640, 480))]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_dir(Checkpoint(spread_weights(cfg), cfg), Path(tmp) / 'model')
        lib = library_phase(load(model_dir), photos, args.minutes * 60, args.every)
        srv = server_phase(model_dir, photos, args.minutes * 60, args.every)
    report += ['## Library (this process)\n', *table(lib, args.warmup),
               '## Server (`cnclip serve`, 4 client threads; outcomes are HTTP statuses)\n', *table(srv, args.warmup)]
    emit(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
