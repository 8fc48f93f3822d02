"""The trainer's evaluation scores exactly the evaluation pairs, each image and text embedded once, whatever the
evaluation loader does (the finetune tutorial shuffles it and drops the last batch) and whichever images are
unreadable."""
import pytest
from modelscope.trainers import build_trainer

import modelscope_cnclip  # noqa: F401  (registers the trainer)
from modelscope_cnclip import load
from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir
from modelscope_cnclip.data import make_synthetic_split, write_official_split
from modelscope_cnclip.evaluation.retrieval import evaluate_split

from conftest import TINY_VIT, random_state_dict

KEYS = {f'{d}_{k}' for d in ('t2i', 'i2t') for k in ('recall_at_1', 'recall_at_5', 'recall_at_10', 'mean_recall')}
INBATCH = {'inbatch_t2i_recall_at_1', 'inbatch_i2t_recall_at_1'}


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return write_dir(Checkpoint(random_state_dict(TINY_VIT, seed=4), TINY_VIT), tmp_path_factory.mktemp('m') / 'model')


def evaluate(model_dir, work, data, loader=None, **kwargs) -> dict:
    overrides = {'evaluation': {'dataloader': {'batch_size_per_gpu': 8, 'workers_per_gpu': 0, **(loader or {})}}}
    trainer = build_trainer('cnclip-trainer', dict(model=str(model_dir), work_dir=str(work), eval_dataset=str(data),
                                                   cfg_overrides=overrides, **kwargs))
    return trainer, trainer.evaluate()


def test_evaluation_does_not_depend_on_the_loader_options(model_dir, tmp_path):
    make_synthetic_split(tmp_path / 'd', 'valid', 30, seed=8, unique=True)  # 30 pairs: batches of 8 leave 6
    _, plain = evaluate(model_dir, tmp_path / 'a', tmp_path / 'd', {'shuffle': False, 'drop_last': False})
    _, tutorial = evaluate(model_dir, tmp_path / 'b', tmp_path / 'd', {'shuffle': True, 'drop_last': True})
    assert set(plain) == KEYS | INBATCH
    assert tutorial == plain
    # the global numbers are `cnclip eval`'s on the same split
    split = evaluate_split(load(model_dir), tmp_path / 'd', 'valid', batch_size=8)
    for d in ('t2i', 'i2t'):
        assert [plain[f'{d}_recall_at_{k}'] for k in (1, 5, 10)] + [plain[f'{d}_mean_recall']] == \
            [split[d][k] for k in ('r1', 'r5', 'r10', 'mr')]


def test_skip_errors_evaluation_equals_the_split_without_that_pair(model_dir, tmp_path):
    split = make_synthetic_split(tmp_path / 'full', 'valid', 20, seed=9, unique=True)
    images = {i: split.image_bytes(i) for i in split.image_ids}
    bad = split.image_ids[5]
    write_official_split(tmp_path / 'corrupt', 'valid', {**images, bad: b'not a jpeg'}, split.texts)
    write_official_split(tmp_path / 'without', 'valid', {i: b for i, b in images.items() if i != bad},
                         [t for t in split.texts if bad not in t.image_ids])
    trainer, skipped = evaluate(model_dir, tmp_path / 'a', tmp_path / 'corrupt', skip_errors=True)
    _, without = evaluate(model_dir, tmp_path / 'b', tmp_path / 'without')
    assert skipped == without and trainer.eval_pairs.skipped == [bad]
    with pytest.raises(ValueError, match=rf'1 of 20 images cannot be read \(image {bad}: ValueError: cannot decode '
                                         rf'image .*skip_errors=True'):
        evaluate(model_dir, tmp_path / 'c', tmp_path / 'corrupt')
