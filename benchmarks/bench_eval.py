"""Peak memory of `cnclip eval` on a MUGE-sized official split, before and after a change.

    python benchmarks/bench_eval.py --before REV --after REV --out benchmarks/RESULTS_eval.md

The split is generated once: ``--texts`` texts (one image each) over ``--images`` images, JPEG photos of about
15-30 KB (``valid_imgs.tsv`` then weighs what MUGE's does), and a tiny random-weight ViT (64 px, one layer), so the
run measures the evaluation's own memory (encoded images, score matrices), not a model's. Each revision's package
is extracted with ``git archive`` and run in a fresh process (``PYTHONPATH``), ``cnclip eval --out``;
peak memory is the process's ``VmHWM``. The metrics and the prediction files of the two revisions are compared.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))

from common import PEAK_RSS_GB, emit, header  # noqa: E402

logger = logging.getLogger('bench')
CHARS = '红绿蓝黄紫黑白色的圆形正方三角左右边有一个在位于衣服鞋子包手机电脑桌椅灯杯子猫狗花草山水天空城市夜晚'

WORKER = r'''
import json, sys, time, torch
torch.set_num_threads({threads})
t = time.perf_counter()
from modelscope_cnclip.cli import main
rc = main({argv!r})
print(json.dumps({{'rc': rc, 'seconds': time.perf_counter() - t, 'rss_gb': {peak}}}))
'''
# What every run holds before evaluating: the imports and the loaded model.
BASELINE = r'''
import json, torch
import modelscope_cnclip
modelscope_cnclip.load({model!r})
print(json.dumps({peak}))
'''


def _photo(seed: int) -> bytes:
    """A photo-like JPEG of 280-400 px a side: smooth colour fields plus grain, 15-30 KB."""
    rng = np.random.default_rng(seed)
    from PIL import Image
    w, h = int(rng.integers(280, 400)), int(rng.integers(280, 400))
    low = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(low, dtype=np.int16) + rng.integers(-14, 15, (h, w, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=80)
    return buf.getvalue()


def _tsv_line(i: int) -> str:
    return f'{1_000_000 + i}\t{base64.b64encode(_photo(i)).decode("ascii")}\n'


def make_split(d: Path, n_texts: int, n_images: int, workers: int) -> float:
    """Write ``valid_imgs.tsv`` and ``valid_texts.jsonl``; returns the average JPEG size in KB."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / 'valid_imgs.tsv', 'w', encoding='ascii') as f, ProcessPoolExecutor(workers) as pool:
        for line in pool.map(_tsv_line, range(n_images), chunksize=256):
            f.write(line)
    rng = random.Random(0)
    with open(d / 'valid_texts.jsonl', 'w', encoding='utf-8') as f:
        for t in range(n_texts):
            text = ''.join(rng.choice(CHARS) for _ in range(rng.randint(6, 20)))
            f.write(json.dumps({'text_id': t, 'text': text, 'image_ids': [1_000_000 + rng.randrange(n_images)]},
                               ensure_ascii=False) + '\n')
    return (d / 'valid_imgs.tsv').stat().st_size * 3 / 4 / n_images / 1024


def make_model(d: Path) -> Path:
    import torch

    from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir
    from modelscope_cnclip.config import CLIPConfig, TextConfig, VisionConfig
    from modelscope_cnclip.model import CLIP
    cfg = CLIPConfig(embed_dim=32, vision=VisionConfig(image_size=64, layers=1, width=32, patch_size=32,
                                                       head_width=32),
                     text=TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                     num_hidden_layers=1, max_position_embeddings=128))
    torch.manual_seed(0)
    return write_dir(Checkpoint(CLIP(cfg).state_dict(), cfg), d)


def extract(rev: str, dst: Path) -> str:
    """The package at git revision ``rev`` (``worktree``: the working tree's) under ``dst``; returns the commit id."""
    if rev == 'worktree':
        shutil.copytree(REPO / 'modelscope_cnclip', dst / 'modelscope_cnclip',
                        ignore=shutil.ignore_patterns('__pycache__'))
        return 'worktree'
    commit = subprocess.run(['git', 'rev-parse', rev], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(['git', 'archive', commit, 'modelscope_cnclip'], cwd=REPO, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dst, filter='data')
    return commit


def run_eval(tree: Path, model: Path, data: Path, pred: Path, threads: int, batch: int) -> dict:
    argv = ['eval', str(model), '--data', str(data), '--split', 'valid', '--batch-size', str(batch),
            '--out', str(pred)]
    code = WORKER.format(threads=threads, argv=argv, peak=PEAK_RSS_GB)
    env = {**os.environ, 'PYTHONPATH': str(tree), 'OMP_NUM_THREADS': str(threads)}
    out = subprocess.run([sys.executable, '-c', code], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'{tree}: cnclip eval failed:\n{out.stderr[-3000:]}')
    lines = out.stdout.strip().splitlines()
    run = json.loads(lines[-1])
    run['metrics'] = json.loads(lines[-2])
    run['files'] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pred.iterdir())}
    return run


def baseline_gb(tree: Path, model: Path) -> float:
    env = {**os.environ, 'PYTHONPATH': str(tree)}
    out = subprocess.run([sys.executable, '-c', BASELINE.format(model=str(model), peak=PEAK_RSS_GB)], cwd=tree,
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--before', default='HEAD~1', help='git revision measured first (default HEAD~1)')
    p.add_argument('--after', default='HEAD', help='git revision measured second, or "worktree" (default HEAD)')
    p.add_argument('--texts', type=int, default=20_000)
    p.add_argument('--images', type=int, default=30_000)
    p.add_argument('--batch', type=int, default=64, help='cnclip eval --batch-size (default 64)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    sys.path.insert(0, str(REPO))
    from modelscope_cnclip.evaluation.retrieval import CHUNK_ELEMENTS
    with tempfile.TemporaryDirectory(prefix='cnclip-bench-eval-') as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        kb = make_split(work / 'data', args.texts, args.images, args.threads)
        logger.info('split written in %.0f s (%.1f KB per JPEG)', time.perf_counter() - t, kb)
        model = make_model(work / 'model')
        runs = {}
        for label, rev in (('before', args.before), ('after', args.after)):
            tree = work / label
            commit = extract(rev, tree)
            runs[label] = {'commit': commit, **run_eval(tree, model, work / 'data', work / f'pred-{label}',
                                                        args.threads, args.batch)}
            logger.info('%s (%s): %.2f GB peak, %.0f s', label, commit[:10], runs[label]['rss_gb'],
                        runs[label]['seconds'])
        tsv_gb = (work / 'data' / 'valid_imgs.tsv').stat().st_size / 2**30
        base = baseline_gb(work / 'after', model)
    before, after = runs['before'], runs['after']
    flags = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').exists() else ''
    report = header('`cnclip eval` memory benchmark', argv)
    report.append(f'CPU flags: {"AMX" if "amx" in flags else "no AMX"}, '
                  f'{"AVX-512" if "avx512f" in flags else "no AVX-512"}; {args.threads} threads.\n')
    report.append(f'Official split: {args.texts:,} texts (one image each) x {args.images:,} images, JPEGs of '
                  f'{kb:.1f} KB on average (valid_imgs.tsv {tsv_gb:.2f} GB); tiny random-weight ViT (64 px, one '
                  f'layer, embed dim 32); `cnclip eval --batch-size {args.batch} --out`, each in a fresh '
                  f'process.\n')
    report.append('| revision | commit | peak RSS | above imports + model | wall time |')
    report.append('|---|---|---|---|---|')
    for label, run in runs.items():
        report.append(f'| {label} | `{run["commit"][:10]}` | {run["rss_gb"]:.2f} GB | {run["rss_gb"] - base:.2f} GB '
                      f'| {run["seconds"]:.0f} s |')
    n, m = args.texts, args.images
    report.append(f'\nImports and the loaded model alone: {base:.2f} GB. What the evaluation itself held before: '
                  f'every encoded image ({m * kb / 2**20:.2f} GB), the {n:,} x {m:,} float32 scores '
                  f'({n * m * 4 / 2**30:.2f} GB) and a bool matrix of the same shape ({n * m / 2**30:.2f} GB), the '
                  f'transposed copies for image-to-text, and the scores again for the prediction files. After: '
                  f'{args.batch} decoded images at a time (a few batches read ahead) and a chunk of at most '
                  f'{CHUNK_ELEMENTS * 4 / 2**20:.0f} MB of scores at a time, keeping each query\'s top 10.')
    same_metrics = before['metrics'] == after['metrics']
    same_files = before['files'] == after['files']
    report.append(f'\nPeak memory: {before["rss_gb"] / after["rss_gb"]:.1f}x lower after. Metrics identical: '
                  f'{"yes" if same_metrics else "NO"} (`{json.dumps(after["metrics"])}`); prediction files '
                  f'byte-identical: {"yes" if same_files else "NO"} ({", ".join(after["files"])}).')
    emit(report, args.out)
    return 0 if same_metrics and same_files else 1


if __name__ == '__main__':
    sys.exit(main())
