"""Reliability and security across the library (docs/reliability.md lists each case and the test here or elsewhere
that proves it): outputs written with the user's umask and atomically, a full disk leaving the previous output
intact, hostile model files (pickled code in every loader, a configuration.json asking for plugins or remote
code), one model shared by 8 threads, and jobs and index builds killed with SIGKILL that resume to exactly the
uninterrupted output."""
from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from modelscope_cnclip import convert, load, read_source
from modelscope_cnclip.embeddings import load_embeddings

from helpers import REPO, TINY_VIT, random_state_dict, write_hub_dir, write_official_pt

MARKER_ENV = 'CNCLIP_TEST_MARKER'


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of everything under root (root included)."""
    out = {('dir', stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob('*'):
        out.add(('dir' if p.is_dir() else 'file', stat.S_IMODE(p.stat().st_mode)))
    return out


# --- permissions and atomic writes --------------------------------------------------------------------------------

def test_outputs_get_the_permissions_the_umask_gives(tmp_path, plugin_vit_dir, images, umask_027):
    from modelscope_cnclip.index import Index
    from modelscope_cnclip.jobs import embed_collection
    expected = {('dir', 0o750), ('file', 0o640)}
    model_dir = convert(plugin_vit_dir, tmp_path / 'converted')
    photos = tmp_path / 'photos'
    photos.mkdir()
    for i, img in enumerate(images):
        img.save(photos / f'{i}.png')
    embed_collection(plugin_vit_dir, photos, tmp_path / 'emb', progress=False)
    Index.build(tmp_path / 'emb').save(tmp_path / 'index')
    outputs = [model_dir, tmp_path / 'emb', tmp_path / 'index']
    try:
        from modelscope_cnclip.deploy import export
        outputs.append(Path(export(plugin_vit_dir, tmp_path / 'onnx').out))
    except ImportError:
        pass
    for out in outputs:
        assert _modes(out) <= expected, (out, _modes(out))


def test_prediction_files_are_written_atomically(tmp_path, monkeypatch):
    from modelscope_cnclip.evaluation import retrieval
    path = tmp_path / 'pred.jsonl'
    retrieval._write_jsonl(path, [{'text_id': 1, 'image_ids': [2]}])
    good = path.read_bytes()

    def failing():
        yield {'text_id': 1, 'image_ids': [2]}
        raise OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(OSError):
        retrieval._write_jsonl(path, failing())
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ['pred.jsonl']


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.parametrize('writer', ['model dir', 'index', 'embeddings shard', 'export'])
def test_a_full_disk_leaves_the_previous_output_intact(writer, tmp_path, plugin_vit_dir, images, monkeypatch):
    """The second write of each output fails with ENOSPC part-way; the first output is still whole and loads,
    and no temporary file or folder is left behind."""
    from modelscope_cnclip.index import Index
    from modelscope_cnclip.jobs import embed_collection
    if writer == 'model dir':
        out = convert(plugin_vit_dir, tmp_path / 'out')
        before = load(out).encode_text(['猫'])
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, 'save_file', _enospc)
        with pytest.raises(OSError, match='No space'):
            convert(plugin_vit_dir, tmp_path / 'out', overwrite=True)
        monkeypatch.undo()
        assert torch.equal(load(out).encode_text(['猫']), before)
    elif writer == 'index':
        photos = tmp_path / 'photos'
        photos.mkdir()
        for i, img in enumerate(images):
            img.save(photos / f'{i}.png')
        embed_collection(plugin_vit_dir, photos, tmp_path / 'emb', progress=False)
        out = Index.build(tmp_path / 'emb').save(tmp_path / 'out')
        import faiss
        monkeypatch.setattr(faiss, 'write_index', _enospc)
        with pytest.raises(OSError, match='No space'):
            Index.build(tmp_path / 'emb').save(tmp_path / 'out', overwrite=True)
        monkeypatch.undo()
        assert len(Index.load(out)) == 3
    elif writer == 'embeddings shard':
        from modelscope_cnclip import utils
        out = tmp_path / 'out' / 'shard.bin'
        utils.atomic_write_bytes(out, b'old')
        monkeypatch.setattr(os, 'fsync', _enospc)
        with pytest.raises(OSError, match='No space'):
            utils.atomic_write_bytes(out, b'new')
        monkeypatch.undo()
        assert out.read_bytes() == b'old'
        out = out.parent
    else:
        pytest.importorskip('onnx')
        from modelscope_cnclip.deploy import export
        out = Path(export(plugin_vit_dir, tmp_path / 'out').out)
        before = load(out).encode_text(['猫'])
        import onnx
        monkeypatch.setattr(onnx, 'save_model', _enospc)
        monkeypatch.setattr(onnx, 'save', _enospc)
        with pytest.raises(OSError, match='No space'):
            export(plugin_vit_dir, tmp_path / 'out', overwrite=True)
        monkeypatch.undo()
        assert torch.equal(load(out).encode_text(['猫']), before)
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith('.')]
    assert leftovers == [], leftovers


# --- hostile model files ------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it creates the file named by $CNCLIP_TEST_MARKER."""

    def __reduce__(self):
        return (os.system, (f'touch "${MARKER_ENV}"',))


def _hostile(kind: str, d: Path) -> Path:
    sd = random_state_dict(TINY_VIT)
    evil = {**sd, 'visual.proj': Payload()}
    if kind == 'official .pt':
        path = d / 'clip_cn_evil.pt'
        with open(path, 'wb') as f:
            pickle.dump({'state_dict': evil}, f)
        return path
    if kind == 'torch zip .pt':
        path = write_official_pt(d / 'evil.pt', sd)
        obj = torch.load(path, weights_only=True)
        obj['state_dict']['visual.proj'] = Payload()
        torch.save(obj, path)
        return path
    if kind == 'hub pytorch_model.bin':
        hub = write_hub_dir(d / 'hub', TINY_VIT, sd)
        torch.save({**torch.load(hub / 'pytorch_model.bin', weights_only=True), 'x': Payload()},
                   hub / 'pytorch_model.bin')
        return hub
    if kind == 'trainer checkpoint':
        path = d / 'epoch_1.pth'
        torch.save({'state_dict': evil, 'meta': {'epoch': 1}}, path)
        return path
    if kind == 'trainer state':
        path = d / 'epoch_1_trainer_state.pth'
        torch.save({'optimizer': Payload(), 'epoch': 1}, path)
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize('kind', ['official .pt', 'torch zip .pt', 'hub pytorch_model.bin', 'trainer checkpoint',
                                  'trainer state'])
def test_pickled_code_is_never_run(kind, tmp_path, monkeypatch):
    marker = tmp_path / 'owned'
    monkeypatch.setenv(MARKER_ENV, str(marker))
    source = _hostile(kind, tmp_path)
    for attempt in (lambda: read_source(source), lambda: load(source), lambda: convert(source, tmp_path / 'x')):
        with pytest.raises((ValueError, OSError)):
            attempt()
    r = subprocess.run([sys.executable, '-m', 'modelscope_cnclip', 'info', str(source)], capture_output=True,
                       text=True, cwd=REPO, timeout=120, env={**os.environ, MARKER_ENV: str(marker)})
    assert r.returncode == 2
    assert not marker.exists(), 'a pickled payload ran'


def test_configuration_json_plugins_and_remote_code_are_not_executed(tmp_path, plugin_vit_dir, monkeypatch):
    import shutil
    d = tmp_path / 'model'
    shutil.copytree(plugin_vit_dir, d)
    (d / 'evil_plugin.py').write_text(f'import pathlib; pathlib.Path({str(tmp_path / "owned")!r}).touch()\n')
    cfg = json.loads((d / 'configuration.json').read_text())
    cfg.update({'plugins': ['evil_plugin'], 'allow_remote': True, 'trust_remote_code': True,
                'auto_map': {'AutoModel': 'evil_plugin.Model'}})
    (d / 'configuration.json').write_text(json.dumps(cfg))
    monkeypatch.syspath_prepend(str(d))
    m = load(d)
    assert m.encode_text(['猫']).shape[0] == 1
    convert(d, tmp_path / 'converted')
    from modelscope_cnclip.data import draw_scene
    draw_scene('红色', '圆形').save(tmp_path / 'red.png')
    r = subprocess.run([sys.executable, '-m', 'modelscope_cnclip', 'similarity', str(d), str(tmp_path / 'red.png'),
                        '猫', '狗'], capture_output=True, text=True, cwd=str(d), timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / 'owned').exists() and 'evil_plugin' not in sys.modules


@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino'])
def test_a_truncated_or_corrupt_graph_is_a_clear_error(backend, plugin_vit_dir, tmp_path, photo):
    pytest.importorskip(backend)
    from modelscope_cnclip.deploy import export
    out = Path(export(plugin_vit_dir, tmp_path / 'onnx').out)
    graph = out / 'image.onnx'
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(ValueError, match=r'image\.onnx: .*cannot read this graph .*truncated or corrupt.*export'):
        load(out, backend=backend).encode_image([photo])
    graph.write_bytes(b'\x00' * 100)
    with pytest.raises(ValueError, match='cannot read this graph'):
        load(out, backend=backend).encode_image([photo])


def test_hub_downloads_are_checked_against_the_hubs_hashes(tmp_path, plugin_vit_dir, monkeypatch):
    import hashlib
    import shutil

    from modelscope_cnclip.checkpoints import layouts
    snapshot = Path(shutil.copytree(plugin_vit_dir, tmp_path / 'cache' / 'damo' / 'model'))
    listing = [{'Path': p.name, 'Sha256': hashlib.sha256(p.read_bytes()).hexdigest()} for p in snapshot.iterdir()]
    listing.append({'Path': 'not_downloaded.bin', 'Sha256': '0' * 64})
    assert layouts.verify_hub_files(snapshot, listing) == 4
    hashed = []
    monkeypatch.setattr(layouts, '_sha256', lambda p, real=layouts._sha256: hashed.append(p) or real(p))
    assert layouts.verify_hub_files(snapshot, listing) == 4 and hashed == []  # recorded: not hashed again
    monkeypatch.setattr(layouts, '_snapshot', lambda hub_id, revision: (
        layouts.verify_hub_files(snapshot, listing), snapshot)[1])
    assert read_source('damo/model').layout == 'plugin'
    weights = snapshot / 'model.safetensors'
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit
    weights.write_bytes(bytes(data))
    with pytest.raises((ValueError, OSError), match='model.safetensors: its SHA-256 .* differs from the hub.s record'):
        read_source('damo/model')
    assert layouts.verify_hub_files(snapshot, None) == 0  # no listing: nothing to compare, said in the log


def test_damaged_shards_and_index_files_are_named_and_shards_recomputed(tmp_path, plugin_vit_dir, many_photos):
    from modelscope_cnclip.index import Index
    from modelscope_cnclip.jobs import embed_collection
    out = tmp_path / 'emb'
    embed_collection(plugin_vit_dir, many_photos, out, progress=False)
    want = load_embeddings(out)
    shard = sorted((out / 'shards').glob('*.npz'))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged disk, a bad copy
    with pytest.raises(ValueError, match=f'{shard.name}: not a readable embeddings shard .*delete it and rerun'):
        load_embeddings(out)
    report = embed_collection(plugin_vit_dir, many_photos, out, progress=False)  # the rerun recomputes it
    got = load_embeddings(out)
    assert report.shards_resumed == report.shards - 1 and got.ids == want.ids
    np.testing.assert_array_equal(got.vectors, want.vectors)
    index = Index.build(out).save(tmp_path / 'index')
    ids = index / 'ids.npz'
    ids.write_bytes(ids.read_bytes()[:50])
    with pytest.raises(ValueError, match='ids.npz: unreadable .*cnclip index build'):
        Index.load(index)


def test_hostile_configs_and_manifests_are_value_errors_naming_the_field(tmp_path, plugin_vit_dir):
    import shutil
    cases = {('text', 'num_attention_heads'): 0, ('vision', 'head_width'): 0, ('text', 'hidden_act'): 'os.system',
             ('vision', 'patch_size'): -16, ('text', 'hidden_size'): -48, ('vision', 'image_size'): 64.0,
             ('text', 'layer_norm_eps'): float('nan'), (None, 'embed_dim'): '32', (None, 'context_length'): 10 ** 9,
             ('vision', 'width'): 1e9}
    for (tower, field_name), value in cases.items():
        d = Path(shutil.copytree(plugin_vit_dir, tmp_path / f'{tower}_{field_name}'))
        cfg = json.loads((d / 'cnclip_config.json').read_text())
        (cfg[tower] if tower else cfg)[field_name] = value
        (d / 'cnclip_config.json').write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=field_name):
            load(d)
    pytest.importorskip('onnx')
    from modelscope_cnclip.deploy import export
    from modelscope_cnclip.runtime import MANIFEST
    out = Path(export(plugin_vit_dir, tmp_path / 'onnx').out)
    for key, value in (('towers.image.file', '../../../../etc/passwd'), ('towers.image.file', '/etc/hostname'),
                       ('towers.text.onnx', '../x.onnx'), ('towers.image.file', 5), ('logit_scale', 'nan'),
                       ('version', '2'), ('num_params', [1]), ('towers.image.precision', 'int4')):
        d = Path(shutil.copytree(out, tmp_path / f'm{abs(hash((key, str(value))))}'))
        manifest = json.loads((d / MANIFEST).read_text())
        *parents, last = key.split('.')
        node = manifest
        for p in parents:
            node = node[p]
        node[last] = value
        (d / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match='malformed manifest|plain file name'):
            load(d)


def test_huge_image_files_are_refused_before_they_are_read(tmp_path, tiny_model, monkeypatch):
    huge = tmp_path / 'huge.png'
    with open(huge, 'wb') as f:
        f.truncate(600 << 20)  # sparse: no disk used
    with pytest.raises(ValueError, match='600 MiB|629,145,600 bytes, more than the limit'):
        tiny_model.encode_image([huge])
    monkeypatch.setenv('CNCLIP_MAX_IMAGE_BYTES', '1000')
    from modelscope_cnclip.data import draw_scene
    draw_scene('红色', '圆形', size=256).save(tmp_path / 'ok.png')
    with pytest.raises(ValueError, match='CNCLIP_MAX_IMAGE_BYTES'):
        tiny_model.encode_image([tmp_path / 'ok.png'])


def test_symlink_loops_in_a_folder_are_scanned_once(tmp_path, images):
    from modelscope_cnclip.jobs.collection import open_collection
    root = tmp_path / 'loop'
    (root / 'sub').mkdir(parents=True)
    for i, img in enumerate(images):
        img.save(root / 'sub' / f'{i}.png')
    (root / 'sub' / 'up').symlink_to('..')
    (root / 'sub' / 'up2').symlink_to('..')
    start = time.monotonic()
    items = open_collection(root, 'image').items
    assert len(items) == 3 and time.monotonic() - start < 10


def test_a_rerun_on_other_inputs_with_the_same_ids_is_refused(tmp_path, plugin_vit_dir):
    from modelscope_cnclip.jobs import ShardSettings, embed_collection
    a, b = tmp_path / 'a.jsonl', tmp_path / 'b.jsonl'
    a.write_text(''.join(json.dumps({'text': f'猫 {i}'}, ensure_ascii=False) + '\n' for i in range(12)))
    b.write_text(''.join(json.dumps({'text': f'狗 {i}'}, ensure_ascii=False) + '\n' for i in range(12)))
    out = tmp_path / 'out'
    embed_collection(plugin_vit_dir, a, out, settings=ShardSettings(shard_size=4), progress=False)
    with pytest.raises(ValueError, match='another job .*inputs differs'):
        embed_collection(plugin_vit_dir, b, out, settings=ShardSettings(shard_size=4), progress=False)


def test_two_jobs_on_one_output_at_once_are_refused(tmp_path, plugin_vit_dir, monkeypatch):
    from modelscope_cnclip.jobs import embed_collection, run
    texts = tmp_path / 't.jsonl'
    texts.write_text(''.join(json.dumps({'text': f'猫 {i}'}, ensure_ascii=False) + '\n' for i in range(8)))
    with run._job_lock(tmp_path / 'out'):  # another job holds the folder
        with pytest.raises(ValueError, match='another embedding job is writing into it'):
            embed_collection(plugin_vit_dir, texts, tmp_path / 'out', progress=False)
    assert embed_collection(plugin_vit_dir, texts, tmp_path / 'out', progress=False).embedded == 8


def test_searches_from_8_threads_on_one_hnsw_index_are_whole(tmp_path):
    pytest.importorskip('faiss')
    from modelscope_cnclip.index import Index
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = Index.from_arrays([str(i) for i in range(1200)], vectors, kind='hnsw')
    want = {k: [h.id for h in index.search(vectors[:1], k)[0]] for k in (5, 1000)}

    def search(i: int) -> bool:
        k = 5 if i % 2 else 1000
        return [h.id for h in index.search(vectors[:1], k)[0]] == want[k]
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(search, range(400)))


# --- concurrency -----------------------------------------------------------------------------------------------------

def test_one_model_from_8_threads_gives_the_sequential_embeddings(tiny_model, images, photo):
    texts = ['猫', '一只狗在草地上', '海边的日落', 'a photo', '红色的圆形', '长城', '皮卡丘', '杰尼龟']
    inputs = [images[i % 3] if i % 2 else photo for i in range(8)]
    want_t = [tiny_model.encode_text([t]) for t in texts]
    want_i = [tiny_model.encode_image([x]) for x in inputs]

    def work(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tiny_model.encode_text([texts[i]]), tiny_model.encode_image([inputs[i]])
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(work, range(8)))
        for i, (t, x) in enumerate(got):
            assert torch.equal(t, want_t[i]) and torch.equal(x, want_i[i]), i


def test_one_pipeline_from_8_threads(tiny_pipe, images):
    texts = ['猫', '狗', '鸟', '鱼', '马', '牛', '羊', '鸡']
    want = [tiny_pipe({'text': [t], 'img': [images[i % 3]]}) for i, t in enumerate(texts)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: tiny_pipe({'text': [texts[i]], 'img': [images[i % 3]]}), range(8)))
    for w, g in zip(want, got):
        assert torch.equal(torch.as_tensor(w['text_embedding']), torch.as_tensor(g['text_embedding']))
        assert torch.equal(torch.as_tensor(w['img_embedding']), torch.as_tensor(g['img_embedding']))


# --- killed with SIGKILL, resumed ------------------------------------------------------------------------------------

def _embed_cmd(model: Path, photos: Path, out: Path) -> list[str]:
    return [sys.executable, '-m', 'modelscope_cnclip', 'embed', str(model), str(photos), '--out', str(out),
            '--shard-size', '8', '--batch-size', '4']


@pytest.fixture(scope='module')
def many_photos(tmp_path_factory) -> Path:
    from modelscope_cnclip.data import COLORS, SHAPES, draw_scene
    d = tmp_path_factory.mktemp('many')
    for i in range(144):
        draw_scene(list(COLORS)[i % 6], SHAPES[i % 3], seed=i).save(d / f'{i:03d}.png')
    (d / 'broken.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
    return d


@pytest.mark.slow
def test_an_embedding_job_killed_at_random_points_resumes_to_the_same_output(plugin_vit_dir, many_photos, tmp_path):
    reference = tmp_path / 'reference'
    subprocess.run(_embed_cmd(plugin_vit_dir, many_photos, reference), check=True, cwd=REPO, timeout=300,
                   capture_output=True)
    want = load_embeddings(reference)
    total = len(list((reference / 'shards').glob('*.npz')))
    rng = np.random.default_rng(0)
    partial = []  # shards on disk after each kill that hit a running job
    for trial in range(3):
        out = tmp_path / f'killed{trial}'
        for kill in range(3):  # kills at random moments (start-up, mid-shard, between shards), then to the end
            proc = subprocess.Popen(_embed_cmd(plugin_vit_dir, many_photos, out), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if kill == 0 and trial == 0:
                time.sleep(1.0)  # in the start-up
            else:  # once a random number of shards are on disk, a random moment later
                target = int(rng.integers(1, total))
                while proc.poll() is None and len(list((out / 'shards').glob('*.npz'))) < target:
                    time.sleep(0.01)
                time.sleep(float(rng.uniform(0.0, 0.02)))  # the job writes a shard every few ms
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                partial.append(len(list((out / 'shards').glob('*.npz'))) if (out / 'shards').exists() else 0)
            proc.wait()
        subprocess.run(_embed_cmd(plugin_vit_dir, many_photos, out), check=True, cwd=REPO, timeout=300,
                       capture_output=True)
        got = load_embeddings(out)
        assert got.ids == want.ids and len(set(got.ids)) == len(got.ids)
        np.testing.assert_array_equal(got.vectors, want.vectors)
        assert (out / 'errors.jsonl').read_text() == (reference / 'errors.jsonl').read_text()
    assert any(0 < n < total for n in partial), (partial, total)  # some kills really landed mid-job


@pytest.mark.slow
def test_an_index_build_killed_leaves_no_index_or_the_whole_one(plugin_vit_dir, many_photos, tmp_path):
    from modelscope_cnclip.index import Index
    emb = tmp_path / 'emb'
    subprocess.run(_embed_cmd(plugin_vit_dir, many_photos, emb), check=True, cwd=REPO, timeout=300,
                   capture_output=True)
    want = Index.build(emb)
    cmd = [sys.executable, '-m', 'modelscope_cnclip', 'index', 'build', str(emb), '--out', str(tmp_path / 'index')]
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen(cmd + ['--overwrite'], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        index_dir = tmp_path / 'index'
        if index_dir.exists():  # either absent or whole
            got = Index.load(index_dir)
            assert len(got) == len(want)
    subprocess.run(cmd + ['--overwrite'], check=True, cwd=REPO, timeout=300, capture_output=True)
    got = Index.load(tmp_path / 'index')
    q = want.faiss_index.reconstruct(0)[None]
    assert [h.id for h in got.search(q, 5)[0]] == [h.id for h in want.search(q, 5)[0]]


def _train_cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'modelscope_cnclip', 'train', str(model), '--data', str(data), '--out', str(out),
            '--max-epochs', '4', '--batch-size', '32', '--loader-workers', '0', *extra]


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    from modelscope_cnclip.train import latest_checkpoint
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / 'missing') is None
    for n in (1, 2, 3):
        torch.save({'w': torch.ones(100)}, tmp_path / f'epoch_{n}.pth')
        torch.save({'s': torch.ones(100)}, tmp_path / f'epoch_{n}_trainer_state.pth')
    assert latest_checkpoint(tmp_path).name == 'epoch_3.pth'
    state = tmp_path / 'epoch_3_trainer_state.pth'
    state.write_bytes(state.read_bytes()[:200])  # killed while saving
    assert latest_checkpoint(tmp_path).name == 'epoch_2.pth'
    (tmp_path / 'epoch_2.pth').write_bytes(b'')
    assert latest_checkpoint(tmp_path).name == 'epoch_1.pth'


@pytest.mark.slow
def test_training_killed_at_random_points_resumes_to_the_same_model(tmp_path, plugin_vit_dir):
    from modelscope_cnclip.data import make_synthetic_split
    from modelscope_cnclip.train import latest_checkpoint
    make_synthetic_split(tmp_path / 'data', 'train', 128, seed=1)
    make_synthetic_split(tmp_path / 'data', 'valid', 16, seed=2)
    subprocess.run(_train_cmd(plugin_vit_dir, tmp_path / 'data', tmp_path / 'full'), check=True, cwd=REPO,
                   timeout=600, capture_output=True)
    out = tmp_path / 'killed'
    rng = np.random.default_rng(1)
    landed = []
    for _ in range(3):  # three kills at random moments (a checkpoint or a save may be in progress), then to the end
        proc = subprocess.Popen(_train_cmd(plugin_vit_dir, tmp_path / 'data', out, '--resume'), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.monotonic()
        while proc.poll() is None and latest_checkpoint(out) is None and time.monotonic() - start < 120:
            time.sleep(0.05)  # past the start-up: kill while it trains
        time.sleep(float(rng.uniform(0.0, 2.0)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed.append(latest_checkpoint(out))
        proc.wait()
    subprocess.run(_train_cmd(plugin_vit_dir, tmp_path / 'data', out, '--resume'), check=True, cwd=REPO,
                   timeout=600, capture_output=True)
    assert any(p is not None for p in landed), landed  # the kills landed mid-training
    from safetensors.torch import load_file
    want, got = load_file(tmp_path / 'full' / 'output' / 'model.safetensors'), load_file(
        out / 'output' / 'model.safetensors')
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
