"""Retrieval metrics with the official scoring, official-format data, the generated dataset and `cnclip eval`."""
import json

import pytest
import torch
import torch.nn.functional as F

from modelscope_cnclip.cli import main
from modelscope_cnclip.data import OfficialSplit, TextRecord, make_synthetic_split, write_official_split
from modelscope_cnclip.evaluation import inbatch_recall, retrieval_metrics, topk_hits


def test_topk_hits_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]])
    correct = torch.tensor([[True, False, False], [True, False, False], [False, True, True]])
    # row 0: hit at rank 1; row 1: correct is ranked 3rd; row 2: rank 1 is correct (col 2)
    assert topk_hits(scores, correct, ks=(1, 2, 3)) == {1: pytest.approx(200 / 3), 2: pytest.approx(200 / 3),
                                                        3: pytest.approx(100.0)}


def test_retrieval_metrics_official_semantics():
    # 3 images, 4 texts; text 3 has two correct images (any of them counts), image 'c' is described by texts 2, 3.
    img = F.normalize(torch.eye(3), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.1, 1.0], [0.0, 0.2, 1.0], [0.0, 1.0, 0.9]]), dim=-1)
    out = retrieval_metrics(img, ['a', 'b', 'c'], txt, [['a'], ['b'], ['c'], ['b', 'c']])
    # t2i top-1: text0->a ok, text1->c wrong (b correct), text2->c ok, text3->b ok => 75%; all ok by rank 2
    assert out['t2i']['r1'] == 75.0 and out['t2i']['r5'] == 100.0 and out['t2i']['r10'] == 100.0
    assert out['t2i']['mr'] == pytest.approx((75 + 100 + 100) / 3, abs=1e-3)
    # i2t top-1: a->text0 ok; b->text3 ok; c->text1 (0.995, describes b) wrong
    assert out['i2t']['r1'] == pytest.approx(200 / 3, abs=1e-3) and out['i2t']['r5'] == 100.0


def test_metric_input_errors():
    e = torch.eye(2)
    with pytest.raises(ValueError, match=r"text 0: image ids \['z'\] are not among the evaluated images"):
        retrieval_metrics(e, ['a', 'b'], e, [['z'], ['a']])
    with pytest.raises(ValueError, match='duplicates'):
        retrieval_metrics(e, ['a', 'a'], e, [['a'], ['a']])
    with pytest.raises(ValueError, match='aligned pairs'):
        inbatch_recall(e, torch.eye(3))


def test_inbatch_recall_keys_match_the_tutorial_config():
    out = inbatch_recall(torch.eye(4), torch.eye(4))
    assert out == {'inbatch_t2i_recall_at_1': 100.0, 'inbatch_i2t_recall_at_1': 100.0}


def test_official_split_round_trip_and_errors(tmp_path, images):
    texts = [TextRecord(1, '猫', (7,)), TextRecord(2, '两只猫', (7, 8))]
    write_official_split(tmp_path, 'valid', {7: images[0], 8: images[1]}, texts)
    split = OfficialSplit(tmp_path, 'valid')
    assert split.image_ids == [7, 8] and split.texts == texts
    assert list(split.pairs()) == [(1, '猫', 7), (2, '两只猫', 7), (2, '两只猫', 8)]
    assert split.image_bytes(8)[:2] == b'\xff\xd8'  # JPEG
    with pytest.raises(FileNotFoundError, match=r"split 'test' needs \['test_imgs.tsv', 'test_texts.jsonl'\]"):
        OfficialSplit(tmp_path, 'test')
    (tmp_path / 'bad_texts.jsonl').write_text('{"text_id": 1, "text": "x", "image_ids": [99]}\n')
    (tmp_path / 'bad_imgs.tsv').write_text((tmp_path / 'valid_imgs.tsv').read_text())
    with pytest.raises(ValueError, match=r'image ids \[99\] are not in bad_imgs.tsv'):
        OfficialSplit(tmp_path, 'bad')
    (tmp_path / 'bad_texts.jsonl').write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r'bad_texts.jsonl:1: expected'):
        OfficialSplit(tmp_path, 'bad')


def test_generated_dataset_and_cli_eval(tmp_path, plugin_vit_dir, capsys):
    split = make_synthetic_split(tmp_path, 'valid', 12, seed=3)
    assert len(split.texts) == 12 and all(len(t.image_ids) == 1 for t in split.texts)
    assert any('圆形' in t.text or '正方形' in t.text or '三角形' in t.text for t in split.texts)
    assert main(['eval', str(plugin_vit_dir), '--data', str(tmp_path), '--split', 'valid']) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {'t2i', 'i2t'} and set(out['t2i']) == {'r1', 'r5', 'r10', 'mr'}
    assert 0 <= out['t2i']['r1'] <= out['t2i']['r5'] <= out['t2i']['r10'] <= 100
