"""Run by tests/test_train.py under `torch.distributed.run --nproc_per_node 2` (CPU with gloo, or GPUs with NCCL)."""
import hashlib
import json
import os
import sys

import torch
from modelscope.trainers import build_trainer

import modelscope_cnclip  # noqa: F401

root, full_grad = sys.argv[1], sys.argv[2] == 'full'
device = sys.argv[3] if len(sys.argv) > 3 else 'cpu'
trainer = build_trainer('cnclip-trainer', dict(
    model=f'{root}/model', work_dir=f'{root}/work', train_dataset=f'{root}/data', device=device,
    full_grad_gather=full_grad,
    cfg_overrides={'train': {'max_epochs': 2, 'dataloader': {'batch_size_per_gpu': 16, 'workers_per_gpu': 0},
                             'optimizer_hparams': {'lr': 1e-3, 'weight_decay': 0.0}}}))
trainer.train()
digest = hashlib.sha256(b''.join(v.detach().cpu().numpy().tobytes() for v in trainer.model.clip.state_dict().values()
                                 if v.is_floating_point())).hexdigest()
rank = int(os.environ['RANK'])
with open(f'{root}/rank{rank}.json', 'w') as f:
    json.dump({'digest': digest, 'world': torch.distributed.get_world_size(), 'iters': trainer.iter,
               'global_batch': trainer.global_batch_size}, f)
