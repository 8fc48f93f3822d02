"""The demo's text-to-image search over a 10^5-image gallery on CPU: how long a query takes once loaded.

    python benchmarks/bench_demo.py --out benchmarks/RESULTS_demo.md

A ViT-B-16-size model (random weights, 2 threads) and an index of 100,000 gallery vectors (random unit vectors: the
search cost depends on the count and size, not the values), whose entries point at 640x480 JPEGs on disk. Timed:
``Demo.search_text`` (embed the query, search the index, read and thumbnail the top 12 photos) and the same call
through the running Gradio app with ``gradio_client`` on 127.0.0.1 (the answer with the thumbnails' URLs: what a
browser waits for before it loads them), and ``Demo.search_image`` for a photo query. Each is the median and the
90th percentile over a bounded number of queries.
"""
from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from bench_embed import SHORT_QUERIES, make_photos, spread_weights  # noqa: E402
from common import emit, header  # noqa: E402

from modelscope_cnclip import get_config, load  # noqa: E402
from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir  # noqa: E402
from modelscope_cnclip.demo.app import Demo, build_demo  # noqa: E402
from modelscope_cnclip.index import Index  # noqa: E402


def timings(fn: Callable[[int], Any], n: int) -> tuple[float, float]:
    fn(0)  # warm-up
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return statistics.median(out), float(np.percentile(out, 90))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--gallery', type=int, default=100_000, help='gallery size')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--queries', type=int, default=30)
    ap.add_argument('--out', type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = get_config('ViT-B-16')
    report = header(f'Demo search latency: ViT-B-16, {args.gallery:,}-image gallery, CPU, {args.threads} threads',
                    argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = load(write_dir(Checkpoint(spread_weights(cfg), cfg), work / 'model'))
        photos = []
        for i, img in enumerate(make_photos(50, (640, 480))):
            photos.append(str(work / f'{i}.jpg'))
            img.save(photos[-1], quality=90)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((args.gallery, cfg.embed_dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        t = time.perf_counter()
        index = Index.from_arrays([f'photo_{i:06d}' for i in range(args.gallery)], vectors,
                                  sources=[photos[i % len(photos)] for i in range(args.gallery)],
                                  meta={'model': model.info()})
        build_s = time.perf_counter() - t
        demo = Demo(model, index)
        rows = []
        text = timings(lambda i: demo.search_text(SHORT_QUERIES[i % len(SHORT_QUERIES)], 12), args.queries)
        rows.append(('text query, `Demo.search_text` (top 12)', text))
        embed_only = timings(lambda i: model.encode_text([SHORT_QUERIES[i % len(SHORT_QUERIES)]]), args.queries)
        rows.append(('  of which: embedding the query', embed_only))
        search_only = timings(lambda i: index.search(vectors[i:i + 1], 12), args.queries)
        rows.append((f'  of which: searching {args.gallery:,} vectors ({index.kind})', search_only))
        rows.append(('image query, `Demo.search_image` (top 12)',
                     timings(lambda i: demo.search_image(photos[i % len(photos)], 12), max(5, args.queries // 3))))
        app = build_demo(model, index)
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        app.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            from gradio_client import Client
            client = Client(f'http://127.0.0.1:{port}/', verbose=False, download_files=False)  # URLs, as a browser gets
            rows.append(('text query through the Gradio app (gradio_client, 127.0.0.1)',
                         timings(lambda i: client.predict(SHORT_QUERIES[i % len(SHORT_QUERIES)], 12,
                                                          api_name='/search_text'), args.queries)))
        finally:
            app.close()
    report += [f'Index of {args.gallery:,} vectors ({index.kind}) built in {build_s:.1f} s; each query returns '
               f'12 thumbnails read from 640x480 JPEGs. Times: median / 90th percentile of {args.queries} queries.\n',
               '| what | median ms | p90 ms |', '|---|---|---|',
               *[f'| {what} | {m * 1e3:.0f} | {p * 1e3:.0f} |' for what, (m, p) in rows], '',
               f'Goal (issue 14): a text query over a 10^5-image gallery well under a second on CPU: '
               f'{rows[0][1][0] * 1e3:.0f} ms median in the app\'s function, {rows[-1][1][0] * 1e3:.0f} ms through '
               f'the running app.\n']
    emit(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
