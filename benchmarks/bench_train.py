"""Training throughput and peak memory of `cnclip-trainer`'s step, with and without its speed options.

    python benchmarks/bench_train.py                        # ViT-B-16 size, batch 16, CPU, 2 threads
    python benchmarks/bench_train.py --arch ViT-B-16 --batch 64 --device cuda

Each configuration runs in a fresh process (so peak memory is its own): the trainer's own train_step (forward,
contrastive loss) plus backward and an AdamW step, timed over a few steps after a warm-up. Prints a markdown table
with samples/s, the ratio to the plain fp32 loop, and peak RSS (CPU) or peak allocated GPU memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from common import PEAK_RSS_GB, emit  # noqa: E402

CONFIGS = {
    'fp32 (plain loop)': {},
    'bf16 autocast': {'amp': 'bf16'},
    'FLIP mask 0.5': {'mask_ratio': 0.5},
    'bf16 + FLIP 0.5': {'amp': 'bf16', 'mask_ratio': 0.5},
    'grad checkpointing': {'grad_checkpointing': True},
}

WORKER = r'''
import json, sys, time, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
import modelscope_cnclip
from modelscope.trainers import build_trainer
options = json.loads({options!r})
device = {device!r}
trainer = build_trainer('cnclip-trainer', dict(model={model!r}, work_dir={work!r}, train_dataset={data!r},
    device=device, cfg_overrides={{'train': {{'max_epochs': 1, 'dataloader': {{'batch_size_per_gpu': {batch},
    'workers_per_gpu': 0}}}}}}, **options))
if device.startswith('cuda'):
    trainer.model.to(device)
batch = next(iter(trainer.get_train_dataloader()))
batch = {{k: v.to(device) for k, v in batch.items()}}
opt = trainer.optimizers[0]
def step():
    trainer.train_step(trainer.model, batch)
    trainer.train_outputs['loss'].backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
step()
t = time.perf_counter()
for _ in range({steps}):
    step()
sec = (time.perf_counter() - t) / {steps}
gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith('cuda') else None
print(json.dumps({{'samples_s': {batch} / sec, 'rss_gb': {peak}, 'gpu_gb': gpu}}))
'''


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='ViT-B-16')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', type=Path)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from modelscope_cnclip import get_config
    from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir
    from modelscope_cnclip.data import make_synthetic_split
    from modelscope_cnclip.model import CLIP

    rows = []
    with tempfile.TemporaryDirectory(prefix='cnclip-train-bench-') as tmp:
        root = Path(tmp)
        cfg = get_config(args.arch)
        torch.manual_seed(0)
        write_dir(Checkpoint(CLIP(cfg).state_dict(), cfg), root / 'model')
        make_synthetic_split(root / 'data', 'train', args.batch * 2, size=cfg.vision.image_size)
        for name, options in CONFIGS.items():
            code = WORKER.format(repo=str(REPO), threads=args.threads, options=json.dumps(options),
                                 device=args.device, model=str(root / 'model'), work=str(root / 'work'),
                                 data=str(root / 'data'), batch=args.batch, steps=args.steps, peak=PEAK_RSS_GB)
            out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=3600)
            if out.returncode:
                raise RuntimeError(f'{name}: {out.stderr[-2000:]}')
            rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[0][1]['samples_s']
    lines = [f'# Training step benchmark: {args.arch}, batch {args.batch}, {args.device}, {args.threads} threads\n',
             f'`python benchmarks/bench_train.py {" ".join(argv if argv is not None else sys.argv[1:])}`'.rstrip()
             + f' ({time.strftime("%Y-%m-%d")}, torch {torch.__version__})\n',
             '| configuration | samples/s | x plain fp32 | peak RSS | peak GPU memory |', '|---|---|---|---|---|']
    for name, r in rows:
        gpu = f'{r["gpu_gb"]:.2f} GB' if r['gpu_gb'] is not None else 'n/a'
        lines.append(f'| {name} | {r["samples_s"]:.2f} | {r["samples_s"] / base:.2f} | {r["rss_gb"]:.2f} GB | {gpu} |')
    emit(lines, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
