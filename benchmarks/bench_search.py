"""Vector index benchmark: build time, size, query latency and recall@10 against exact search, per index kind.

    python benchmarks/bench_search.py --n 100000 1000000 --out benchmarks/RESULTS_search.md
    python benchmarks/bench_search.py --n 20000            # a quick check

With 2 threads the 10^6 size should take about 8 minutes (extrapolated from runs up to 6 x 10^5), half of it the
HNSW build; ``--kinds ivf ivfpq`` leaves HNSW out.

Data: synthetic L2-normalised 512-d vectors shaped like CLIP image embeddings (no model is run): a shared mean
direction (the "cone" every CLIP embedding space has), 64 topics, 4096 clusters of Zipf-distributed sizes, and
anisotropic noise with a power-law spectrum in a random basis (effective dimension ~45). Two query sets:
*image-like* (a data point plus noise, cosine ~0.9 to it: image-to-image search) and *text-like* (a cluster centre
shifted along a fixed "modality gap" direction: top-1 cosine ~0.5, mean ~0.1, as text queries sit against
image embeddings). Every kind is built through :class:`modelscope_cnclip.index.Index` with the parameters
``kind='auto'`` and the kind defaults use; recall@10 is |approximate top-10 & exact top-10| / 10, averaged over
the queries.
Prints a markdown report; ``--out FILE`` also writes it.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import emit  # noqa: E402

from modelscope_cnclip.index import AUTO_EXACT_MAX, OPTIONS, Index, default_nlist, default_nprobe  # noqa: E402

logger = logging.getLogger('bench')

DIM = 512
TOPICS = 64
CLUSTERS = 4096
# Squared weights of each component of a vector (before normalising): mean direction, topic, cluster, own noise.
W_MEAN, W_TOPIC, W_CLUSTER = 0.25, 0.15, 0.25
W_NOISE = (0.2, 0.45)  # uniform per point: some clusters tight, some loose


class Synthetic:
    """A seeded generator of CLIP-like embeddings (see the module docstring); vectors come in chunks."""

    def __init__(self, dim: int = DIM, seed: int = 0) -> None:
        self.dim = dim
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.spectrum = (np.arange(1, dim + 1) ** -0.45).astype(np.float32)  # power-law variance decay
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.mean = self._directions(1)[0]
        self.gap = self._directions(1)[0]  # the image-text "modality gap"
        self.topics = self._directions(TOPICS)
        self.cluster_topic = rng.integers(0, TOPICS, CLUSTERS)
        self.clusters = self._directions(CLUSTERS)
        p = 1.0 / np.arange(1, CLUSTERS + 1) ** 0.7  # Zipf-like cluster sizes
        self.cluster_p = p / p.sum()

    def _directions(self, n: int) -> np.ndarray:
        """``n`` anisotropic unit vectors ``(n, D)``: power-law spectrum in a random basis."""
        z = self.rng.standard_normal((n, self.dim), dtype=np.float32) * self.spectrum
        z = z @ self.rotation
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def _compose(self, cluster: np.ndarray, noise_w: np.ndarray) -> np.ndarray:
        x = (np.sqrt(W_MEAN) * self.mean + np.sqrt(W_TOPIC) * self.topics[self.cluster_topic[cluster]]
             + np.sqrt(W_CLUSTER) * self.clusters[cluster] + np.sqrt(noise_w)[:, None] * self._directions(len(cluster)))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def data(self, n: int, chunk: int = 100_000) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            cluster = self.rng.choice(CLUSTERS, m, p=self.cluster_p)
            out[start:start + m] = self._compose(cluster, self.rng.uniform(*W_NOISE, m).astype(np.float32))
        return out

    def image_queries(self, data: np.ndarray, n: int) -> np.ndarray:
        """Near data points, not at them: cosine ~0.9 to the point they start from."""
        x = data[self.rng.choice(len(data), n, replace=False)] + 0.5 * self._directions(n)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def text_queries(self, n: int) -> np.ndarray:
        """A cluster's direction moved along the modality gap, plus noise."""
        cluster = self.rng.choice(CLUSTERS, n, p=self.cluster_p)
        x = self._compose(cluster, np.full(n, 0.3, np.float32)) + 1.4 * self.gap + 0.3 * self._directions(n)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- measurement helpers ----------------------------------------------------------------------------------------

def rss_gb() -> float:
    """Current resident memory of this process, GB."""
    return next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmRSS')) / 2**20


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir()) / 2**20


def latency_ms(index: Index, queries: np.ndarray, k: int, single: int, reps: int) -> tuple[float, float]:
    """(median ms of one query searched alone, median ms of a batch of 100) after one warm-up each."""
    index.search(queries[:1], k)
    times = []
    for q in queries[:single]:
        t = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - t)
    batch = queries[:100]
    index.search(batch, k)
    btimes = []
    for _ in range(reps):
        t = time.perf_counter()
        index.search(batch, k)
        btimes.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3), float(np.median(btimes) * 1e3)


def top_ids(index: Index, queries: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` int rows of the hits (ids are the row numbers as str)."""
    out = np.full((len(queries), k), -1, np.int64)
    for qi, hits in enumerate(index.search(queries, k)):
        out[qi, :len(hits)] = [int(h.id) for h in hits]
    return out


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx.tolist(), exact.tolist())]))


def timed_build(ids: list[str], data: np.ndarray, kind: str, **opts: Any) -> tuple[Index, float, float]:
    """(index, build seconds, resident memory it added in GB)."""
    before = rss_gb()
    t = time.perf_counter()
    index = Index.from_arrays(ids, data, kind=kind, **opts)
    return index, time.perf_counter() - t, max(0.0, rss_gb() - before)


def kinds_for(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, kind, options) of the approximate kinds, with the defaults ``Index`` uses."""
    opts = {'hnsw': {'M': args.hnsw_m, 'efConstruction': args.hnsw_efc}}
    return [(k, k, opts.get(k, {})) for k in args.kinds] + [(f, f, {}) for f in args.factory]


def sweep_values(kind: str, index: Index) -> tuple[str, list[int]]:
    if kind == 'hnsw':
        return 'efSearch', [64, 128, 256, 512]
    if 'nprobe' in index.params:
        nlist = index.build_params.get('nlist') or index.faiss_index.nlist
        return 'nprobe', sorted({v for v in (16, 32, 64, 128, 256) if v <= nlist} | {index.params['nprobe']})
    return '', []


# --- one size -----------------------------------------------------------------------------------------------------

def bench_size(n: int, args: argparse.Namespace, work: Path, report: list[str]) -> None:
    t = time.perf_counter()
    gen = Synthetic(seed=args.seed)
    data = gen.data(n)
    half = args.queries // 2
    queries = {'image-like': gen.image_queries(data, half), 'text-like': gen.text_queries(args.queries - half)}
    ids = [str(i) for i in range(n)]
    logger.info('N=%d: data made in %.1f s', n, time.perf_counter() - t)
    both = np.concatenate(list(queries.values()))
    nlist = default_nlist(n)
    auto = 'flat' if n <= AUTO_EXACT_MAX else f'ivf (nlist {nlist}, nprobe {default_nprobe(nlist)})'
    report.append(f'## N = {n:,} vectors of {DIM} dims ({n * DIM * 4 / 2**30:.2f} GiB float32); '
                  f"`kind='auto'` picks {auto}\n")

    flat, build_s, mem = timed_build(ids, data, 'flat')
    t = time.perf_counter()
    exact = {name: top_ids(flat, q, 10) for name, q in queries.items()}
    gt_s = time.perf_counter() - t
    lat1, lat100 = latency_ms(flat, both, 10, args.single, args.reps)
    size, save_s = save_size(flat, work)
    logger.info('flat: built %.1f s, %d queries exact in %.1f s, 1q %.2f ms, 100q %.1f ms', build_s, len(both), gt_s,
                lat1, lat100)
    report.append('| kind | faiss index | params | build s | save s | size MiB | +RSS GiB | recall@10 image-like | '
                  'recall@10 text-like | 1 query ms | 100 queries ms | 100 queries: queries/s |')
    report.append('|---|---|---|---|---|---|---|---|---|---|---|---|')
    report.append(row('flat (exact)', flat, build_s, save_s, size, mem, 1.0, 1.0, lat1, lat100))
    del flat

    sweeps = []
    for label, kind, opts in kinds_for(args):
        try:
            index, build_s, mem = timed_build(ids, data, kind, **opts)
        except ValueError as e:
            report.append(f'| {label} | - | - | - | - | - | - | skipped: {e} | | | | |')
            continue
        rec = {name: recall(top_ids(index, q, 10), exact[name]) for name, q in queries.items()}
        lat1, lat100 = latency_ms(index, both, 10, args.single, args.reps)
        size, save_s = save_size(index, work)
        logger.info('%s: built %.1f s, recall %s, 1q %.2f ms, 100q %.1f ms', label, build_s, rec, lat1, lat100)
        report.append(row(label, index, build_s, save_s, size, mem, rec['image-like'], rec['text-like'], lat1,
                          lat100))
        name, values = sweep_values(kind, index)
        default = dict(index.params)
        for v in values:
            index.set_params(**{name: v})
            r = {qn: recall(top_ids(index, q, 10), exact[qn]) for qn, q in queries.items()}
            lat1, lat100 = latency_ms(index, both, 10, args.single // 2, args.reps)
            mark = ' (default)' if default.get(name) == v else ''
            sweeps.append(f'| {label} | {name}={v}{mark} | {r["image-like"]:.3f} | {r["text-like"]:.3f} | '
                          f'{lat1:.2f} | {lat100:.1f} |')
        del index
    if sweeps:
        report.append('\nSearch-time trade-off (same indexes, one parameter varied):\n')
        report.append('| kind | parameter | recall@10 image-like | recall@10 text-like | 1 query ms | 100 queries ms |')
        report.append('|---|---|---|---|---|---|')
        report += sweeps
    report.append('')


def save_size(index: Index, work: Path) -> tuple[float, float]:
    """(MiB, seconds) of saving the index dir."""
    t = time.perf_counter()
    path = index.save(work / 'index')
    seconds = time.perf_counter() - t
    size = dir_mb(path)
    shutil.rmtree(path)
    return size, seconds


def row(label: str, index: Index, build_s: float, save_s: float, size: float, mem: float, r_img: float,
        r_txt: float, lat1: float, lat100: float) -> str:
    params = ', '.join(f'{k}={v}' for k, v in {**index.build_params, **index.params}.items()
                       if k not in ('train_size',)) or '-'
    return (f'| {label} | `{index.factory}` | {params} | {build_s:.1f} | {save_s:.1f} | {size:.0f} | {mem:.2f} | '
            f'{r_img:.3f} | {r_txt:.3f} | {lat1:.2f} | {lat100:.1f} | {100 / lat100 * 1e3:.0f} |')


def data_stats(args: argparse.Namespace) -> str:
    """Cosine statistics of the synthetic data (what makes it CLIP-like), on a small sample."""
    gen = Synthetic(seed=args.seed)
    x = gen.data(20_000)
    sims = x[:500] @ x.T
    np.fill_diagonal(sims[:, :500], -1)
    nn = np.sort(sims, axis=1)[:, -10:]
    img, txt = gen.image_queries(x, 200) @ x.T, gen.text_queries(200) @ x.T
    s = gen.spectrum ** 2
    return (f'Data check (20,000 vectors): random pairs cosine mean {sims[sims > -1].mean():.2f}; nearest neighbour '
            f'{nn[:, -1].mean():.2f}, 10th {nn[:, 0].mean():.2f}; image-like query top-1 {img.max(1).mean():.2f}; '
            f'text-like query top-1 {txt.max(1).mean():.2f}, mean {txt.mean():.2f}; noise effective dimension '
            f'{s.sum() ** 2 / (s ** 2).sum():.0f}.\n')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=float, nargs='+', default=[1e5, 1e6], help='collection sizes (default 1e5 1e6)')
    p.add_argument('--queries', type=int, default=1000, help='half image-like, half text-like (default 1000)')
    p.add_argument('--single', type=int, default=30, help='queries timed one at a time (default 30)')
    p.add_argument('--reps', type=int, default=5, help='repetitions of the 100-query batch (default 5)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--kinds', nargs='*', default=['ivf', 'hnsw', 'ivfpq'], choices=['ivf', 'hnsw', 'ivfpq'],
                   help='approximate kinds to measure (default all three)')
    p.add_argument('--hnsw-m', type=int, default=OPTIONS['M'])
    p.add_argument('--hnsw-efc', type=int, default=OPTIONS['efConstruction'])
    p.add_argument('--factory', nargs='*', default=[], help='extra faiss index_factory strings, e.g. IVF1024,SQ8')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', type=Path, help='also write the markdown report here')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    import faiss
    faiss.omp_set_num_threads(args.threads)
    cpu = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                if line.startswith('model name')), platform.processor()) if Path('/proc/cpuinfo').exists() else ''
    t0 = time.perf_counter()
    report = ['# Vector index benchmark\n',
              f'`python {" ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))}`'
              f'\n\n{cpu}, {os.cpu_count()} CPUs, faiss {faiss.__version__} with {args.threads} threads; '
              f'numpy {np.__version__}, Python {platform.python_version()}; {time.strftime("%Y-%m-%d")}.\n',
              __doc__[__doc__.index('Data:'):__doc__.index('Prints')].strip() + '\n', data_stats(args),
              f'Latency: median of {args.single} single queries, and median of {args.reps} batches of 100 queries; '
              f'k = 10. Size: the saved index dir (faiss index + ids). +RSS: resident memory the build added.\n']
    with tempfile.TemporaryDirectory(prefix='cnclip-bench-search-') as tmp:
        for n in args.n:
            bench_size(int(n), args, Path(tmp), report)
    report.append(f'Total benchmark time: {time.perf_counter() - t0:.0f} s.')
    emit(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
