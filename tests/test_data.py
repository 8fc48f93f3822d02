"""data.py: the official split written and read back, and self-made official-format data: files saved by Windows
tools and ids written as strings are read as the official tools read them (ids compared as ``"{}".format(id)``
strings), by every reader: the split, its LMDB form, the trainer's pairs, collections, `cnclip eval` and the scorer.
Ids that still do not match are reported with the cause.
"""
import base64
import json
import pickle
from pathlib import Path

import pytest

from modelscope_cnclip.cli import main
from modelscope_cnclip.data import (
    OfficialSplit,
    TextRecord,
    make_synthetic_split,
    parse_id,
    read_jsonl,
    write_official_split,
)
from modelscope_cnclip.evaluation.retrieval import score_predictions
from modelscope_cnclip.jobs.collection import open_collection
from modelscope_cnclip.train import read_pairs

from helpers import SCORING, official_result

BOM = '\ufeff'


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


def windows_copy(src: Path, dst: Path, split: str) -> None:
    """The split as a Windows editor saves it: a UTF-8 BOM and CRLF line ends in both files, and every id of the
    jsonl written as a string (``"image_ids": ["1000"]``)."""
    dst.mkdir(parents=True)
    tsv = (src / f'{split}_imgs.tsv').read_text(encoding='utf-8').splitlines()
    (dst / f'{split}_imgs.tsv').write_bytes((BOM + '\r\n'.join(tsv) + '\r\n').encode('utf-8'))
    lines = []
    for _, rec in read_jsonl(src / f'{split}_texts.jsonl'):
        rec = dict(rec, text_id=str(rec['text_id']), image_ids=[str(i) for i in rec['image_ids']])
        lines.append(json.dumps(rec, ensure_ascii=False))
    (dst / f'{split}_texts.jsonl').write_bytes((BOM + '\r\n'.join(lines) + '\r\n').encode('utf-8'))


@pytest.fixture
def splits(tmp_path):
    clean = make_synthetic_split(tmp_path / 'clean', 'valid', 12, seed=3)
    windows_copy(tmp_path / 'clean', tmp_path / 'win', 'valid')
    return clean, tmp_path / 'clean', tmp_path / 'win'


def test_ids_are_compared_as_the_official_strings():
    from modelscope_cnclip.data import canonical_id
    assert canonical_id('1000') == canonical_id(1000) == 1000
    assert canonical_id(1000.0) == '1000.0' and canonical_id('01000') == '01000' and canonical_id(' 1000') == ' 1000'
    assert parse_id('01000') == '01000' and parse_id('0') == 0 and parse_id('１２') == '１２'  # fullwidth digits
    with pytest.raises(ValueError, match=r'f.jsonl:3: id None must be an integer or a string'):
        canonical_id(None, 'f.jsonl:3')


def test_windows_saved_split_with_string_ids_reads_like_the_clean_one(splits):
    clean, _, win = splits
    messy = OfficialSplit(win, 'valid')
    assert messy.image_ids == clean.image_ids == list(range(1000, 1012))
    assert messy.texts == clean.texts and list(messy.pairs()) == list(clean.pairs())
    assert messy.image_bytes(1000) == messy.image_bytes('1000') == clean.image_bytes(1000)
    # the trainer's pairs (read through data.py) and collections
    pairs, want = read_pairs(win, 'valid'), read_pairs(splits[1], 'valid')
    assert [(t, i) for _, t, i in pairs] == [(t, i) for _, t, i in want] and pairs[0][0]() == want[0][0]()
    for modality in ('image', 'text'):
        a, b = open_collection(win, modality), open_collection(splits[1], modality)
        assert [i.id for i in a.items] == [i.id for i in b.items] and a.read(a.items[0]) == b.read(b.items[0])


def test_cli_eval_and_score_of_a_windows_saved_split(splits, plugin_vit_dir, tmp_path, capsys):
    _, clean_dir, win = splits
    outs = []
    for d in (clean_dir, win):
        assert main(['eval', str(plugin_vit_dir), '--data', str(d), '--out', str(d / 'pred')]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1]
    # the scorer takes the Windows-saved, string-id texts file as ground truth, for both directions
    for direction, pred in (('t2i', 'valid_predictions.jsonl'), ('i2t', 'valid_tr_predictions.jsonl')):
        got = score_predictions(win / 'pred' / pred, win / 'valid_texts.jsonl', direction)
        assert {k: round(v, 4) for k, v in got.items()} == outs[0][direction]


def test_scorer_matches_string_ids_of_the_ground_truth(tmp_path):
    gt = [rec for _, rec in read_jsonl(SCORING / 'gt.jsonl')]
    text = BOM + ''.join(json.dumps({'text_id': str(r['text_id']), 'text': r['text'],
                                     'image_ids': [str(i) for i in r['image_ids']]}, ensure_ascii=False) + '\r\n'
                         for r in gt)
    (tmp_path / 'gt.jsonl').write_bytes(text.encode('utf-8'))
    # the official scorer compares 1000 == "1000" as False and scores 0; the ids name the same images
    assert score_predictions(SCORING / 'pred_t2i.jsonl', tmp_path / 'gt.jsonl') == official_result('out_t2i.json')
    assert score_predictions(SCORING / 'pred_i2t.jsonl', tmp_path / 'gt.jsonl', 'i2t') == \
        official_result('out_i2t.json')
    pred = (SCORING / 'pred_t2i.jsonl').read_text().splitlines()
    (tmp_path / 'pred.jsonl').write_bytes((BOM + '\r\n'.join(pred) + '\r\n').encode('utf-8'))
    assert score_predictions(tmp_path / 'pred.jsonl', SCORING / 'gt.jsonl') == official_result('out_t2i.json')


def official_lmdb(data_dir: Path, lmdb_dir: Path, split: str) -> None:
    """An LMDB split as cn_clip's build_lmdb_dataset.py writes one: pairs hold the jsonl's values as they are
    (string ids stay strings), images are keyed by the tsv's first field after ``line.strip()`` (a BOM stays)."""
    import lmdb
    d = lmdb_dir / split
    d.mkdir(parents=True)
    with lmdb.open(str(d / 'pairs'), map_size=1 << 24) as env, env.begin(write=True) as txn:
        n = 0
        for line in (data_dir / f'{split}_texts.jsonl').read_text(encoding='utf-8').splitlines():
            obj = json.loads(line.strip().lstrip(BOM))
            for image_id in obj['image_ids']:
                txn.put(str(n).encode(), pickle.dumps((image_id, obj['text_id'], obj['text'])))
                n += 1
        txn.put(b'num_samples', str(n).encode())
    with lmdb.open(str(d / 'imgs'), map_size=1 << 26) as env, env.begin(write=True) as txn:
        lines = (data_dir / f'{split}_imgs.tsv').read_text(encoding='utf-8').splitlines()
        for line in lines:
            image_id, b64 = line.strip().split('\t')
            txn.put(image_id.encode('utf-8'), b64.encode('utf-8'))
        txn.put(b'num_images', str(len(lines)).encode())


def test_lmdb_form_of_a_windows_saved_split(splits, tmp_path):
    pytest.importorskip('lmdb')
    from modelscope_cnclip.data import LmdbSplit
    clean, _, win = splits
    official_lmdb(win, tmp_path / 'lmdb', 'valid')
    lm = LmdbSplit(tmp_path / 'lmdb', 'valid')
    assert list(lm.pairs()) == list(clean.pairs()) and sorted(lm.image_ids) == clean.image_ids
    assert lm.image_bytes(1000) == lm.image_bytes('1000') == clean.image_bytes(1000)  # key stored with the BOM
    assert [(t, i) for _, t, i in read_pairs(tmp_path / 'lmdb', 'valid')] == [(t, i) for _, t, i in clean.pairs()]


def rewrite(d: Path, tsv_key: str, json_id) -> None:
    """Make the first tsv key ``tsv_key`` and the first text's image ids ``[json_id]``."""
    tsv = (d / 'valid_imgs.tsv').read_text().splitlines()
    tsv[0] = tsv_key + tsv[0][tsv[0].index('\t'):]
    (d / 'valid_imgs.tsv').write_text('\n'.join(tsv) + '\n', encoding='utf-8')
    texts = [rec for _, rec in read_jsonl(d / 'valid_texts.jsonl')]
    texts[0]['image_ids'] = [json_id]
    (d / 'valid_texts.jsonl').write_text(''.join(json.dumps(t) + '\n' for t in texts), encoding='utf-8')


@pytest.mark.parametrize('tsv_key, json_id, cause', [
    ('1000', ' 1000', r"1 differ only by surrounding whitespace \(' 1000' vs 1000 there\)"),
    ('1000', '1000.0', r"1 differ only by a whole number written as a decimal \('1000.0' vs 1000 there\)"),
    ('1000', 1000.0, r"1 differ only by a whole number written as a decimal \('1000.0' vs 1000 there\)"),
    ('1000.0', 1000, r"1 differ only by a whole number written as a decimal \(1000 vs '1000.0' there\)"),
    ('01000', 1000, r"1 differ only by leading zeros \(1000 vs '01000' there\)"),
    ('1000', '\ufeff1000', r"1 differ only by a UTF-8 byte-order mark \(BOM, U\+FEFF\) inside the id "
                           r"\('\\ufeff1000' vs 1000 there\)"),  # the invisible mark shown
    ('1000', 99, r'1 absent \(99; valid_imgs.tsv holds 3 ids such as \[1000, 1001, 1002\]\)'),
])
def test_id_mismatches_name_their_cause(tmp_path, tsv_key, json_id, cause):
    make_synthetic_split(tmp_path, 'valid', 3, seed=1)
    rewrite(tmp_path, tsv_key, json_id)
    with pytest.raises(ValueError, match=r'valid_texts.jsonl: image ids \[.*\] are not in valid_imgs.tsv: ' + cause +
                       r'\. Ids are compared as strings, as the official tools do'):
        OfficialSplit(tmp_path, 'valid')


def test_lmdb_pairs_naming_absent_images_are_refused(tmp_path):
    pytest.importorskip('lmdb')
    import lmdb

    from modelscope_cnclip.data import LmdbSplit, write_lmdb_split
    write_lmdb_split(make_synthetic_split(tmp_path / 'd', 'valid', 3, seed=1), tmp_path / 'lmdb', 'valid')
    with lmdb.open(str(tmp_path / 'lmdb' / 'valid' / 'pairs'), map_size=1 << 24) as env, \
            env.begin(write=True) as txn:
        txn.put(b'0', pickle.dumps(('01001', 0, 'x')))
    with pytest.raises(ValueError, match=r"pairs: image ids \['01001'\] are not in .*imgs: 1 differ only by leading "
                                         r"zeros \('01001' vs 1001 there\)"):
        LmdbSplit(tmp_path / 'lmdb', 'valid')


def test_unreadable_encodings_are_named(tmp_path):
    (tmp_path / 'u16.jsonl').write_text('{"text_id": 1, "text": "猫", "image_ids": [1]}\n', encoding='utf-16')
    with pytest.raises(ValueError, match=r'u16.jsonl: not UTF-8 text .*save it as UTF-8'):
        read_jsonl(tmp_path / 'u16.jsonl')
    make_synthetic_split(tmp_path, 'valid', 2)
    (tmp_path / 'valid_imgs.tsv').write_text('1000\t' + base64.b64encode(b'x').decode() + '\n', encoding='utf-16')
    with pytest.raises(ValueError, match=r'valid_imgs.tsv: the file is UTF-16 .*save it as UTF-8'):
        OfficialSplit(tmp_path, 'valid')
