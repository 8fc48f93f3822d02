"""Golden outputs of the official Chinese-CLIP evaluation code: retrieval scoring and zero-shot classification.

NOT part of the test suite: run it with the reference venv that has the official ``cn_clip`` 1.6.0 (see
``make_golden.py``)::

    /work/refvenv/bin/python tests/golden/make_eval_golden.py        # from the repository root

Deterministic; re-running rewrites byte-identical files on the same versions. It writes:

``tests/data/golden/scoring/``
    ``gt.jsonl`` (text-to-image ground truth: 12 texts, some with two correct images), ``pred_t2i.jsonl``
    (top-10 predictions whose first correct image sits at rank 1, 2, 3, 5, 7, 10 or nowhere, plus a line for a text
    that the ground truth lacks), ``gt.tr.jsonl`` (made by the official ``transform_ir_annotation_to_tr.py``),
    ``pred_i2t.jsonl``, the official ``eval/evaluation.py`` / ``eval/evaluation_tr.py`` outputs ``out_t2i.json``
    / ``out_i2t.json``, and ``bad_*.jsonl`` prediction files that the official scorer rejects, with its
    messages in ``bad.json``. The scorers are run as scripts (``python -m cn_clip.eval.evaluation GT PRED OUT``).

``tests/data/golden/zeroshot/golden.json``
    An ImageFolder laid out from ``tests/data/golden/inputs/`` images (``layout``: folder path -> input file;
    RGBA, P, CMYK, I;16 images included, where converting to RGB before the resize matters), class names and
    templates (curly quotes and upper case included), and what the official ``zero_shot_classifier`` and ``run``
    of ``eval/zeroshot_evaluation.py`` return on CPU for the ``tiny-vit`` golden model: the ``(D, C)`` classifier,
    the ``(N, C)`` softmax outputs, top-1, and the ELEVATER JSON its ``json_prec_dump`` writes. (Its
    ``accuracy()`` fails on numpy >= 2.4, so the script swaps in the same arithmetic with ``.item()``.)
"""
from __future__ import annotations

import importlib.metadata
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GOLDEN = REPO / 'tests' / 'data' / 'golden'
SCORING = GOLDEN / 'scoring'
ZEROSHOT = GOLDEN / 'zeroshot'

# --- retrieval scoring -------------------------------------------------------------------------------------------

IMAGES = list(range(1000, 1030))
# text_id -> (correct image ids, rank of the first correct image in the prediction (None: not in the top 10))
CASES = {
    1: ([1000], 1), 2: ([1001], 3), 3: ([1002], 7), 4: ([1003], None), 5: ([1004], 5), 6: ([1005], 10),
    7: ([1006, 1007], 2), 8: ([1008], None), 9: ([1009, 1010], 1), 10: ([1011], 6), 11: ([1012], 3),
    12: ([1000, 1013], 8),
}


def ranked(correct: list, rank: int | None, pool: list, rng: random.Random, k: int = 10) -> list:
    """k distinct ids from ``pool``: ``correct[0]`` at ``rank`` (1-based) and no other correct id before it."""
    others = [i for i in pool if i not in correct]
    rng.shuffle(others)
    out = others[:k]
    if rank is not None:
        out[rank - 1] = correct[0]
        if len(correct) > 1 and rank < k:  # the second correct image further down, where it cannot change a hit
            out[k - 1] = correct[1]
    return out


def official(script: str, gt: Path, pred: Path, out: Path) -> dict:
    subprocess.run([sys.executable, '-m', f'cn_clip.eval.{script}', str(gt), str(pred), str(out)], check=True,
                   capture_output=True)
    return json.loads(out.read_text())


def write_jsonl(path: Path, records: list) -> None:
    path.write_text(''.join(json.dumps(r) + '\n' for r in records), encoding='utf-8')


def make_scoring() -> None:
    shutil.rmtree(SCORING, ignore_errors=True)
    SCORING.mkdir(parents=True)
    rng = random.Random(20240611)
    gt = [{'text_id': t, 'text': f'文本{t}', 'image_ids': c} for t, (c, _) in CASES.items()]
    write_jsonl(SCORING / 'gt.jsonl', gt)
    preds = [{'text_id': t, 'image_ids': ranked(c, r, IMAGES, rng)} for t, (c, r) in CASES.items()]
    preds.insert(4, {'text_id': 99, 'image_ids': IMAGES[:10]})  # not in the ground truth: ignored
    write_jsonl(SCORING / 'pred_t2i.jsonl', preds)
    official('evaluation', SCORING / 'gt.jsonl', SCORING / 'pred_t2i.jsonl', SCORING / 'out_t2i.json')

    subprocess.run([sys.executable, '-m', 'cn_clip.eval.transform_ir_annotation_to_tr', '--input',
                    str(SCORING / 'gt.jsonl')], check=True, capture_output=True)
    tr = [json.loads(line) for line in (SCORING / 'gt.tr.jsonl').read_text().splitlines()]
    texts = list(CASES)
    ranks = [1, 2, 3, None, 5, 7, 10, 1, None, 4, 9, 1, 6, 2]
    preds_tr = [{'image_id': o['image_id'], 'text_ids': ranked(o['text_ids'], ranks[i % len(ranks)], texts, rng)}
                for i, o in enumerate(tr)]
    write_jsonl(SCORING / 'pred_i2t.jsonl', preds_tr)
    official('evaluation_tr', SCORING / 'gt.tr.jsonl', SCORING / 'pred_i2t.jsonl', SCORING / 'out_i2t.json')

    good = preds[:4] + preds[5:]
    bad = {
        'nine': [dict(good[0], image_ids=good[0]['image_ids'][:9])] + good[1:],
        'str_query': [dict(good[0], text_id='1')] + good[1:],
        'str_candidate': [dict(good[0], image_ids=['1000'] + good[0]['image_ids'][1:])] + good[1:],
        'duplicate': [dict(good[0], image_ids=[1000] * 2 + good[0]['image_ids'][2:])] + good[1:],
        'missing': good[1:],
        'no_query': [{'image_ids': good[0]['image_ids']}] + good[1:],
        'not_list': [dict(good[0], image_ids=1000)] + good[1:],
    }
    messages = {}
    for name, records in bad.items():
        write_jsonl(SCORING / f'bad_{name}.jsonl', records)
        res = official('evaluation', SCORING / 'gt.jsonl', SCORING / f'bad_{name}.jsonl', SCORING / 'tmp.json')
        assert res['success'] is False, name
        messages[name] = res['errorMsg']
    (SCORING / 'tmp.json').unlink()
    (SCORING / 'bad.json').write_text(json.dumps(messages, ensure_ascii=False, indent=1) + '\n', encoding='utf-8')


# --- zero-shot classification ------------------------------------------------------------------------------------

LAYOUT = {  # ImageFolder path -> tests/data/golden/inputs file
    'a_cat/rgb.png': 'rgb.png', 'a_cat/sub/p.png': 'p.png', 'a_cat/RGBA.PNG': 'rgba.png',
    'b_dog/photo.jpg': 'photo.jpg', 'b_dog/cmyk.jpg': 'cmyk.jpg', 'b_dog/l.png': 'l.png',
    'c_shirt/la.png': 'la.png', 'c_shirt/gray.jpg': 'gray.jpg', 'c_shirt/bilevel.png': 'bilevel.png',
    'c_shirt/i16.png': 'i16.png', 'c_shirt/readme.txt': None, 'notes.txt': None,
}
CLASSNAMES = ['猫', '狗', 'T恤衫']
TEMPLATES = ['{}的照片', '质量差的{}的照片', '许多{}的照片', '{}的雕塑', '“{}”的PHOTO', '一张{}的Photo。']


def make_zeroshot() -> None:
    import cn_clip.eval.zeroshot_evaluation as zs
    import numpy as np
    import torch
    from cn_clip.clip.utils import image_transform
    from cn_clip.eval.data import get_zeroshot_dataset
    from cn_clip.eval.zeroshot_evaluation import run, zero_shot_classifier
    sys.path.insert(0, str(HERE))
    from make_golden import MODELS, build_model

    torch.set_num_threads(1)
    # The official accuracy() calls float() on a 1-element 1-d array, which numpy >= 2.4 refuses; the same
    # arithmetic with .item():
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum().item()) for k in topk]
    zs.accuracy = accuracy
    cfg = MODELS['tiny-vit']
    model, _, _ = build_model(cfg, cfg['seed'])
    lambdas = [lambda c, t=t: t.replace('{}', c) for t in TEMPLATES]
    with tempfile.TemporaryDirectory() as tmp:
        for rel, src in LAYOUT.items():
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src is None:
                dst.write_text('not an image')
            else:
                shutil.copyfile(GOLDEN / 'inputs' / src, dst)
        args = SimpleNamespace(gpu='cpu', context_length=52, datapath=tmp, img_batch_size=4, num_workers=0)
        data = get_zeroshot_dataset(args, image_transform(cfg['vision']['image_resolution']))
        samples = [(str(Path(p).relative_to(tmp)), t) for p, t in data.dataloader.dataset.samples]
        classifier = zero_shot_classifier(model, CLASSNAMES, lambdas, args)
        top1, logits = run(model, classifier, data.dataloader, args)

    def json_prec_dump(data, prec=6):  # verbatim from zeroshot_evaluation.py's __main__
        return json.dumps(json.loads(json.dumps(data), parse_float=lambda x: round(float(x), prec)))

    output_dict = {  # as zeroshot_evaluation.py's __main__, for --vision-model ViT-B-16 --dataset golden
        'model_name': 'CN-CLIP-' + 'ViT-B-16',
        'dataset_name': 'golden',
        'num_trainable_params': 0,
        'num_params': sum(x.numel() for x in model.parameters()),
        'num_visual_params': sum(x.numel() for x in model.visual.parameters()),
        'num_backbone_params': sum(x.numel() for x in model.parameters()),
        'n_shot': 0,
        'rnd_seeds': [123],
        'predictions': [logits.cpu().data.numpy().tolist()],
    }
    out = {
        'model': 'tiny-vit', 'seed': cfg['seed'], 'layout': LAYOUT, 'classnames': CLASSNAMES, 'templates': TEMPLATES,
        'classes': data.dataloader.dataset.classes, 'samples': samples,
        'classifier': np.asarray(classifier, dtype=np.float64).tolist(),
        'probs': np.asarray(logits, dtype=np.float64).tolist(), 'top1': top1,
        'elevater_json': json_prec_dump(output_dict),
        'versions': {n: importlib.metadata.version(n) for n in ('cn_clip', 'torch', 'torchvision', 'pillow')},
    }
    ZEROSHOT.mkdir(parents=True, exist_ok=True)
    (ZEROSHOT / 'golden.json').write_text(json.dumps(out, ensure_ascii=False, indent=1) + '\n', encoding='utf-8')


if __name__ == '__main__':
    make_scoring()
    make_zeroshot()
