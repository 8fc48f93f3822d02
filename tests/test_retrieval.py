"""evaluation/retrieval.py: retrieval metrics with the official scoring, the official prediction files and scorer,
chunked ranking, unlabelled splits, the generated dataset and `cnclip eval`."""
import json

import pytest
import torch
import torch.nn.functional as F

from modelscope_cnclip.cli import main
from modelscope_cnclip.data import OfficialSplit, TextRecord, make_synthetic_split, write_official_split
from modelscope_cnclip.evaluation.retrieval import (
    inbatch_recall,
    retrieval_metrics,
    score_predictions,
    t2i_to_i2t,
    topk_hits,
    topk_predictions,
    write_predictions,
)

from helpers import SCORING, official_result


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


def test_generated_dataset_and_cli_eval(tmp_path, plugin_vit_dir, capsys):
    split = make_synthetic_split(tmp_path, 'valid', 12, seed=3)
    assert len(split.texts) == 12 and all(len(t.image_ids) == 1 for t in split.texts)
    assert any('圆形' in t.text or '正方形' in t.text or '三角形' in t.text for t in split.texts)
    assert main(['eval', str(plugin_vit_dir), '--data', str(tmp_path), '--split', 'valid']) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {'t2i', 'i2t'} and set(out['t2i']) == {'r1', 'r5', 'r10', 'mr'}
    assert 0 <= out['t2i']['r1'] <= out['t2i']['r5'] <= out['t2i']['r10'] <= 100
    pytest.importorskip('lmdb')
    from modelscope_cnclip.data import write_lmdb_split
    write_lmdb_split(split, tmp_path / 'lmdb', 'valid')  # the official LMDB form of the same split scores the same
    assert main(['eval', str(plugin_vit_dir), '--data', str(tmp_path / 'lmdb'), '--split', 'valid']) == 0
    assert json.loads(capsys.readouterr().out) == out


# --- the official prediction files and scorer ------------------------------------------------------------------------

def test_score_predictions_reproduces_the_official_scorers():
    # exact float equality: the same arithmetic as eval/evaluation.py and eval/evaluation_tr.py
    assert score_predictions(SCORING / 'pred_t2i.jsonl', SCORING / 'gt.jsonl') == official_result('out_t2i.json')
    i2t = official_result('out_i2t.json')
    assert score_predictions(SCORING / 'pred_i2t.jsonl', SCORING / 'gt.tr.jsonl', 'i2t') == i2t
    assert score_predictions(SCORING / 'pred_i2t.jsonl', SCORING / 'gt.jsonl', 'i2t') == i2t  # transformed here


def test_i2t_ground_truth_is_the_official_transform():
    gt = [json.loads(line) for line in (SCORING / 'gt.jsonl').read_text().splitlines()]
    want = [json.loads(line) for line in (SCORING / 'gt.tr.jsonl').read_text().splitlines()]
    assert t2i_to_i2t(gt) == want
    assert t2i_to_i2t([{'text_id': 1, 'image_ids': [5, 4]}, {'text_id': 2, 'image_ids': [4]}]) == [
        {'image_id': 5, 'text_ids': [1]}, {'image_id': 4, 'text_ids': [1, 2]}]


@pytest.mark.parametrize('name, message', [
    ('nine', r'bad_nine.jsonl:1: text_id 1 has 9 predicted image_ids; 10 are required'),
    ('str_query', r"bad_str_query.jsonl:1: text_id '1' must be an integer"),
    ('str_candidate', r"bad_str_candidate.jsonl:1: text_id 1 has an invalid image_id '1000' at rank 1"),
    ('duplicate', r'bad_duplicate.jsonl:1: text_id 1 has duplicate image_ids'),
    ('missing', r'bad_missing.jsonl: 1 text_ids of .*gt.jsonl have no prediction: 1 \(line 1\)'),
    ('no_query', r'bad_no_query.jsonl:1: no "text_id"'),
    ('not_list', r'bad_not_list.jsonl:1: "image_ids" of text_id 1 must be a list'),
])
def test_score_predictions_rejects_what_the_official_rejects(name, message):
    assert name in json.loads((SCORING / 'bad.json').read_text())  # the official scorer failed on this file
    with pytest.raises(ValueError, match=message):
        score_predictions(SCORING / f'bad_{name}.jsonl', SCORING / 'gt.jsonl')


def test_score_predictions_other_errors(tmp_path):
    lines = (SCORING / 'pred_t2i.jsonl').read_text().splitlines()
    (tmp_path / 'twice.jsonl').write_text('\n'.join(lines + lines[:1]) + '\n')
    with pytest.raises(ValueError, match=r'twice.jsonl:14: text_id 1 again \(first on line 1\)'):
        score_predictions(tmp_path / 'twice.jsonl', SCORING / 'gt.jsonl')
    with pytest.raises(ValueError, match=r"direction='x2y': choose one of \['t2i', 'i2t'\]"):
        score_predictions(SCORING / 'pred_t2i.jsonl', SCORING / 'gt.jsonl', 'x2y')
    with pytest.raises(FileNotFoundError, match='nope.jsonl not found'):
        score_predictions(tmp_path / 'nope.jsonl', SCORING / 'gt.jsonl')
    with pytest.raises(ValueError, match=r'gt.tr.jsonl:1: expected a \{"text_id", "image_ids": \[...\]\} object'):
        score_predictions(SCORING / 'pred_t2i.jsonl', SCORING / 'gt.tr.jsonl', 't2i')


def test_topk_predictions_break_ties_like_the_official_sort():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 30), generator=g).float()  # many ties
    preds = topk_predictions(scores, list(range(50)), [100 + c for c in range(30)], k=10)
    for q, (qid, ranked) in enumerate(preds):
        # make_topk_predictions.py: sorted((id, score) ..., key=score, reverse=True)[:10] (stable)
        want = [i for i, _ in sorted(zip(range(100, 130), scores[q].tolist()), key=lambda x: x[1], reverse=True)][:10]
        assert qid == q and ranked == want
    assert topk_hits(scores, torch.zeros(50, 30, dtype=torch.bool) | (torch.arange(30) == 0), ks=(1,)) == {
        1: 100.0 * sum(p[1][0] == 100 for p in preds) / 50}
    with pytest.raises(ValueError, match=r'scores \(50, 30\) must be \(len\(query_ids\), len\(candidate_ids\)\)'):
        topk_predictions(scores, list(range(49)), list(range(30)))


def test_retrieval_metrics_equal_the_score_of_written_predictions(tmp_path):
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(25, 8, generator=g), dim=-1)
    image_ids = list(range(500, 525))
    truth = [[500 + (3 * t) % 25] + ([500 + (7 * t + 1) % 25] if t % 4 == 0 else []) for t in range(18)]
    txt = F.normalize(img[[ids[0] - 500 for ids in truth]] + 1.2 * torch.randn(18, 8, generator=g), dim=-1)
    want = retrieval_metrics(img, image_ids, txt, truth)
    assert 0 < want['t2i']['r1'] < 100 and 0 < want['i2t']['r1'] < 100  # not trivial
    text_ids = list(range(18))
    (tmp_path / 'gt.jsonl').write_text(''.join(
        json.dumps({'text_id': t, 'text': 'x', 'image_ids': ids}) + '\n' for t, ids in zip(text_ids, truth)))
    scores = txt @ img.T
    write_predictions(tmp_path / 't2i.jsonl', topk_predictions(scores, text_ids, image_ids), 't2i')
    write_predictions(tmp_path / 'i2t.jsonl', topk_predictions(scores.T, image_ids, text_ids), 'i2t')
    assert json.loads((tmp_path / 'i2t.jsonl').read_text().splitlines()[0]).keys() == {'image_id', 'text_ids'}
    for direction in ('t2i', 'i2t'):
        got = score_predictions(tmp_path / f'{direction}.jsonl', tmp_path / 'gt.jsonl', direction)
        assert {k: round(v, 4) for k, v in got.items()} == want[direction]


def test_cli_eval_writes_predictions_and_score_reproduces_them(tmp_path, plugin_vit_dir, capsys):
    make_synthetic_split(tmp_path, 'valid', 14, seed=5)
    out = tmp_path / 'pred'
    assert main(['eval', str(plugin_vit_dir), '--data', str(tmp_path), '--out', str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ['valid_predictions.jsonl', 'valid_texts.tr.jsonl',
                                                    'valid_tr_predictions.jsonl']
    first = json.loads((out / 'valid_predictions.jsonl').read_text().splitlines()[0])
    assert first['text_id'] == 0 and len(first['image_ids']) == 10
    for direction, pred, gt in [('t2i', 'valid_predictions.jsonl', tmp_path / 'valid_texts.jsonl'),
                                ('i2t', 'valid_tr_predictions.jsonl', out / 'valid_texts.tr.jsonl')]:
        assert main(['score', str(out / pred), str(gt), '--direction', direction]) == 0
        scored = json.loads(capsys.readouterr().out)[direction]
        assert {k: round(v, 4) for k, v in scored.items()} == metrics[direction]
    assert main(['score', str(out / 'valid_predictions.jsonl'), str(tmp_path / 'nope.jsonl')]) == 2
    assert 'nope.jsonl not found' in capsys.readouterr().err


# --- unlabelled splits (MUGE's test form) -----------------------------------------------------------------------------

def write_texts(d, split: str, texts) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / f'{split}_texts.jsonl').write_text(''.join(
        json.dumps({'text_id': t.text_id, 'text': t.text, 'image_ids': list(t.image_ids)}, ensure_ascii=False) + '\n'
        for t in texts), encoding='utf-8')


def read_lines(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_eval_of_an_unlabelled_split_writes_the_submission_files(tmp_path, plugin_vit_dir, capsys, caplog):
    split = make_synthetic_split(tmp_path / 'labelled', 'test', 14, seed=6)
    make_synthetic_split(tmp_path / 'd', 'test', 14, seed=6)
    write_texts(tmp_path / 'd', 'test', [TextRecord(t.text_id, t.text, ()) for t in split.texts])
    base = ['eval', str(plugin_vit_dir), '--data', str(tmp_path / 'd'), '--split', 'test']
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "none of the 14 texts of split 'test' has image_ids" in err and 'no ground truth to score' in err
    assert 'Pass predictions_dir (CLI: --out DIR)' in err
    out = tmp_path / 'submit'
    assert main(base + ['--out', str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res['t2i'] is None and res['i2t'] is None and res['unlabelled_texts'] == 14
    assert res['note'].startswith('no ground truth to score: none of the 14 texts of test has image_ids')
    assert 'no ground truth to score' in caplog.text  # logged too (stderr)
    assert sorted(p.name for p in out.iterdir()) == ['test_predictions.jsonl', 'test_tr_predictions.jsonl']
    t2i, i2t = read_lines(out / 'test_predictions.jsonl'), read_lines(out / 'test_tr_predictions.jsonl')
    assert [r['text_id'] for r in t2i] == [t.text_id for t in split.texts]
    assert [r['image_id'] for r in i2t] == split.image_ids
    assert all(len(set(r['image_ids'])) == 10 for r in t2i) and all(len(set(r['text_ids'])) == 10 for r in i2t)
    # the same rankings as the labelled split's
    assert main(['eval', str(plugin_vit_dir), '--data', str(tmp_path / 'labelled'), '--split', 'test',
                 '--out', str(tmp_path / 'labelled' / 'p')]) == 0
    for name in ('test_predictions.jsonl', 'test_tr_predictions.jsonl'):
        assert (out / name).read_text() == (tmp_path / 'labelled' / 'p' / name).read_text()


def test_partly_labelled_split_scores_the_labelled_texts(tmp_path, tiny_model, caplog):
    from modelscope_cnclip.evaluation.retrieval import evaluate_split
    split = make_synthetic_split(tmp_path, 'valid', 16, seed=7, unique=True)
    labelled = [t for t in split.texts if t.text_id % 2 == 0]
    write_texts(tmp_path / 'only', 'valid', labelled)
    (tmp_path / 'only' / 'valid_imgs.tsv').write_bytes((tmp_path / 'valid_imgs.tsv').read_bytes())
    write_texts(tmp_path, 'valid', [t if t in labelled else TextRecord(t.text_id, t.text, ()) for t in split.texts])
    res = evaluate_split(tiny_model, tmp_path, 'valid', predictions_dir=tmp_path / 'p')
    assert res['unlabelled_texts'] == 8 and '8 of 16 texts of valid have no image_ids' in caplog.text
    assert res['t2i'] == evaluate_split(tiny_model, tmp_path / 'only', 'valid')['t2i']  # images rank the same
    assert len(read_lines(tmp_path / 'p' / 'valid_predictions.jsonl')) == 16  # every text is predicted
    i2t = score_predictions(tmp_path / 'p' / 'valid_tr_predictions.jsonl', tmp_path / 'p' / 'valid_texts.tr.jsonl',
                            'i2t')
    assert {k: round(v, 4) for k, v in i2t.items()} == res['i2t']
    # the official scorer counts the unlabelled texts as misses (with a warning): half the hits' share
    caplog.clear()
    t2i = score_predictions(tmp_path / 'p' / 'valid_predictions.jsonl', tmp_path / 'valid_texts.jsonl')
    assert t2i['r10'] == pytest.approx(res['t2i']['r10'] / 2, abs=1e-3)
    assert '8 of 16 text_ids have no correct image_id; they count as misses' in caplog.text


def test_score_refuses_an_unlabelled_ground_truth_and_warns_on_a_partial_one(tmp_path, caplog, capsys):
    gt = read_lines(SCORING / 'gt.jsonl')
    # texts 4 and 8 are misses in the golden predictions: without their labels the official numbers are unchanged
    (tmp_path / 'partial.jsonl').write_text(''.join(
        json.dumps(dict(r, image_ids=[] if r['text_id'] in (4, 8) else r['image_ids'])) + '\n' for r in gt))
    assert score_predictions(SCORING / 'pred_t2i.jsonl', tmp_path / 'partial.jsonl') == official_result('out_t2i.json')
    assert '2 of 12 text_ids have no correct image_id; they count as misses' in caplog.text
    assert '4 (line 4), 8 (line 8)' in caplog.text
    (tmp_path / 'none.jsonl').write_text(''.join(json.dumps(dict(r, image_ids=[])) + '\n' for r in gt))
    with pytest.raises(ValueError, match=r'none.jsonl: none of the 12 text_ids has a correct image_id .*an unlabelled '
                                         r'ground truth, like a test split, has nothing to score'):
        score_predictions(SCORING / 'pred_t2i.jsonl', tmp_path / 'none.jsonl')
    with pytest.raises(ValueError, match=r'none.jsonl: no text lists an image: an unlabelled ground truth'):
        score_predictions(SCORING / 'pred_i2t.jsonl', tmp_path / 'none.jsonl', 'i2t')
    assert main(['score', str(SCORING / 'pred_t2i.jsonl'), str(tmp_path / 'none.jsonl')]) == 2
    assert 'nothing to score' in capsys.readouterr().err


def test_lmdb_form_of_an_unlabelled_split_says_what_to_do(tmp_path, tiny_model):
    pytest.importorskip('lmdb')
    from modelscope_cnclip.data import write_lmdb_split
    from modelscope_cnclip.evaluation.retrieval import evaluate_split
    split = make_synthetic_split(tmp_path, 'test', 12, seed=2)
    write_texts(tmp_path, 'test', [TextRecord(t.text_id, t.text, ()) for t in split.texts])
    write_lmdb_split(OfficialSplit(tmp_path, 'test'), tmp_path / 'lmdb', 'test')  # no pairs: texts are not stored
    with pytest.raises(ValueError, match=r"split 'test' has no texts to evaluate. The LMDB form stores \(image, text\) "
                                         r'pairs only, .*evaluate the tsv \+ jsonl form'):
        evaluate_split(tiny_model, tmp_path / 'lmdb', 'test', predictions_dir=tmp_path / 'p')


# --- bounded memory: streamed images, rankings in query chunks -------------------------------------------------------

def test_chunked_ranking_equals_unchunked(monkeypatch):
    import modelscope_cnclip.evaluation.retrieval as evaluation
    from modelscope_cnclip.evaluation.retrieval import rank_both
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    txt = F.normalize(img[torch.arange(33) % 40] + torch.randn(33, 16, generator=g), dim=-1)
    ids = list(range(700, 740))
    truth = [[700 + t % 40] + ([700 + (5 * t) % 40] if t % 3 == 0 else []) for t in range(33)]
    want = retrieval_metrics(img, ids, txt, truth)
    assert 0 < want['t2i']['r1'] < 100 and 0 < want['i2t']['r5'] < 100
    seen = []
    real = evaluation._topk_indices
    monkeypatch.setattr(evaluation, '_topk_indices', lambda s, k: seen.append(s.shape[0]) or real(s, k))
    assert retrieval_metrics(img, ids, txt, truth, chunk=7) == want
    assert max(seen) <= 7  # never more than 7 rows of scores at once
    scores = txt @ img.T
    t2i, i2t = rank_both(txt, img, chunk=7)
    assert t2i.tolist() == [r for _, r in topk_predictions(scores, range(33), range(40))]
    assert i2t.tolist() == [r for _, r in topk_predictions(scores.T, range(40), range(33))]


def test_chunked_ranking_keeps_the_official_tie_order():
    from modelscope_cnclip.evaluation.retrieval import rank_both
    g = torch.Generator().manual_seed(3)
    # small integers: every product is exact, so equal scores are equal whatever the chunk
    img, txt = torch.randint(0, 3, (30, 4), generator=g).float(), torch.randint(0, 3, (25, 4), generator=g).float()
    scores = txt @ img.T
    for chunk in (1, 7, None):
        t2i, i2t = rank_both(txt, img, chunk=chunk)
        for q in range(25):  # make_topk_predictions.py: a stable sort by score, descending
            assert t2i[q].tolist() == sorted(range(30), key=lambda c: -scores[q, c].item())[:10]
        for q in range(30):
            assert i2t[q].tolist() == sorted(range(25), key=lambda c: -scores[c, q].item())[:10]


def test_evaluate_split_streams_images_and_chunks_give_the_same_files(tmp_path, tiny_model, monkeypatch):
    from modelscope_cnclip.evaluation.retrieval import evaluate_split
    make_synthetic_split(tmp_path, 'valid', 20, seed=7)
    full = evaluate_split(tiny_model, tmp_path, 'valid', batch_size=4, predictions_dir=tmp_path / 'a')
    calls = []
    real = tiny_model.encode_image  # the shared model: monkeypatch puts encode_image back after the test
    monkeypatch.setattr(tiny_model, 'encode_image', lambda images, batch_size=64: calls.append(images) or
                        real(images, batch_size=batch_size))
    chunked = evaluate_split(tiny_model, tmp_path, 'valid', batch_size=4, predictions_dir=tmp_path / 'b', chunk=7)
    # decoded pixels a batch at a time, never the list of every encoded image
    assert all(isinstance(c, torch.Tensor) and c.shape[0] <= 4 for c in calls) and sum(len(c) for c in calls) == 20
    assert chunked == full
    for name in ('valid_predictions.jsonl', 'valid_tr_predictions.jsonl', 'valid_texts.tr.jsonl'):
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()


def test_unreadable_image_in_a_split_is_named(tmp_path, tiny_model):
    from modelscope_cnclip.evaluation.retrieval import evaluate_split
    split = make_synthetic_split(tmp_path, 'valid', 6, seed=1)
    images = {i: split.image_bytes(i) for i in split.image_ids}
    write_official_split(tmp_path, 'valid', {**images, 1003: b'not a jpeg'}, split.texts)
    with pytest.raises(ValueError, match=r'1 of 6 images cannot be read \(image 1003: ValueError: cannot decode'):
        evaluate_split(tiny_model, tmp_path, 'valid')
