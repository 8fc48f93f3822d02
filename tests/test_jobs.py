"""jobs/ (collection.py, shards.py, run.py) and embeddings.py: embedding jobs on every input form, the shard
format, resumption, error reports, options recorded and compared, and the Ray engine writing what the local one does.
(How the Ray engine fails is in test_ray_engine.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import modelscope_cnclip.jobs.run as embed_mod
from modelscope_cnclip.cli import main
from modelscope_cnclip.data import make_synthetic_split, write_lmdb_split
from modelscope_cnclip.embeddings import existing_shards, load_embeddings, read_shard, shard_path
from modelscope_cnclip.jobs import RayOptions, ShardSettings
from modelscope_cnclip.jobs.collection import open_collection
from modelscope_cnclip.jobs.run import embed_collection
from modelscope_cnclip.video import FrameSampling

from helpers import by_fps, textured, uniform, write_video


def _photo(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rs = np.random.RandomState(seed)
    return Image.fromarray(rs.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture()
def photo_dir(tmp_path: Path) -> Path:
    d = tmp_path / 'photos'
    for n, rel in enumerate(['a.jpg', 'b.png', 'sub/c.JPG', 'sub/deeper/d.webp', 'e.bmp', 'sub/f.jpeg', 'g.gif']):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        _photo(n).save(p)
    (d / 'notes.txt').write_text('not an image')
    (d / '.hidden.jpg').write_bytes(b'ignored')
    (d / 'broken.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
    return d


def test_folder_collection_ids_are_sorted_relative_paths(photo_dir: Path) -> None:
    coll = open_collection(photo_dir)
    assert coll.modality == 'image' and coll.kind == 'folder' and coll.root == str(photo_dir.resolve())
    assert [i.id for i in coll.items] == ['a.jpg', 'b.png', 'broken.jpg', 'e.bmp', 'g.gif', 'sub/c.JPG',
                                          'sub/deeper/d.webp', 'sub/f.jpeg']


def test_table_collections(tmp_path: Path, photo_dir: Path) -> None:
    jl = tmp_path / 'items.jsonl'
    jl.write_text('\n'.join(json.dumps(r, ensure_ascii=False) for r in [
        {'id': 'x1', 'image': str(photo_dir / 'a.jpg'), 'text': '一只猫'},
        {'id': 'x2', 'image': 'photos/b.png', 'text': '两只狗'}]) + '\n', encoding='utf-8')
    coll = open_collection(jl)
    assert coll.modality == 'image' and [i.id for i in coll.items] == ['x1', 'x2']
    assert coll.items[1].source == str(tmp_path / 'photos' / 'b.png')  # relative to the file's folder
    texts = open_collection(jl, modality='text')
    assert [i.source for i in texts.items] == ['一只猫', '两只狗']
    csv = tmp_path / 'items.csv'
    csv.write_text('pic,caption\nphotos/a.jpg,海边\nphotos/b.png,日落\n', encoding='utf-8')
    coll = open_collection(csv, columns={'image': 'pic'})
    assert [i.id for i in coll.items] == ['2', '3']  # line numbers when there is no id column
    assert open_collection(csv, modality='text').items[0].source == '海边'
    with pytest.raises(ValueError, match='no image, video or text column'):
        bad = tmp_path / 'bad.jsonl'
        bad.write_text('{"foo": 1}\n')
        open_collection(bad)
    dup = tmp_path / 'dup.jsonl'
    dup.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(ValueError, match='duplicate ids'):
        open_collection(dup)
    with pytest.raises(FileNotFoundError, match='not found'):
        open_collection(tmp_path / 'missing')
    with pytest.raises(ValueError, match='texts come from'):
        open_collection(photo_dir, modality='text')


def test_excel_csv_with_a_bom_and_a_named_id_column(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: the first column is still "id"; a named id column must exist."""
    for suffix, sep in (('.csv', ','), ('.tsv', '\t')):
        table = tmp_path / f'items{suffix}'
        table.write_bytes(('\ufeff' + '\r\n'.join([f'id{sep}text', f'i0{sep}海边', f'i1{sep}日落']) + '\r\n')
                          .encode('utf-8'))
        coll = open_collection(table)
        assert [(i.id, i.source) for i in coll.items] == [('i0', '海边'), ('i1', '日落')]
        with pytest.raises(ValueError, match=r"no id column 'key' \(columns \['id', 'text'\]\); name an existing"):
            open_collection(table, columns={'id': 'key'})


def test_embed_folder_matches_encode_image_and_reports_failures(tiny_model, photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / 'photos.emb'
    report = embed_collection(tiny_model, photo_dir, out, settings=ShardSettings(shard_size=3, batch_size=2))
    assert (report.total, report.embedded, report.failed, report.shards) == (8, 7, 1, 3)
    emb = load_embeddings(out)
    assert 'broken.jpg' not in emb.ids and len(emb) == 7
    assert emb.failed[0]['id'] == 'broken.jpg' and emb.failed[0]['error']
    errors = [json.loads(line) for line in (out / 'errors.jsonl').read_text().splitlines()]
    assert [e['id'] for e in errors] == ['broken.jpg']
    expected = tiny_model.encode_image([str(photo_dir / i) for i in emb.ids]).numpy()
    np.testing.assert_allclose(emb.vectors, expected, atol=1e-5)
    assert emb.meta['model']['fingerprint'] == tiny_model.fingerprint
    assert emb.meta['input']['root'] == str(photo_dir.resolve())
    assert emb.sources[0] == str(photo_dir / 'a.jpg')


def test_batches_sized_by_the_user_or_automatically(tiny_model, photo_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = tiny_model.encode_image  # the shared model: monkeypatch puts encode_image back after the test

    def spy(pixels, batch_size):
        sizes.append(len(pixels))
        return real(pixels, batch_size=batch_size)
    monkeypatch.setattr(tiny_model, 'encode_image', spy)
    embed_collection(tiny_model, photo_dir, tmp_path / 'a.emb', settings=ShardSettings(batch_size=3))
    assert sizes == [3, 3, 1]  # 7 readable images
    sizes.clear()
    assert embed_mod.auto_batch_size(tiny_model, 'image') == 16 and embed_mod.auto_batch_size(tiny_model, 'text') == 64
    embed_collection(tiny_model, photo_dir, tmp_path / 'b.emb')
    assert sizes == [7]


def test_resume_skips_written_shards_and_gives_the_same_result(tiny_model, photo_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    full = tmp_path / 'full.emb'
    embed_collection(tiny_model, photo_dir, full, settings=ShardSettings(shard_size=2, batch_size=2))
    out = tmp_path / 'resumed.emb'
    calls = []
    real = embed_mod.embed_shard

    def crash_on_third(*args, **kw):
        calls.append(args[3])
        if len(calls) == 3:
            raise KeyboardInterrupt('simulated interruption')
        return real(*args, **kw)
    monkeypatch.setattr(embed_mod, 'embed_shard', crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        embed_collection(tiny_model, photo_dir, out, settings=ShardSettings(shard_size=2, batch_size=2))
    assert existing_shards(out) == [0, 1]
    with pytest.raises(ValueError, match='not finished'):
        load_embeddings(out)
    assert len(load_embeddings(out, allow_incomplete=True)) == 3  # broken.jpg is in shard 1
    calls.clear()
    monkeypatch.setattr(embed_mod, 'embed_shard', real)
    report = embed_collection(tiny_model, photo_dir, out, settings=ShardSettings(shard_size=2, batch_size=2))
    assert report.shards_resumed == 2
    a, b = load_embeddings(full), load_embeddings(out)
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.vectors, b.vectors)
    # A complete job rerun does nothing; another job into the same dir is refused; --overwrite replaces it.
    assert embed_collection(tiny_model, photo_dir, out, settings=ShardSettings(shard_size=2)).shards_resumed == 4
    with pytest.raises(ValueError, match='shard size differs'):
        embed_collection(tiny_model, photo_dir, out, settings=ShardSettings(shard_size=3))
    (photo_dir / 'new.png').write_bytes((photo_dir / 'b.png').read_bytes())
    with pytest.raises(ValueError, match='inputs differs'):
        embed_collection(tiny_model, photo_dir, out, settings=ShardSettings(shard_size=2))
    assert embed_collection(tiny_model, photo_dir, out, overwrite=True,
                            settings=ShardSettings(shard_size=2)).embedded == 8


def test_half_written_shard_is_never_taken_as_complete(tiny_model, photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / 'x.emb'
    embed_collection(tiny_model, photo_dir, out, settings=ShardSettings(shard_size=4))
    tmp = shard_path(out, 1).with_name('.00001.npz.abc.tmp')
    shard_path(out, 1).rename(tmp)  # as if the writer died before its rename
    assert existing_shards(out) == [0]
    assert embed_collection(tiny_model, photo_dir, out, settings=ShardSettings(shard_size=4)).shards_resumed == 1
    ids, _, vectors, failed = read_shard(shard_path(out, 1))
    assert len(ids) + len(failed) == 4 and vectors.shape == (len(ids), tiny_model.config.embed_dim)


def test_refuses_to_write_into_a_foreign_folder(tiny_model, photo_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / 'mine'
    foreign.mkdir()
    (foreign / 'thesis.tex').write_text('precious')
    with pytest.raises(FileExistsError, match='not an embeddings dir'):
        embed_collection(tiny_model, photo_dir, foreign)
    assert (foreign / 'thesis.tex').read_text() == 'precious'


def test_texts_official_and_lmdb_inputs(tiny_model, tmp_path: Path) -> None:
    data = tmp_path / 'data'
    make_synthetic_split(data, 'valid', 6, seed=3)
    images = embed_collection(tiny_model, data, tmp_path / 'img.emb')
    texts = embed_collection(tiny_model, data, tmp_path / 'txt.emb', modality='text')
    from modelscope_cnclip.data import OfficialSplit
    split = OfficialSplit(data, 'valid')
    emb = load_embeddings(tmp_path / 'img.emb')
    assert emb.ids == [str(i) for i in split.image_ids]
    np.testing.assert_allclose(emb.vectors,
                               tiny_model.encode_image([split.image_bytes(i) for i in split.image_ids]).numpy(),
                               atol=1e-5)
    temb = load_embeddings(tmp_path / 'txt.emb')
    assert temb.ids == [str(t.text_id) for t in split.texts] and texts.embedded == len(split.texts)
    np.testing.assert_allclose(temb.vectors, tiny_model.encode_text([t.text for t in split.texts]).numpy(), atol=1e-5)
    pytest.importorskip('lmdb')
    write_lmdb_split(split, tmp_path / 'lmdb', 'valid')
    lm = embed_collection(tiny_model, tmp_path / 'lmdb', tmp_path / 'lmdb.emb')
    assert lm.embedded == images.embedded
    np.testing.assert_allclose(load_embeddings(tmp_path / 'lmdb.emb').vectors, emb.vectors, atol=1e-6)


def test_jsonl_of_urls(tiny_model, photo_dir: Path, tmp_path: Path, http_dir: tuple[Path, str]) -> None:
    root, url = http_dir
    (root / 'a.jpg').write_bytes((photo_dir / 'a.jpg').read_bytes())
    jl = tmp_path / 'urls.jsonl'
    jl.write_text(f'{{"id": "ok", "url": "{url}/a.jpg"}}\n{{"id": "gone", "url": "{url}/missing.jpg"}}\n')
    report = embed_collection(tiny_model, jl, tmp_path / 'urls.emb')
    assert (report.embedded, report.failed) == (1, 1)
    emb = load_embeddings(tmp_path / 'urls.emb')
    assert emb.sources == [f'{url}/a.jpg'] and emb.failed[0]['id'] == 'gone' and '404' in emb.failed[0]['error']
    np.testing.assert_allclose(emb.vectors, tiny_model.encode_image([str(photo_dir / 'a.jpg')]).numpy(), atol=1e-6)


def test_uri_folder(tiny_model, photo_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip('pyarrow')
    (photo_dir / 'broken.jpg').unlink()
    uri = photo_dir.resolve().as_uri()  # file:///...: the same code path as s3:// or gs://
    coll = open_collection(uri)
    assert coll.kind == 'uri' and coll.items[0].id == 'a.jpg' and coll.items[0].source == f'{uri}/a.jpg'
    report = embed_collection(tiny_model, coll, tmp_path / 'uri.emb')
    assert report.embedded == 7
    local = embed_collection(tiny_model, photo_dir, tmp_path / 'local.emb')
    np.testing.assert_allclose(load_embeddings(tmp_path / 'uri.emb').vectors,
                               load_embeddings(tmp_path / 'local.emb').vectors, atol=1e-6)
    assert local.embedded == 7


def test_cli_embed(plugin_vit_dir: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / 'cli.emb'
    assert main(['embed', str(plugin_vit_dir), str(photo_dir), '--out', str(out), '--shard-size', '5',
                 '--no-progress']) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary['embedded'] == 7 and summary['failed'] == 1
    assert main(['embed', str(plugin_vit_dir), str(photo_dir), '--out', str(out), '--shard-size', '3']) == 2
    assert 'shard size differs' in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_writes_the_same_embeddings(tiny_model, plugin_vit_dir: Path, photo_dir: Path,
                                               tmp_path: Path) -> None:
    """A local Ray instance runs the job (in a subprocess, so Ray's workers never share this test process)."""
    pytest.importorskip('ray')
    local = tmp_path / 'local.emb'
    embed_collection(tiny_model, photo_dir, local, settings=ShardSettings(shard_size=3))
    out = tmp_path / 'ray.emb'
    code = ('import sys, json, ray; from modelscope_cnclip.jobs import RayOptions, ShardSettings, embed_collection; '
            'ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False); '
            f'r = embed_collection({str(plugin_vit_dir)!r}, {str(photo_dir)!r}, {str(out)!r}, '
            'settings=ShardSettings(shard_size=3), engine="ray", ray=RayOptions(workers=2)); '
            'print(json.dumps(r.to_dict()))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report['embedded'], report['failed'], report['shards']) == (7, 1, 3)
    a, b = load_embeddings(local), load_embeddings(out)
    assert a.ids == b.ids and a.failed == b.failed
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)


def test_video_folder(tiny_model, tmp_path: Path) -> None:
    pytest.importorskip('decord')
    pytest.importorskip('av')
    d = tmp_path / 'videos'
    (d / 'trips').mkdir(parents=True)
    write_video(d / 'a.mp4', textured(1, 12))
    write_video(d / 'trips' / 'b.avi', textured(2, 20))
    (d / 'broken.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42 truncated')
    (d / 'still.jpg').write_bytes(b'not scanned in a video job')
    report = embed_collection(tiny_model, d, tmp_path / 'v.emb', modality='video',
                              settings=ShardSettings(sampling=uniform(4)))
    assert (report.embedded, report.failed) == (2, 1)
    emb = load_embeddings(tmp_path / 'v.emb')
    assert emb.ids == ['a.mp4', 'trips/b.avi'] and emb.failed[0]['id'] == 'broken.mp4'
    expected = tiny_model.encode_video([str(d / 'a.mp4'), str(d / 'trips' / 'b.avi')], uniform(4)).numpy()
    np.testing.assert_allclose(emb.vectors, expected, atol=1e-5)
    # Videos are searched with the same index and Searcher as images: a frame of b finds b first.
    pytest.importorskip('faiss')
    from modelscope_cnclip import Index, Searcher
    Index.build(tmp_path / 'v.emb').save(tmp_path / 'v.index')
    frame = Image.fromarray(textured(2, 20)[10])
    hits = Searcher.open(tmp_path / 'v.index', model=tiny_model).search(frame, k=2)
    assert [h.id for h in hits] == ['trips/b.avi', 'a.mp4']
    assert hits[0].path == str((d / 'trips' / 'b.avi').resolve())


# --- a rerun is the same job ------------------------------------------------------------------------------------

def test_options_that_change_vectors_are_recorded_and_compared(plugin_vit_dir: Path, photo_dir: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / 'p.emb'
    embed_collection(plugin_vit_dir, photo_dir, out, settings=ShardSettings(shard_size=2))
    assert load_embeddings(out).meta['options'] == {'precision': 'fp32', 'fast_decode': False}
    for kwargs, named in (({'fast_decode': True}, "option fast_decode differs: False there, True now"),
                          ({'precision': 'bf16'}, "precision differs: 'fp32' there, 'bf16' now")):
        with pytest.raises(ValueError, match=named):
            embed_collection(plugin_vit_dir, photo_dir, out, settings=ShardSettings(shard_size=2), **kwargs)
    report = embed_collection(plugin_vit_dir, photo_dir, out, fast_decode=True, overwrite=True,
                              settings=ShardSettings(shard_size=2))
    assert report.shards_resumed == 0 and load_embeddings(out).meta['options']['fast_decode'] is True
    assert embed_collection(plugin_vit_dir, photo_dir, out, fast_decode=True,
                            settings=ShardSettings(shard_size=2)).shards_resumed == 4


def test_video_sampling_is_part_of_the_job(tiny_model, tmp_path: Path, capsys) -> None:
    pytest.importorskip('decord')
    pytest.importorskip('av')
    d = tmp_path / 'videos'
    d.mkdir()
    write_video(d / 'a.mp4', textured(1, 12))
    out = tmp_path / 'v.emb'
    embed_collection(tiny_model, d, out, modality='video', settings=ShardSettings(sampling=uniform(2)))
    assert load_embeddings(out).meta['options']['video'] == {'mode': 'uniform', 'num_frames': 2}
    with pytest.raises(ValueError, match="option video.num_frames differs: 2 there, 4 now"):
        embed_collection(tiny_model, d, out, modality='video', settings=ShardSettings(sampling=uniform(4)))
    with pytest.raises(ValueError, match="option video.mode differs: 'uniform' there, 'fps' now"):
        embed_collection(tiny_model, d, out, modality='video', settings=ShardSettings(sampling=by_fps()))
    # sample_fps does not change uniform sampling: the same job, resumed
    assert embed_collection(tiny_model, d, out, modality='video',
                            settings=ShardSettings(sampling=FrameSampling(2, sample_fps=5))).shards_resumed == 1
    fps = tmp_path / 'f.emb'
    embed_collection(tiny_model, d, fps, modality='video', settings=ShardSettings(sampling=by_fps(sample_fps=2)))
    with pytest.raises(ValueError, match='option video.sample_fps differs: 2 there, 4 now'):
        embed_collection(tiny_model, d, fps, modality='video', settings=ShardSettings(sampling=by_fps(sample_fps=4)))
    with pytest.raises(ValueError, match='option video.max_frames differs: None there, 3 now'):
        capped = ShardSettings(sampling=by_fps(sample_fps=2, max_frames=3))
        embed_collection(tiny_model, d, fps, modality='video', settings=capped)
    # the CLI passes its frame options also when --modality auto finds a video column, and names what differs
    (tmp_path / 'clips.jsonl').write_text(json.dumps({'id': 'a', 'video': str(d / 'a.mp4')}) + '\n')
    cli_out = tmp_path / 'cli.emb'
    assert main(['embed', str(tiny_model.source), str(tmp_path / 'clips.jsonl'), '--out', str(cli_out),
                 '--num-frames', '3', '--no-progress']) == 0
    assert load_embeddings(cli_out).meta['options']['video'] == {'mode': 'uniform', 'num_frames': 3}
    capsys.readouterr()
    assert main(['embed', str(tiny_model.source), str(tmp_path / 'clips.jsonl'), '--out', str(cli_out),
                 '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'option video.num_frames differs: 3 there, 8 now' in err


def test_invalid_options_are_refused_before_anything_starts(photo_dir: Path, tmp_path: Path, capsys) -> None:
    # the model does not exist: the option error comes first, before any loading, under either engine
    # the parameter objects refuse bad values when made, so nothing can start with them, under either engine
    for make, match in ((lambda: uniform(0), 'num_frames=0: expected an int >= 1'),
                        (lambda: by_fps(sample_fps=0), 'sample_fps=0: expected a number > 0'),
                        (lambda: ShardSettings(batch_size=0), 'batch_size=0: expected a whole number >= 1'),
                        (lambda: ShardSettings(shard_size=0), 'shard_size=0: expected a whole number >= 1'),
                        (lambda: RayOptions(workers=0), 'workers=0'),
                        (lambda: RayOptions(gpus_per_worker=-1), 'gpus_per_worker=-1'),
                        (lambda: RayOptions(schedule_timeout=-1), 'schedule_timeout=-1: expected seconds >= 0')):
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match='unexpected keyword argument'):
        embed_collection(tmp_path / 'no-model', photo_dir, tmp_path / 'o.emb', num_frames=3)
    with pytest.raises(ValueError, match=r"engine='spark': choose one of \['local', 'ray'\]"):
        embed_collection(tmp_path / 'no-model', photo_dir, tmp_path / 'o.emb', engine='spark')
    base = ['embed', str(tmp_path / 'no-model'), str(photo_dir), '--out', str(tmp_path / 'o.emb')]
    for args in (['--num-frames', '0'], ['--engine', 'ray', '--num-frames', '0']):
        with pytest.raises(SystemExit) as exit_info:  # argparse: usage errors exit 2
            main(base + args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count('\n') == 1 and 'argument --num-frames' in err, err
    assert main(base + ['--engine', 'ray', '--sampling-mode', 'fps', '--sample-fps', '0']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'sample_fps=0.0: expected a number > 0' in err, err
    assert not (tmp_path / 'o.emb').exists()
    ray = sys.modules.get('ray')
    assert ray is None or not ray.is_initialized()
