"""index.py: vector index and search: exact results against numpy, approximate recall, persistence, incremental
adds, the refusals (duplicates, dimension, model), the Searcher with a tiny model, and the CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('faiss')

import modelscope_cnclip.index as index_mod  # noqa: E402
from modelscope_cnclip.cli import main  # noqa: E402
from modelscope_cnclip.config import match_architecture  # noqa: E402
from modelscope_cnclip.embeddings import write_meta, write_shard  # noqa: E402
from modelscope_cnclip.index import Hit, Index, IndexOptions, Searcher, query_kind  # noqa: E402

from helpers import DATA, TINY_VIT, random_state_dict, write_hub_dir  # noqa: E402

D = 32
MODEL_A = {'source': '/models/a', 'fingerprint': 'a' * 16, 'arch': 'custom', 'embed_dim': D, 'precision': 'fp32'}
MODEL_B = {**MODEL_A, 'source': '/models/b', 'fingerprint': 'b' * 16}


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int = D, clusters: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(clusters, d, seed + 1)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(out: Path, ids: list[str], vectors: np.ndarray, model: dict = MODEL_A, root: str | None = None,
                     sources: list[str] | None = None, shard_size: int = 64) -> Path:
    """An embeddings dir as ``cnclip embed`` writes it (complete, in shards)."""
    sources = sources or [f'/data/{i}' for i in ids]
    num = -(-len(ids) // shard_size)
    for k in range(num):
        sl = slice(k * shard_size, (k + 1) * shard_size)
        write_shard(out, k, ids[sl], sources[sl], vectors[sl])
    write_meta(out, {'model': model, 'modality': 'image', 'complete': True, 'shard_size': shard_size,
                     'num_shards': num, 'input': {'kind': 'folder', 'location': root, 'root': root}})
    return out


def numpy_top(data: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ data.T
    order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def hit_rows(hits: list[list[Hit]]) -> np.ndarray:
    return np.array([[int(h.id) for h in row] for row in hits])


# --- the index ----------------------------------------------------------------------------------------------------

def test_exact_search_matches_numpy() -> None:
    data, queries = unit(400), unit(7, seed=1)
    index = Index.from_arrays([str(i) for i in range(400)], data, kind='flat')
    assert index.kind == 'flat' and len(index) == 400 and index.dim == D
    hits = index.search(queries, k=10)
    order, scores = numpy_top(data, queries, 10)
    np.testing.assert_array_equal(hit_rows(hits), order)
    np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=1e-5)
    assert [h.rank for h in hits[0]] == list(range(1, 11))
    one = index.search(queries[0], k=3)  # a (D,) query is one query
    assert len(one) == 1 and [h.id for h in one[0]] == [str(i) for i in order[0, :3]]
    assert len(index.search(queries[:2], k=1000)[0]) == 400  # k past the size: every entry once


def test_auto_is_exact_below_the_threshold_and_ivf_above(monkeypatch: pytest.MonkeyPatch) -> None:
    data = clustered(1200)
    ids = [str(i) for i in range(1200)]
    assert Index.from_arrays(ids, data).kind == 'flat'
    monkeypatch.setattr(index_mod, 'AUTO_EXACT_MAX', 1000)
    index = Index.from_arrays(ids, data)
    assert index.kind == 'ivf' and index.factory.startswith('IVF') and index.params['nprobe'] >= 16


@pytest.mark.parametrize('kind, floor', [('ivf', 0.95), ('hnsw', 0.95), ('ivfpq', 0.3), ('IVF16,SQ8', 0.9)])
def test_approximate_recall_on_clustered_data(kind: str, floor: float) -> None:
    data, queries = clustered(3000), clustered(50, seed=7)
    index = Index.from_arrays([str(i) for i in range(3000)], data, kind=kind)
    exact, _ = numpy_top(data, queries, 10)
    got = hit_rows(index.search(queries, k=10))
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(got.tolist(), exact.tolist())])
    assert recall >= floor, (kind, recall)


def test_without_faiss_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'faiss', None)  # import faiss raises ImportError
    with pytest.raises(ImportError, match=r'pip install "modelscope_cnclip\[index\]"'):
        Index.from_arrays(['a'], unit(1))


def test_bad_kind_and_options() -> None:
    with pytest.raises(ValueError, match="faiss cannot make 'nonsense'.*index_factory string"):
        Index.from_arrays(['a'], unit(1), kind='nonsense')
    with pytest.raises(TypeError, match=r"unknown index option\(s\) \['nprobes'\]; valid:"):
        Index(D, 'ivf', nprobes=3)


def test_incremental_add_duplicates_and_dimension() -> None:
    data = unit(30)
    index = Index(D, 'flat')
    assert index.add([f'x{i}' for i in range(20)], data[:20]) == 20
    assert index.add([f'x{i}' for i in range(20, 30)], data[20:]) == 10
    assert len(index) == 30 and index.search(data[25], 1)[0][0].id == 'x25'
    with pytest.raises(ValueError, match=r"2 of 3 ids are already in the index: 'x1', 'x2'.*skip_existing=True"):
        index.add(['x1', 'x2', 'new'], unit(3, seed=2))
    assert len(index) == 30  # nothing added by a refused call
    assert index.add(['x1', 'x2', 'new'], unit(3, seed=2), skip_existing=True) == 1
    assert len(index) == 31 and index.search(unit(3, seed=2)[2], 1)[0][0].id == 'new'
    with pytest.raises(ValueError, match="appear more than once in the batch: 'y'"):
        index.add(['y', 'y'], unit(2, seed=3))
    with pytest.raises(ValueError, match='vectors of dimension 16 cannot go into an index of dimension 32'):
        index.add(['z'], unit(1, d=16))
    with pytest.raises(ValueError, match='NaN or infinite'):
        index.add(['z'], np.full((1, D), np.nan, np.float32))
    with pytest.raises(ValueError, match=r'expected \(Q, 32\)'):
        index.search(unit(1, d=16))


def test_ivf_trains_on_its_first_add() -> None:
    index = Index(D, 'ivf', nlist=64)
    assert index.faiss_index is None
    with pytest.raises(ValueError, match=r"kind='ivf' \(IVF64,Flat\) is trained on its first add and needs at least "
                                         r"64 vectors; got 10"):
        index.add([str(i) for i in range(10)], unit(10))
    data = clustered(800)
    index.add([str(i) for i in range(700)], data[:700])
    assert index.faiss_index.is_trained and index.build_params['nlist'] == 64
    index.add([str(i) for i in range(700, 800)], data[700:])  # later adds: any size
    assert len(index) == 800 and index.search(data[750], 1)[0][0].id == '750'


def test_save_load_roundtrip(tmp_path: Path) -> None:
    data = clustered(900)
    ids = [f'dir/{i:04d}.jpg' for i in range(900)]
    emb = write_embeddings(tmp_path / 'photos.emb', ids, data, root='/photos')
    index = Index.build(emb, kind='ivf', nprobe=7)
    assert index.model == MODEL_A and index.root == '/photos' and index.modality == 'image'
    before = index.search(data[:5], k=5)
    out = index.save(tmp_path / 'photos.index')
    assert sorted(p.name for p in out.iterdir()) == ['ids.npz', 'index.faiss', 'meta.json']
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temporary dirs left
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['format'] == 'cnclip-index' and meta['version'] == 1 and meta['count'] == 900
    assert meta['model'] == MODEL_A and meta['kind'] == 'ivf' and meta['params'] == {'nprobe': 7}
    assert meta['root'] == '/photos' and meta['modality'] == 'image' and meta['dim'] == D
    with np.load(out / 'ids.npz', allow_pickle=False) as z:  # plain arrays
        assert z['ids_offsets'].shape == (901,)

    loaded = Index.load(out, expect_model='a' * 16)
    assert len(loaded) == 900 and loaded.kind == 'ivf' and loaded.params == {'nprobe': 7} and loaded.dim == D
    assert loaded.ids == ids and loaded.sources == [f'/data/{i}' for i in ids]
    assert loaded.search(data[:5], k=5) == before
    assert before[0][0].path == '/photos/dir/0000.jpg'  # root + id

    loaded.add(['new.jpg'], unit(1, seed=9))  # add to a loaded index, save over it
    loaded.save(out, overwrite=True)
    assert len(Index.load(out)) == 901


def test_a_failed_save_keeps_the_previous_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = Index.from_arrays(['a', 'b'], unit(2))
    out = index.save(tmp_path / 'i')
    index.add(['c'], unit(1, seed=1))
    real = index_mod.atomic_write_bytes

    def crash_on_meta(path: Path, data: bytes) -> None:
        if path.name == 'meta.json':
            raise OSError('disk full')
        real(path, data)

    monkeypatch.setattr(index_mod, 'atomic_write_bytes', crash_on_meta)
    with pytest.raises(OSError, match='disk full'):
        index.save(out, overwrite=True)
    assert Index.load(out).ids == ['a', 'b'] and [p.name for p in tmp_path.iterdir()] == ['i']
    # A save interrupted between its two renames leaves the previous index beside the path: the error says so.
    out.rename(tmp_path / '.i.x1y2.old')
    with pytest.raises(FileNotFoundError, match=r'a save was interrupted: the previous index is in .*\.i\.x1y2\.old'):
        Index.load(out)


def test_save_refuses_to_overwrite_an_index_unless_asked(tmp_path: Path) -> None:
    out = Index.from_arrays(['a', 'b'], unit(2)).save(tmp_path / 'i')
    other = Index.from_arrays(['c'], unit(1, seed=1))
    with pytest.raises(FileExistsError, match=r'i already holds an index; pass overwrite=True \(cnclip index build '
                                              r'--overwrite\) to replace it, or choose another path'):
        other.save(out)
    assert Index.load(out).ids == ['a', 'b']  # untouched
    loaded = Index.load(out)
    loaded.add(['d'], unit(1, seed=2))
    with pytest.raises(FileExistsError, match='already holds an index'):
        loaded.save(out)  # its own dir too: every writer asks
    assert loaded.save(out, overwrite=True) == out and Index.load(out).ids == ['a', 'b', 'd']
    assert [p.name for p in tmp_path.iterdir()] == ['i']  # the atomic swap left nothing beside it
    (tmp_path / 'empty').mkdir()
    assert other.save(tmp_path / 'empty') == tmp_path / 'empty'  # an empty dir is not an index to protect
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'keep.txt').write_text('x')
    with pytest.raises(FileExistsError, match='exists and is not an index dir'):
        other.save(tmp_path / 'other', overwrite=True)  # never replaces a folder that is not an index
    assert (tmp_path / 'other' / 'keep.txt').read_text() == 'x'


# --- options ------------------------------------------------------------------------------------------------------

def test_index_options_are_a_checked_frozen_dataclass() -> None:
    opts = IndexOptions(nlist=64, nprobe=8)
    assert opts.to_dict() == {'nlist': 64, 'nprobe': 8} and opts.value('M') == 32 and opts.value('seed') == 0
    with pytest.raises(AttributeError):
        opts.nprobe = 9  # frozen
    for bad in ({'nprobe': 0}, {'M': True}, {'efSearch': 1.5}, {'nlist': '64'}, {'seed': -1}):
        with pytest.raises(ValueError, match=rf'index option {next(iter(bad))}=.*: must be an int >= [01], or None'):
            IndexOptions(**bad)
    assert IndexOptions(seed=0, train_size=np.int64(500)).to_dict() == {'train_size': 500, 'seed': 0}
    with pytest.raises(TypeError, match=r"meta.json: unknown index option\(s\) \['nprobes'\]; valid: \['M', "):
        IndexOptions.from_dict({'nprobes': 3}, where='meta.json')
    with pytest.raises(TypeError, match=r'options=\{.nprobe.: 8\}: expected an IndexOptions, e.g. '
                                        r'options=IndexOptions\(nprobe=32\)'):
        Index(D, 'ivf', options={'nprobe': 8})


def test_options_build_the_index_and_are_recorded_as_before(tmp_path: Path) -> None:
    data = clustered(900)
    emb = write_embeddings(tmp_path / 'p.emb', [str(i) for i in range(900)], data)
    index = Index.build(emb, kind='ivf', options=IndexOptions(nlist=16, nprobe=7, seed=3))
    assert index.options == IndexOptions(nlist=16, nprobe=7, seed=3)
    assert index.factory == 'IVF16,Flat' and index.params == {'nprobe': 7} and index.build_params['nlist'] == 16
    meta = json.loads((index.save(tmp_path / 'p.index') / 'meta.json').read_text())
    assert meta['options'] == {'nlist': 16, 'nprobe': 7, 'seed': 3} and meta['version'] == 1
    # The keyword arguments the CLI and older code pass still work, laid over options=.
    kw = Index.build(emb, kind='ivf', options=IndexOptions(nlist=16, nprobe=7), nprobe=5)
    assert kw.options == IndexOptions(nlist=16, nprobe=5) and kw.params == {'nprobe': 5}
    hnsw = Index.from_arrays([str(i) for i in range(300)], data[:300], kind='hnsw',
                             options=IndexOptions(M=8, efSearch=40))
    assert hnsw.factory == 'HNSW8' and hnsw.build_params == {'M': 8, 'efConstruction': 40}
    assert hnsw.params == {'efSearch': 40}
    factory = Index.from_arrays([str(i) for i in range(900)], data, kind='IVF16,Flat')
    assert factory.params == {'nprobe': 16}  # default_nprobe(16); no HNSW efSearch default leaks into a factory


@pytest.mark.parametrize('name', ['v1_ivf', 'v1_hnsw'])
def test_index_dirs_saved_by_format_1_still_load(name: str, tmp_path: Path) -> None:
    """Index dirs written by the code before IndexOptions (commit f5d01a0, tests/data/index/README.md): they load,
    search as they did, and a re-save records the same options and parameters."""
    src = DATA / 'index' / name
    old = json.loads((src / 'meta.json').read_text())
    index = Index.load(src)
    assert index.options == IndexOptions(**old['options']) and index.params == old['params']
    assert index.kind == old['kind'] and len(index) == old['count'] and index.dim == 8
    vectors = unit(64, 8, seed=3) if name == 'v1_ivf' else unit(40, 8, seed=4)
    queries = unit(5, 8, seed=11)
    order, _ = numpy_top(vectors, queries, 3)  # IVF4 with nprobe 4 and a 40-node HNSW: exact here
    assert [[index.ids.index(h.id) for h in row] for row in index.search(queries, k=3)] == order.tolist()
    new = json.loads((index.save(tmp_path / 'resaved') / 'meta.json').read_text())
    for key in ('format', 'version', 'count', 'dim', 'kind', 'factory', 'params', 'build', 'model', 'modality',
                'root', 'requested_kind', 'options'):
        assert new[key] == old[key], key


def test_path_is_the_source_without_root() -> None:
    index = Index.from_arrays(['a', 'b'], unit(2), sources=['http://x/a.jpg', '/y/b.png'])
    assert [h.path for h in index.search(unit(2)[1], 2)[0]] == ['/y/b.png', 'http://x/a.jpg']
    bare = Index.from_arrays(['a'], unit(1))
    assert bare.search(unit(1)[0], 1)[0][0].path == 'a'  # nothing better known


def test_load_refusals(tmp_path: Path) -> None:
    index = Index.from_arrays(['a', 'b', 'c'], unit(3), meta={'model': MODEL_A})
    out = index.save(tmp_path / 'i')
    with pytest.raises(ValueError, match=r"built from embeddings of model '/models/a' \(fingerprint a{16}\), but the "
                                         r"model given is another model \(fingerprint c{16}\).*rebuild the index"):
        Index.load(out, expect_model='c' * 16)
    meta = json.loads((out / 'meta.json').read_text())
    (out / 'meta.json').write_text(json.dumps({**meta, 'count': 4}))
    with pytest.raises(ValueError, match=r'inconsistent index \(3 ids, 0 sources, 3 vectors, meta.json says 4\)'):
        Index.load(out)
    with pytest.raises(FileNotFoundError, match='not an index dir'):
        Index.load(tmp_path / 'missing')
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'keep.txt').write_text('x')
    with pytest.raises(FileExistsError, match='exists and is not an index dir'):
        index.save(tmp_path / 'other')


def test_add_embeddings_refuses_another_model_or_root(tmp_path: Path) -> None:
    index = Index.build(write_embeddings(tmp_path / 'a.emb', ['1', '2'], unit(2), root='/photos'))
    other = write_embeddings(tmp_path / 'b.emb', ['3'], unit(1, seed=1), model=MODEL_B, root='/photos')
    with pytest.raises(ValueError, match=r"b.emb were made by model '/models/b' \(fingerprint b{16}\), but this index "
                                         r"holds embeddings of model '/models/a' \(fingerprint a{16}\)"):
        index.add_embeddings(other)
    elsewhere = write_embeddings(tmp_path / 'c.emb', ['3'], unit(1, seed=1), root='/elsewhere')
    with pytest.raises(ValueError, match="come from folder '/elsewhere', the index from folder '/photos'"):
        index.add_embeddings(elsewhere)
    with pytest.raises(ValueError, match='come from no folder'):
        index.add_embeddings(write_embeddings(tmp_path / 'e.emb', ['5'], unit(1, seed=3)))
    more = write_embeddings(tmp_path / 'd.emb', ['2', '4'], unit(2, seed=2), root='/photos')
    with pytest.raises(ValueError, match="already in the index: '2'"):
        index.add_embeddings(more)
    assert index.add_embeddings(more, skip_existing=True) == 1 and index.ids == ['1', '2', '4']


def test_query_kind(tmp_path: Path) -> None:
    f = tmp_path / 'q.png'
    Image.new('RGB', (8, 8)).save(f)
    assert query_kind('海边的日落') == 'text' and query_kind(str(f)) == 'image' and query_kind(f) == 'image'
    assert query_kind('https://example.com/cat.jpg') == 'image' and query_kind(b'\x89PNG') == 'image'
    assert query_kind(Image.new('RGB', (4, 4))) == 'image' and query_kind(np.zeros((4, 4, 3), np.uint8)) == 'image'
    with pytest.raises(TypeError, match='looks like an embedding: use Searcher.search_vectors'):
        query_kind(np.zeros(D, np.float32))
    with pytest.raises(TypeError, match='query of type int'):
        query_kind(3)


# --- with a model -------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def photo_index(tmp_path_factory: pytest.TempPathFactory, tiny_model,
                images: list[Image.Image]) -> tuple[Path, Path]:
    """An image folder embedded with the tiny model: (index dir, folder)."""
    tmp = tmp_path_factory.mktemp('search')
    folder = tmp / 'photos'
    rels = ['a.png', 'sub/b.png', 'sub/c.png']
    for rel, im in zip(rels, images):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(folder / rel)
    vectors = tiny_model.encode_image([str(folder / r) for r in rels]).numpy()
    info = {'source': tiny_model.source, 'fingerprint': tiny_model.fingerprint,
            'arch': match_architecture(tiny_model.config) or 'custom', 'embed_dim': tiny_model.config.embed_dim,
            'precision': tiny_model.precision}
    emb = write_embeddings(tmp / 'photos.emb', rels, vectors, model=info, root=str(folder),
                           sources=[str(folder / r) for r in rels])
    return Index.build(emb).save(tmp / 'photos.index'), folder


def test_searcher_text_and_image_queries(photo_index: tuple[Path, Path], tiny_model, images: list) -> None:
    index_dir, folder = photo_index
    searcher = Searcher.open(index_dir)  # loads the model recorded in the index
    assert searcher.model.fingerprint == tiny_model.fingerprint
    hits = searcher.search(str(folder / 'sub' / 'b.png'), k=3)  # an existing file: image-to-image
    assert hits[0].id == 'sub/b.png' and hits[0].path == str(folder / 'sub' / 'b.png')
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and len(hits) == 3
    assert searcher.search(images[2], k=1)[0].id == 'sub/c.png'  # a PIL image
    text = searcher.search('海边的日落', k=3)
    vectors = tiny_model.encode_image([str(folder / h) for h in ('a.png', 'sub/b.png', 'sub/c.png')]).numpy()
    expect = np.argsort(-(vectors @ tiny_model.encode_text('海边的日落').numpy()[0]))
    assert [h.id for h in text] == [['a.png', 'sub/b.png', 'sub/c.png'][i] for i in expect]
    forced = searcher.search(str(folder / 'a.png'), k=3, kind='text')  # the path as text
    q = tiny_model.encode_text(str(folder / 'a.png')).numpy()[0]
    assert [h.score for h in forced] == pytest.approx(sorted((vectors @ q).tolist(), reverse=True), abs=1e-5)
    assert searcher.search_vectors(vectors[0], k=1)[0].id == 'a.png'
    with pytest.raises(ValueError, match="kind='audio'"):
        searcher.search('x', kind='audio')


def test_searcher_refuses_another_model(photo_index: tuple[Path, Path], tmp_path: Path) -> None:
    other = write_hub_dir(tmp_path / 'other', TINY_VIT, random_state_dict(TINY_VIT, seed=5))
    with pytest.raises(ValueError, match=r'was built from embeddings of model .*plugin.*, but the model given is '
                                         r'.*other \(fingerprint [0-9a-f]{16}\); use it with the model that '
                                         r'built it'):
        Searcher.open(photo_index[0], model=other)


# --- CLI ----------------------------------------------------------------------------------------------------------

def test_cli_build_add_info_search(tmp_path: Path, photo_index: tuple[Path, Path], capsys) -> None:
    data = clustered(300)
    emb = write_embeddings(tmp_path / 'a.emb', [f'{i}.jpg' for i in range(200)], data[:200], root='/p')
    out = tmp_path / 'a.index'
    assert main(['index', 'build', str(emb), '--out', str(out), '--kind', 'ivf', '--nprobe', '5']) == 0
    assert '200 vectors' in capsys.readouterr().out
    assert main(['index', 'build', str(emb), '--out', str(out)]) == 2  # exists: needs --overwrite
    err = capsys.readouterr().err
    assert 'already' in err and '--overwrite' in err
    more = write_embeddings(tmp_path / 'b.emb', [f'{i}.jpg' for i in range(150, 300)], data[150:], root='/p')
    assert main(['index', 'add', str(out), str(more)]) == 2
    assert "50 of 150 ids are already in the index: '150.jpg'" in capsys.readouterr().err
    assert main(['index', 'add', str(out), str(more), '--skip-existing']) == 0
    assert 'added 100' in capsys.readouterr().out
    assert main(['index', 'info', str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['count'] == 300 and info['kind'] == 'ivf' and info['params'] == {'nprobe': 5}
    assert info['model']['fingerprint'] == 'a' * 16

    index_dir, folder = photo_index
    assert main(['search', str(index_dir), str(folder / 'a.png'), '--top-k', '2', '--json']) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]['id'] == 'a.png' and lines[0]['path'] == str(folder / 'a.png')
    assert set(lines[0]) == {'id', 'path', 'score'}
    assert main(['search', str(index_dir), '一只猫', '--text']) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ['rank', 'score', 'path'] and len(table) == 4 and table[1].split()[0] == '1'
    assert main(['search', str(tmp_path / 'nowhere'), 'x']) == 2
    assert 'not an index dir' in capsys.readouterr().err


def test_cli_index_build_overwrite_replaces_the_index(tmp_path: Path, capsys) -> None:
    emb = write_embeddings(tmp_path / 'a.emb', [f'{i}.jpg' for i in range(200)], clustered(200), root='/p')
    out = tmp_path / 'a.index'
    assert main(['index', 'build', str(emb), '--out', str(out), '--kind', 'ivf', '--nprobe', '5']) == 0
    assert main(['index', 'build', str(emb), '--out', str(out), '--kind', 'flat', '--overwrite']) == 0
    assert '200 vectors, kind flat' in capsys.readouterr().out
    assert json.loads((out / 'meta.json').read_text())['kind'] == 'flat' and len(Index.load(out)) == 200


def test_embed_job_then_index_then_search(tmp_path: Path, plugin_vit_dir: Path, images: list, capsys) -> None:
    """The whole path a user takes: `cnclip embed` a folder, `cnclip index build`, `cnclip search` by image."""
    from modelscope_cnclip.jobs.run import embed_collection
    folder = tmp_path / 'photos'
    for rel, im in zip(['x.png', 'deep/y.png', 'deep/z.png'], images):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(folder / rel)
    embed_collection(plugin_vit_dir, folder, tmp_path / 'p.emb', progress=False)
    assert main(['index', 'build', str(tmp_path / 'p.emb'), '--out', str(tmp_path / 'p.index')]) == 0
    capsys.readouterr()
    assert main(['search', str(tmp_path / 'p.index'), str(folder / 'deep' / 'y.png'), '--json', '--top-k', '1']) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit['id'] == 'deep/y.png' and Path(hit['path']) == (folder / 'deep' / 'y.png').resolve()
