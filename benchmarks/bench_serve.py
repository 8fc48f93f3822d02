"""The HTTP service under concurrent load, against the library's own batch throughput measured in the same run.

    python benchmarks/bench_serve.py --out benchmarks/RESULTS_serve.md
    python benchmarks/bench_serve.py --peer-infinity /path/to/venv/bin/infinity_emb   # + infinity-emb on --to hf

The peer runs from its own virtual environment (it pins sentence-transformers < 4, hence transformers < 5):
``pip install torch==2.13.0 && pip install "infinity-emb[server,torch]" aiohttp "transformers<4.57"`` (4.57's
``ChineseCLIPModel.get_text_features`` fails on a pooler output the model does not build).

Starts ``cnclip serve`` (a separate process, 127.0.0.1 only, ViT-B-16-size weights, 2 model threads) and drives it
with asyncio aiohttp clients at concurrency 1, 8 and 32: one short Chinese query per text request, one 640x480 JPEG
(a data URI) per image request, the way a search front end calls it. Each level runs a bounded number of requests
(and at most --seconds). Reported: items/s, p50 / p99 latency, and items/s as a ratio to the library's own
throughput on the same inputs (``encode_text`` / ``encode_image`` on batches of 32, decoding included), measured in
this process before the server starts and after it stops (the higher kept). The clients share the machine's 2 cores
with the server, which the ratio includes. With ``--peer-infinity``, the same weights converted with ``cnclip
convert --to hf`` are served by infinity-emb and driven the same way (its OpenAI-style ``/embeddings`` route).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from bench_embed import SHORT_QUERIES, make_photos, spread_weights  # noqa: E402
from common import emit, header  # noqa: E402

from modelscope_cnclip import get_config, load  # noqa: E402
from modelscope_cnclip.checkpoints.layouts import Checkpoint, convert, write_dir  # noqa: E402

logger = logging.getLogger('bench')
LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    import httpx
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f'server exited: {proc.communicate()[1][-2000:]}')
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.2)
    raise SystemExit(f'{url} not ready after {timeout} s')


@contextlib.contextmanager
def server(cmd: list[str], health: str, env: dict[str, str] | None = None):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        yield proc, wait_ready(health, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def drive(url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float,
                headers: dict[str, str] | None = None) -> dict[str, float]:
    """Send ``bodies`` (in order, round robin over ``concurrency`` clients) until all are sent or ``seconds`` pass;
    returns items/s (completed requests' items over the wall time) and latency percentiles (ms). The clients are
    aiohttp (the load generator shares the CPU with the server, so it should cost as little as possible)."""
    import aiohttp
    latencies: list[float] = []
    items = 0
    queue = [json.dumps(b).encode() for b in reversed(bodies)]
    sizes = [len(b['input']) for b in reversed(bodies)]
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers={'Content-Type': 'application/json', **(headers or {})}) as session:
        async def worker() -> None:
            nonlocal items
            while queue and time.monotonic() < deadline:
                body, n = queue.pop(), sizes.pop()
                t = time.perf_counter()
                async with session.post(url, data=body) as r:
                    payload = await r.read()
                latencies.append(time.perf_counter() - t)
                if r.status != 200:
                    raise SystemExit(f'{url}: HTTP {r.status} {payload[:500]!r}')
                items += n
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {'items_s': items / wall, 'p50': float(np.percentile(ms, 50)), 'p99': float(np.percentile(ms, 99)),
            'requests': len(latencies)}


def jpeg_uris(photos: list[Any]) -> list[str]:
    out = []
    for p in photos:
        buf = io.BytesIO()
        p.save(buf, 'JPEG', quality=90)
        out.append('data:image/jpeg;base64,' + base64.b64encode(buf.getvalue()).decode())
    return out


def library_rates(model_dir: Path, texts: list[str], jpegs: list[bytes], precision: str | None, reps: int = 3
                  ) -> dict[str, float]:
    """The library's texts/s and images/s on batches of 32 (fastest of ``reps``), decoding included."""
    m = load(model_dir, precision=precision)
    rates = {}
    for name, fn, n in (('text', lambda: m.encode_text(texts[:32], batch_size=32), 32),
                        ('image', lambda: m.encode_image(jpegs[:32], batch_size=32), 32)):
        fn()
        best = min(_timed(fn) for _ in range(reps))
        rates[name] = n / best
    return rates


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_levels(url: str, texts: list[str], uris: list[str], args: argparse.Namespace, model: str,
               image_body: Any, headers: dict[str, str] | None = None) -> dict[tuple[str, int], dict[str, float]]:
    warm = [{'model': model, 'input': texts[:8]}, image_body(uris[0])] * 2  # untimed: first-call costs
    asyncio.run(drive(url, warm, 1, args.seconds, headers))
    out = {}
    for level in LEVELS:
        text_bodies = [{'model': model, 'input': [texts[i % len(texts)]]} for i in range(args.text_requests)]
        out['text', level] = asyncio.run(drive(url, text_bodies, level, args.seconds, headers))
        logger.info('%s text c=%d: %s', url, level, out['text', level])
        image_bodies = [image_body(uris[i % len(uris)]) for i in range(args.image_requests)]
        out['image', level] = asyncio.run(drive(url, image_bodies, level, args.seconds, headers))
        logger.info('%s image c=%d: %s', url, level, out['image', level])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--arch', default='ViT-B-16')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--precision', choices=('fp32', 'bf16'), help='model precision (default fp32)')
    ap.add_argument('--text-requests', type=int, default=600, help='text requests per concurrency level')
    ap.add_argument('--image-requests', type=int, default=96, help='image requests per concurrency level')
    ap.add_argument('--seconds', type=float, default=60, help='time limit per level and modality')
    ap.add_argument('--batch-wait-ms', type=float, default=5.0)
    ap.add_argument('--peer-infinity', help='path to an infinity_emb executable (its own venv) to compare with')
    ap.add_argument('--out', type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    logging.getLogger('modelscope_cnclip').setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = get_config(args.arch)
    report = header(f'Serving benchmark: {args.arch}, CPU, {args.threads} threads', argv)
    texts = SHORT_QUERIES
    photos = make_photos(32, (640, 480))
    uris = jpeg_uris(photos)
    jpegs = [base64.b64decode(u.split(',', 1)[1]) for u in uris]
    with tempfile.TemporaryDirectory() as tmp:
        src = write_dir(Checkpoint(spread_weights(cfg), cfg), Path(tmp) / 'model')
        lib = library_rates(src, texts * 2, jpegs, args.precision)
        logger.info('library: %s', lib)
        port = free_port()
        cmd = [sys.executable, '-m', 'modelscope_cnclip', 'serve', str(src), '--port', str(port),
               '--batch-wait-ms', str(args.batch_wait_ms)] + (['--precision', args.precision] if args.precision
                                                              else [])
        env = {'OMP_NUM_THREADS': str(args.threads), 'CNCLIP_API_KEY': ''}
        with server(cmd, f'http://127.0.0.1:{port}/health', env) as (_, ready_s):
            ours = run_levels(f'http://127.0.0.1:{port}/v1/embeddings', texts, uris, args, 'cnclip',
                              lambda u: {'model': 'cnclip', 'input': [u], 'modality': 'image'})
        again = library_rates(src, texts * 2, jpegs, args.precision)  # after, too: the better of the two is kept
        lib = {k: max(lib[k], again[k]) for k in lib}
        results = {'cnclip serve': (ours, ready_s)}
        notes = []
        if args.peer_infinity:
            hf = convert(src, Path(tmp) / 'hf', to='hf')
            # infinity-emb cuts texts at config.max_length (transformers' default: 20 tokens); the model reads 52
            config = json.loads((hf / 'config.json').read_text())
            (hf / 'config.json').write_text(json.dumps({**config, 'max_length': cfg.context_length}))
            port = free_port()
            cmd = [args.peer_infinity, 'v2', '--model-id', str(hf), '--port', str(port), '--host', '127.0.0.1',
                   '--device', 'cpu', '--engine', 'torch', '--batch-size', '32', '--served-model-name', 'peer',
                   '--no-compile', '--no-model-warmup']  # warm-up: below, for both servers alike
            env = {'OMP_NUM_THREADS': str(args.threads), 'INFINITY_ANONYMOUS_USAGE_STATS': '0', 'DO_NOT_TRACK': '1'}
            try:
                with server(cmd, f'http://127.0.0.1:{port}/health', env) as (_, peer_ready):
                    peer = run_levels(f'http://127.0.0.1:{port}/embeddings', texts, uris, args, 'peer',
                                      lambda u: {'model': 'peer', 'input': [u], 'modality': 'image'})
                results['infinity-emb (peer)'] = (peer, peer_ready)
            except SystemExit as e:
                notes.append(f'infinity-emb: failed ({str(e)[:300]})')
        else:
            notes.append('infinity-emb: not run (pass --peer-infinity PATH)')
    rows = []
    for name, (res, _) in results.items():
        for modality in ('text', 'image'):
            for level in LEVELS:
                r = res[modality, level]
                rows.append(f'| {name} | {modality} | {level} | {r["items_s"]:.1f} | '
                            f'{r["items_s"] / lib[modality]:.2f} | {r["p50"]:.0f} | {r["p99"]:.0f} | {r["requests"]} |')
    goal = results['cnclip serve'][0]
    report += [
        f'Weights: {args.arch} size, random; precision {args.precision or "fp32"}; server: `cnclip serve` '
        f'(batch up to 32, wait {args.batch_wait_ms:g} ms). Text request: one short Chinese query; image request: '
        f'one 640x480 JPEG as a data URI. Library baseline (this process, batches of 32, decoding included, '
        f'the better of before and after the server): '
        f'**{lib["text"]:.0f} texts/s, {lib["image"]:.2f} images/s**. Server ready (GET /health) after '
        + ', '.join(f'{n} {r:.1f} s' for n, (_, r) in results.items()) + '.\n',
        '| server | modality | concurrency | items/s | x library | p50 ms | p99 ms | requests |',
        '|---|---|---|---|---|---|---|---|', *rows, '',
        f'Goal (issue 13): >= 0.85x the library at concurrency 32: text {goal["text", 32]["items_s"] / lib["text"]:.2f}'
        f'x, image {goal["image", 32]["items_s"] / lib["image"]:.2f}x.\n', *[f'- {n}' for n in notes]]
    emit(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
