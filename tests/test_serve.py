"""serve/: the HTTP service over real HTTP on loopback: the OpenAI embeddings API (and the official `openai` client),
rank, search, models, health, metrics; dynamic batching under 32 concurrent clients; API keys; image inputs that are
never server paths, URL fetching that refuses non-public targets; bad input interleaved with good; disconnects;
SIGTERM draining; a model that fails to load; the CLI; Ray Serve replicas (slow)."""
from __future__ import annotations

import base64
import contextlib
import http.server
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('fastapi')
pytest.importorskip('batched')
import httpx  # noqa: E402

from modelscope_cnclip import load  # noqa: E402
from modelscope_cnclip.serve import fetch  # noqa: E402
from modelscope_cnclip.serve.app import create_app  # noqa: E402
from modelscope_cnclip.serve.schema import ApiError, parse_embeddings, read_json  # noqa: E402
from modelscope_cnclip.serve.server import ModelSpec, RayServeOptions  # noqa: E402
from modelscope_cnclip.serve.service import EmbeddingService  # noqa: E402
from modelscope_cnclip.serve.settings import ServeSettings  # noqa: E402

from helpers import REPO, bomb_png  # noqa: E402

TEXTS = ['海边的日落', '一只猫', '红色的圆形', 'a photo of a dog', '杰尼龟', '皮卡丘', '蓝色的正方形', '长城']


def png_bytes(img: Image.Image | np.ndarray) -> bytes:
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    buf = io.BytesIO()
    img.save(buf, 'PNG')
    return buf.getvalue()


def data_uri(data: bytes, kind: str = 'png') -> str:
    return f'data:image/{kind};base64,' + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` on uvicorn at 127.0.0.1 (a free port) in a thread; yields the base URL; stops on exit."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=0, log_level='warning', lifespan='on'))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), 'server did not start'
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope='module')
def settings() -> ServeSettings:
    return ServeSettings(batch_wait_ms=20, max_items=16, max_body_bytes=1 << 20, max_text_chars=100)


@pytest.fixture(scope='module')
def base(tiny_model, settings) -> Iterator[str]:
    with running(create_app(EmbeddingService(tiny_model, settings), settings)) as url:
        yield url


@pytest.fixture(scope='module')
def client(base) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=60) as c:
        yield c


@pytest.fixture(scope='module')
def pictures(images, photo) -> list[bytes]:
    return [png_bytes(i) for i in images] + [png_bytes(photo)]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body['error']) == {'message', 'type', 'param', 'code', 'index'}
    assert 'Traceback' not in r.text
    return body['error']


# --- the API  --------------------------------------------------------------------------------------------------------

def test_embeddings_are_the_library_embeddings(client, tiny_model):
    r = client.post('/v1/embeddings', json={'model': 'cnclip', 'input': TEXTS[:3]})
    assert r.status_code == 200
    body = r.json()
    assert body['object'] == 'list' and body['model'] == 'cnclip'
    assert [d['index'] for d in body['data']] == [0, 1, 2] and {d['object'] for d in body['data']} == {'embedding'}
    got = np.array([d['embedding'] for d in body['data']], dtype=np.float32)
    np.testing.assert_array_equal(got, tiny_model.encode_text(TEXTS[:3]).numpy())
    tokens = int(tiny_model.tokenizer(TEXTS[:3])['attention_mask'].sum())
    assert body['usage'] == {'prompt_tokens': tokens, 'total_tokens': tokens}
    one = client.post('/v1/embeddings', json={'input': TEXTS[0], 'encoding_format': 'base64'}).json()
    vec = np.frombuffer(base64.b64decode(one['data'][0]['embedding']), dtype='<f4')
    np.testing.assert_array_equal(vec, tiny_model.encode_text(TEXTS[:1])[0].numpy())  # alone, as sent


def test_images_as_data_uris_and_base64(client, tiny_model, pictures, images, photo):
    forms = [data_uri(pictures[0]), base64.b64encode(pictures[1]).decode(),
             base64.urlsafe_b64encode(pictures[2]).decode().rstrip('='),
             'data:image/png;base64,' + base64.encodebytes(pictures[3]).decode()]  # line-wrapped
    r = client.post('/v1/embeddings', json={'input': forms, 'modality': 'image'})
    assert r.status_code == 200, r.text
    got = np.array([d['embedding'] for d in r.json()['data']], dtype=np.float32)
    ref = tiny_model.encode_image([*images, photo]).numpy()
    assert np.abs(got - ref).max() < 1e-6
    assert r.json()['usage'] == {'prompt_tokens': 0, 'total_tokens': 0}


def test_openai_client_unchanged(base, tiny_model, pictures, images):
    openai = pytest.importorskip('openai')
    client = openai.OpenAI(base_url=base + '/v1', api_key='unused', max_retries=0)
    r = client.embeddings.create(model='cnclip', input=TEXTS[:4])  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_array_equal(got, tiny_model.encode_text(TEXTS[:4]).numpy())
    assert r.usage.prompt_tokens > 0 and [d.index for d in r.data] == [0, 1, 2, 3]
    floats = client.embeddings.create(model='cnclip', input='一只猫', encoding_format='float')
    np.testing.assert_array_equal(np.float32(floats.data[0].embedding), tiny_model.encode_text(['一只猫'])[0].numpy())
    image = client.embeddings.create(model='cnclip', input=[data_uri(pictures[0])], extra_body={'modality': 'image'})
    assert np.abs(np.float32(image.data[0].embedding) - tiny_model.encode_image([images[0]])[0].numpy()).max() < 1e-6
    assert [m.id for m in client.models.list().data] == ['cnclip']
    with pytest.raises(openai.NotFoundError, match='not served here'):
        client.embeddings.create(model='text-embedding-3-small', input='x')


def test_rank_both_directions(client, tiny_model, images, pictures):
    r = client.post('/v1/rank', json={'image': data_uri(pictures[0]), 'texts': TEXTS[:4]})
    assert r.status_code == 200, r.text
    expected = tiny_model.probabilities([images[0]], TEXTS[:4])[0].numpy()
    assert np.abs(np.array(r.json()['probabilities']) - expected).max() < 1e-5
    assert abs(sum(r.json()['probabilities']) - 1) < 1e-9
    r = client.post('/v1/rank', json={'text': TEXTS[0], 'images': [data_uri(p) for p in pictures[:3]]})
    assert r.status_code == 200, r.text
    img, txt = tiny_model.encode_image(images), tiny_model.encode_text([TEXTS[0]])
    expected = ((txt / tiny_model.temperature) @ img.T).softmax(-1)[0].numpy()
    assert np.abs(np.array(r.json()['probabilities']) - expected).max() < 1e-5
    assert np.abs(np.array(r.json()['similarities']) - (img @ txt.T)[:, 0].numpy()).max() < 1e-5
    err = error_of(client.post('/v1/rank', json={'image': data_uri(pictures[0]), 'images': []}), 400)
    assert '"texts"' in err['message']


def test_search_over_an_index(tmp_path, tiny_model, images, settings):
    from modelscope_cnclip.index import Index, Searcher
    vectors = tiny_model.encode_image(images).numpy()
    index = Index.from_arrays([f'img{i}' for i in range(3)], vectors, meta={'model': tiny_model.info()})
    with running(create_app(EmbeddingService(tiny_model, settings, index), settings)) as url:
        r = httpx.post(url + '/v1/search', json={'query': '红色的圆形', 'top_k': 2})
        assert r.status_code == 200, r.text
        expected = Searcher(index, tiny_model).search('红色的圆形', k=2)
        assert [h['id'] for h in r.json()['data']] == [h.id for h in expected]
        assert np.allclose([h['score'] for h in r.json()['data']], [h.score for h in expected], atol=1e-5)
        r = httpx.post(url + '/v1/search', json={'query': data_uri(png_bytes(images[1])), 'modality': 'image',
                                                 'top_k': 1})
        assert r.json()['data'][0]['id'] == 'img1'
        assert httpx.get(url + '/v1/models').json()['data'][0]['index']['count'] == 3
        error_of(httpx.post(url + '/v1/search', json={'query': 'x', 'top_k': 0}), 400)


def test_search_without_an_index_is_a_404(client):
    err = error_of(client.post('/v1/search', json={'query': '猫'}), 404)
    assert '--index' in err['message']


def test_models_health_metrics(client):
    model = client.get('/v1/models').json()['data'][0]
    assert model['id'] == 'cnclip' and model['embed_dim'] > 0 and model['backend'] == 'torch'
    assert '/' not in model['source']  # no server directories
    assert client.get('/health').json() == {'status': 'ok', 'model': 'cnclip'}
    client.post('/v1/embeddings', json={'input': ['x']})
    client.post('/v1/embeddings', content=b'{')
    text = client.get('/metrics').text
    for name in ('cnclip_requests_total{route="/v1/embeddings",status="200"}',
                 'cnclip_request_errors_total{code="invalid_json",route="/v1/embeddings"}',
                 'cnclip_request_seconds_bucket', 'cnclip_batch_size_bucket', 'cnclip_items_total',
                 'cnclip_model_ready 1.0'):
        assert name in text, name


def test_health_is_503_until_the_model_is_loaded(tiny_model, settings):
    gate = threading.Event()

    def slow_loader() -> EmbeddingService:
        gate.wait(30)
        return EmbeddingService(tiny_model, settings)
    with running(create_app(slow_loader, settings)) as url:
        assert httpx.get(url + '/health').status_code == 503
        err = error_of(httpx.post(url + '/v1/embeddings', json={'input': 'x'}), 503)
        assert err['code'] == 'model_loading'
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + '/health').status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(url + '/v1/embeddings', json={'input': 'x'}).status_code == 200


def test_a_model_that_fails_to_load(tmp_path, settings):
    def broken() -> EmbeddingService:
        raise FileNotFoundError('no such model: nowhere/')
    with running(create_app(broken, settings)) as url:
        deadline = time.monotonic() + 10
        while httpx.get(url + '/health').json()['status'] != 'failed':
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert 'no such model' in httpx.get(url + '/health').json()['error']
        assert 'no such model' in error_of(httpx.post(url + '/v1/embeddings', json={'input': 'x'}), 503)['message']
    r = subprocess.run([sys.executable, '-m', 'modelscope_cnclip', 'serve', str(tmp_path / 'missing'), '--port', '0'],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and 'cnclip serve: error:' in r.stderr and 'missing' in r.stderr


def test_exported_models_serve_too(tmp_path, plugin_vit_dir, settings, pictures, images):
    pytest.importorskip('onnxruntime')
    from modelscope_cnclip.deploy import export
    out = export(plugin_vit_dir, tmp_path / 'onnx').out
    exported = load(out, backend='onnxruntime')
    with running(create_app(ModelSpec(out, {'backend': 'onnxruntime'}).build(settings), settings)) as url:
        r = httpx.post(url + '/v1/embeddings', json={'input': TEXTS[:2]})
        assert np.abs(np.float32([d['embedding'] for d in r.json()['data']]) - exported.encode_text(TEXTS[:2]).numpy()
                      ).max() < 1e-6
        r = httpx.post(url + '/v1/embeddings', json={'input': [data_uri(pictures[0])], 'modality': 'image'})
        assert np.abs(np.float32(r.json()['data'][0]['embedding']) - exported.encode_image([images[0]])[0].numpy()
                      ).max() < 1e-6
        assert httpx.get(url + '/v1/models').json()['data'][0]['backend'] == 'onnxruntime'


def test_an_index_from_another_model_is_refused(tmp_path, tiny_model, images, settings):
    from modelscope_cnclip.index import Index
    other = {**tiny_model.info(), 'fingerprint': '0' * 16}
    index = Index.from_arrays(['a', 'b', 'c'], tiny_model.encode_image(images).numpy(), meta={'model': other})
    index.save(tmp_path / 'other.index')
    with pytest.raises(ValueError, match='fingerprint|another model|different model'):
        ModelSpec(str(tiny_model.source), index=str(tmp_path / 'other.index')).build(settings)


def test_a_fault_in_the_model_is_a_500_without_details(tiny_model, settings, monkeypatch):
    service = EmbeddingService(tiny_model, settings)
    with running(create_app(service, settings)) as url:
        def broken(texts):
            raise RuntimeError('secret internals /srv/models')
        monkeypatch.setattr(service, '_encode_texts', broken)
        err = error_of(httpx.post(url + '/v1/embeddings', json={'input': ['x']}), 500)
        assert err['code'] == 'internal' and 'incident' in err['message'] and 'secret' not in err['message']
        monkeypatch.undo()
        assert httpx.post(url + '/v1/embeddings', json={'input': ['x']}).status_code == 200


# --- batching  -------------------------------------------------------------------------------------------------------

def test_32_concurrent_clients_are_batched_and_get_the_library_embeddings(tiny_model, pictures, images, photo):
    settings = ServeSettings(batch_wait_ms=50, max_batch_size=64)
    service = EmbeddingService(tiny_model, settings)
    sizes: list[tuple[str, int]] = []
    app = create_app(service, settings)
    with running(app) as url:
        hook = service.on_batch
        service.on_batch = lambda m, n: (sizes.append((m, n)), hook(m, n))
        all_images = [*images, photo]

        def call(i: int) -> tuple[int, np.ndarray]:
            with httpx.Client(base_url=url, timeout=60) as c:
                if i % 2:
                    r = c.post('/v1/embeddings', json={'input': [TEXTS[i % 8], TEXTS[(i + 3) % 8]]})
                else:
                    r = c.post('/v1/embeddings', json={'input': [data_uri(pictures[i % 4])], 'modality': 'image'})
                assert r.status_code == 200, r.text
                return i, np.array([d['embedding'] for d in r.json()['data']], dtype=np.float32)
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, range(32)))
    for i, got in results:
        ref = (tiny_model.encode_text([TEXTS[i % 8], TEXTS[(i + 3) % 8]]) if i % 2 else
               tiny_model.encode_image([all_images[i % 4]])).numpy()
        assert np.abs(got - ref).max() < 1e-5, i
    text_batches = [n for m, n in sizes if m == 'text']
    assert sum(text_batches) == 32 and max(text_batches) > 2, sizes  # requests were merged
    assert sum(n for m, n in sizes if m == 'image') == 16


# --- bad input  ------------------------------------------------------------------------------------------------------

BAD = [  # (body, status, code, index)
    (b'{"input": ["a"', 400, 'invalid_json', None),
    (b'\xff\xfe', 400, 'invalid_json', None),
    (b'', 400, 'invalid_json', None),
    (b'[1, 2]', 400, 'invalid_request', None),
    (json.dumps({'input': 5}).encode(), 400, 'invalid_request', None),
    (json.dumps({'input': []}).encode(), 400, 'empty_input', None),
    (json.dumps({'input': ['ok', '']}).encode(), 400, 'empty_input', 1),
    (json.dumps({'input': ['ok', 7]}).encode(), 400, 'token_ids', 1),
    (json.dumps({'input': ['ok', None]}).encode(), 400, 'invalid_type', 1),
    (json.dumps({'input': [[101, 102]]}).encode(), 400, 'token_ids', 0),
    (json.dumps({'input': ['x'] * 17}).encode(), 413, 'too_many_items', None),
    (json.dumps({'input': ['长' * 101]}).encode(), 413, 'text_too_long', 0),
    (json.dumps({'input': ['x'], 'encoding_format': 'int8'}).encode(), 400, 'invalid_request', None),
    (json.dumps({'input': ['x'], 'modality': 'audio'}).encode(), 400, 'invalid_request', None),
    (json.dumps({'input': ['x'], 'dimensions': 8}).encode(), 400, 'unsupported', None),
    (json.dumps({'input': ['x'], 'model': 'gpt-4'}).encode(), 404, 'model_not_found', None),
    (json.dumps({'input': ['data:image/png;base64,iVBORw0KGgo=']}).encode(), 400, 'image_as_text', 0),
    (json.dumps({'input': ['aGVsbG8=', 'bm90IGFuIGltYWdl'], 'modality': 'image'}).encode(), 400, 'invalid_image',
     0),
    (json.dumps({'input': ['/etc/passwd'], 'modality': 'image'}).encode(), 400, 'invalid_image', 0),
    (json.dumps({'input': ['photos/cat.jpg'], 'modality': 'image'}).encode(), 400, 'invalid_image', 0),
    (json.dumps({'input': ['http://127.0.0.1/x.png'], 'modality': 'image'}).encode(), 400, 'urls_disabled', 0),
    (json.dumps({'input': ['data:text/html;base64,PGI+'], 'modality': 'image'}).encode(), 400, 'invalid_image', 0),
    (json.dumps({'input': ['!!!'], 'modality': 'image'}).encode(), 400, 'invalid_image', 0),
    (json.dumps({'input': [data_uri(bomb_png())], 'modality': 'image'}).encode(), 413, 'image_too_large', 0),
    (b'{"input": "' + b'x' * (1 << 20) + b'"}', 413, 'body_too_large', None),
    (b'{"input": ["x"], "dimensions": ' + b'9' * 5000 + b'}', 400, 'invalid_json', None),
    (json.dumps({'input': None}).encode(), 400, 'invalid_request', None),
    (json.dumps({'input': ['ok', '\u200b\ufeff', 'x']}).encode(), 400, 'empty_input', 1),
    (json.dumps({'input': ['\u0000\u0001']}).encode(), 400, 'empty_input', 0),
    (json.dumps({'input': ['data:image/png;base64,' + 'A' * 5000]}).encode(), 400, 'image_as_text', 0),
    (json.dumps({'input': ['HTTP://127.0.0.1/x.png'], 'modality': 'image'}).encode(), 400, 'urls_disabled', 0),
]


@pytest.mark.parametrize('body,status,code,index', BAD, ids=[f'{b[:24]!r}-{c}' for b, _, c, _ in BAD])
def test_bad_input_is_a_4xx_naming_the_item(client, body, status, code, index):
    err = error_of(client.post('/v1/embeddings', content=body, headers={'content-type': 'application/json'}),
                   status)
    assert err['code'] == code and err['index'] == index, err
    if index is not None:
        assert f'[{index}]' in err['message']
    if code == 'invalid_image' and b'/' in body[:40] and b'base64' not in body:
        assert 'never reads file paths' in err['message']


def test_nulls_mean_defaults_and_schemes_ignore_case(client, tiny_model, pictures, images):
    r = client.post('/v1/embeddings', json={'input': ['猫'], 'encoding_format': None, 'model': None,
                                             'modality': None})
    assert r.status_code == 200 and isinstance(r.json()['data'][0]['embedding'], list)
    upper = 'DATA:IMAGE/PNG;BASE64,' + base64.b64encode(pictures[0]).decode()
    r = client.post('/v1/embeddings', json={'input': [upper], 'modality': 'image'})
    assert r.status_code == 200, r.text
    assert error_of(client.post('/v1/search', json={'query': None}), 400)['param'] == 'query'
    assert error_of(client.post('/v1/search', json={'query': 'x', 'top_k': None}), 404)['code'] == 'no_index'
    err = error_of(client.post('/v1/embeddings', content=b'\x1f\x8b\x08\x00',
                               headers={'content-encoding': 'gzip', 'content-type': 'application/json'}), 415)
    assert 'gzip' in err['message']


def test_rank_checks_every_input_before_embedding_any(tiny_model, settings, pictures):
    service = EmbeddingService(tiny_model, settings)
    embedded = []
    with running(create_app(service, settings)) as url:
        hook = service.on_batch
        service.on_batch = lambda m, n: (embedded.append((m, n)), hook(m, n))
        err = error_of(httpx.post(url + '/v1/rank', json={'image': 'bm9wZQ==', 'texts': ['a', 'b']}), 400)
        assert err['param'] == 'image'
        err = error_of(httpx.post(url + '/v1/rank', json={'text': 'a', 'images': ['bm9wZQ==']}), 400)
        assert err['index'] == 0 and 'images[0]' in err['message']
        err = error_of(httpx.post(url + '/v1/rank', json={'image': data_uri(pictures[0]), 'texts': ['a', '\u200b']}),
                       400)
        assert err['index'] == 1
    assert embedded == []


def test_models_shows_no_server_paths(tmp_path, tiny_model, images, settings):
    from modelscope_cnclip.index import Index
    index = Index.from_arrays(['a', 'b', 'c'], tiny_model.encode_image(images).numpy(),
                              sources=[str(tmp_path / f'{i}.png') for i in range(3)],
                              meta={'model': tiny_model.info(), 'root': str(tmp_path)})
    with running(create_app(EmbeddingService(tiny_model, settings, index), settings)) as url:
        text = httpx.get(url + '/v1/models').text
        assert str(tmp_path) not in text and str(Path(tiny_model.source).parent) not in text
        assert error_of(httpx.post(url + '/v1/embeddings', json={'input': 'x', 'model': tiny_model.source}), 404)
        assert httpx.post(url + '/v1/embeddings', json={'input': 'x', 'model': Path(tiny_model.source).name}
                          ).status_code == 200


def test_bad_rank_and_search_requests(client, pictures):
    assert error_of(client.post('/v1/rank', json={'image': 'bm9wZQ==', 'texts': ['a']}), 400)['param'] == 'image'
    err = error_of(client.post('/v1/rank', json={'text': 'a', 'images': [data_uri(pictures[0]), 'bm9wZQ==']}), 400)
    assert err['index'] == 1 and 'images[1]' in err['message']
    assert error_of(client.post('/v1/rank', json={'image': data_uri(pictures[0]), 'texts': []}), 400)['code'] == \
        'empty_input'
    assert error_of(client.get('/v1/embeddings'), 405)['code'] == 'method_not_allowed'
    assert error_of(client.get('/nowhere'), 404)['code'] == 'not_found'


def test_bad_requests_interleaved_with_good_ones(client, tiny_model):
    expected = tiny_model.encode_text(TEXTS).numpy()

    def good(i: int) -> None:
        r = client.post('/v1/embeddings', json={'input': [TEXTS[i % 8]]})
        assert r.status_code == 200, r.text
        assert np.abs(np.float32(r.json()['data'][0]['embedding']) - expected[i % 8]).max() < 1e-5

    def bad(i: int) -> None:
        body, status, code, _ = BAD[i % len(BAD)]
        r = client.post('/v1/embeddings', content=body)
        assert r.status_code == status and r.json()['error']['code'] == code
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: (good if i % 2 else bad)(i), range(120)))


def test_a_client_that_disconnects_does_not_stall_others(base, client, tiny_model):
    host, port = base.removeprefix('http://').split(':')
    body = json.dumps({'input': TEXTS}).encode()
    for partial in (True, False):
        s = socket.create_connection((host, int(port)))
        head = f'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n' \
               f'Content-Length: {len(body) + (100 if partial else 0)}\r\n\r\n'.encode()
        s.sendall(head + body)
        s.close()  # mid-body, or before the answer
    start = time.monotonic()
    r = client.post('/v1/embeddings', json={'input': TEXTS[:2]})
    assert r.status_code == 200 and time.monotonic() - start < 10
    got = np.float32([d['embedding'] for d in r.json()['data']])
    assert np.abs(got - tiny_model.encode_text(TEXTS[:2]).numpy()).max() < 1e-5
    assert 'code="internal"' not in client.get('/metrics').text  # a client leaving is not a server fault


def test_a_body_that_never_arrives_gets_408(tiny_model):
    settings = ServeSettings(read_timeout_s=1)
    with running(create_app(EmbeddingService(tiny_model, settings), settings)) as url:
        host, port = url.removeprefix('http://').split(':')
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"input"')
            start = time.monotonic()
            answer = s.recv(4096).decode()
        assert answer.startswith('HTTP/1.1 408') and time.monotonic() - start < 5, answer


# --- safety  ---------------------------------------------------------------------------------------------------------

def test_api_key(tiny_model, monkeypatch):
    settings = ServeSettings(api_key='s3cret')
    with running(create_app(EmbeddingService(tiny_model, settings), settings)) as url:
        assert httpx.get(url + '/health').status_code == 200  # probes need no key
        for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': 's3cret'}):
            r = httpx.post(url + '/v1/embeddings', json={'input': 'x'}, headers=headers)
            assert error_of(r, 401)['code'] == 'invalid_api_key' and r.headers['www-authenticate'] == 'Bearer'
        assert httpx.get(url + '/metrics').status_code == 401
        r = httpx.post(url + '/v1/embeddings', json={'input': 'x'}, headers={'Authorization': 'Bearer s3cret'})
        assert r.status_code == 200
        assert httpx.get(url + '/docs').status_code == 404 and httpx.get(url + '/openapi.json').status_code == 404
    for bad in ('   ', ' padded ', '密钥'):
        monkeypatch.setenv('CNCLIP_API_KEY', bad)
        with pytest.raises(ValueError, match='printable ASCII'):
            assert ServeSettings().key is None
    monkeypatch.setenv('CNCLIP_API_KEY', 'from-env')
    settings = ServeSettings()
    assert settings.key == 'from-env' and settings.to_dict()['api_key'] == '<set>'
    with running(create_app(EmbeddingService(tiny_model, settings), settings)) as url:
        assert httpx.post(url + '/v1/embeddings', json={'input': 'x'}).status_code == 401
        assert httpx.post(url + '/v1/embeddings', json={'input': 'x'},
                          headers={'Authorization': 'Bearer from-env'}).status_code == 200


@pytest.mark.parametrize('address', ['127.0.0.1', '10.1.2.3', '172.16.0.1', '192.168.1.1', '169.254.169.254',
                                     '100.64.0.1', '0.0.0.0', '224.0.0.1', '::1', 'fe80::1', 'fc00::1',
                                     '::ffff:127.0.0.1', '::ffff:10.0.0.1', '64:ff9b::a9fe:a9fe', '64:ff9b:1::1',
                                     '2002:7f00:1::', '::127.0.0.1', '::ffff:0:7f00:1', 'fec0::1'])
def test_non_public_addresses_are_refused(address):
    assert not fetch.is_public_address(ipaddress.ip_address(address))


def test_public_addresses_pass():
    assert fetch.is_public_address(ipaddress.ip_address('93.184.216.34'))
    assert fetch.is_public_address(ipaddress.ip_address('2606:4700::1111'))


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict, bytes, float]] = {}

    def do_GET(self) -> None:  # noqa: N802
        status, headers, body, delay = self.routes.get(self.path, (404, {}, b'', 0))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        for i in range(0, len(body), 4096):
            if delay:
                time.sleep(delay)
            try:
                self.wfile.write(body[i:i + 4096])
            except OSError:
                return

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope='module')
def web(pictures) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    port = server.server_address[1]
    _Handler.routes = {
        '/cat.png': (200, {'Content-Type': 'image/png'}, pictures[0], 0),
        '/to-loopback': (302, {'Location': f'http://127.0.0.2:{port}/cat.png'}, b'', 0),
        '/to-metadata': (302, {'Location': 'http://169.254.169.254/latest/meta-data/'}, b'', 0),
        '/loop': (302, {'Location': '/loop'}, b'', 0),
        '/big': (200, {}, b'\0' * (3 << 20), 0),
        '/slow': (200, {}, b'\0' * 40960, 0.5),
        '/gone': (410, {}, b'', 0),
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{port}'
    server.shutdown()


@pytest.fixture()
def trust_127_0_0_1(monkeypatch):
    """Treat 127.0.0.1 (only) as public, so the local web server stands in for a public one."""
    real = fetch.is_public_address
    monkeypatch.setattr(fetch, 'is_public_address', lambda ip: str(ip) == '127.0.0.1' or real(ip))


def test_fetch_refuses_loopback_without_the_stand_in(web):
    with pytest.raises(fetch.UrlRefused, match='not a public address'):
        fetch.fetch_public(web + '/cat.png')
    for url in ('file:///etc/passwd', 'ftp://example.com/x', 'http://user:pw@example.com/x', 'http:///x'):
        with pytest.raises(fetch.UrlRefused):
            fetch.fetch_public(url)


def test_fetch_checks_every_redirect_and_the_limits(web, pictures, trust_127_0_0_1):
    assert fetch.fetch_public(web + '/cat.png') == pictures[0]
    with pytest.raises(fetch.UrlRefused, match='127.0.0.2, not a public address'):
        fetch.fetch_public(web + '/to-loopback')
    with pytest.raises(fetch.UrlRefused, match='169.254.169.254'):
        fetch.fetch_public(web + '/to-metadata')
    with pytest.raises(fetch.UrlRefused, match='redirects'):
        fetch.fetch_public(web + '/loop', max_redirects=2)
    with pytest.raises(fetch.UrlRefused, match='limit of 1,048,576'):
        fetch.fetch_public(web + '/big', max_bytes=1 << 20)
    start = time.monotonic()
    with pytest.raises(fetch.UrlRefused, match='longer than 1 s'):
        fetch.fetch_public(web + '/slow', timeout=1)
    assert time.monotonic() - start < 3
    with pytest.raises(fetch.UrlRefused, match='HTTP 410'):
        fetch.fetch_public(web + '/gone')


def test_image_urls_through_the_api(web, tiny_model, images, trust_127_0_0_1):
    settings = ServeSettings(allow_urls=True)
    with running(create_app(EmbeddingService(tiny_model, settings), settings)) as url:
        r = httpx.post(url + '/v1/embeddings', json={'input': [web + '/cat.png'], 'modality': 'image'})
        assert r.status_code == 200, r.text
        assert np.abs(np.float32(r.json()['data'][0]['embedding']) - tiny_model.encode_image([images[0]])[0].numpy()
                      ).max() < 1e-6
        err = error_of(httpx.post(url + '/v1/embeddings', json={'input': [web + '/cat.png', web + '/to-loopback'],
                                                                 'modality': 'image'}), 400)
        assert err['code'] == 'url_refused' and err['index'] == 1
        err = error_of(httpx.post(url + '/v1/embeddings', json={'input': ['http://[::1/'], 'modality': 'image'}), 400)
        assert err['code'] == 'url_refused' and 'not a valid URL' in err['message']
        err = error_of(httpx.post(url + '/v1/embeddings', json={'input': [web + '/cat.png'] * 17,
                                                                 'modality': 'image'}), 413)
        assert err['code'] == 'too_many_urls'


def test_request_parsing_is_plain_functions(settings):
    req = parse_embeddings(read_json(b'{"input": "x", "user": "ignored"}'), settings)
    assert req.items == ['x'] and req.modality == 'text' and req.encoding_format == 'float'
    with pytest.raises(ApiError) as e:
        parse_embeddings({'input': ['a', {'b': 1}]}, settings)
    assert e.value.status == 400 and e.value.index == 1
    with pytest.raises(ApiError):
        read_json(b'[' * 100000)
    with pytest.raises(ValueError, match='max_batch_size'):
        ServeSettings(max_batch_size=0)
    with pytest.raises(ValueError, match='replicas'):
        RayServeOptions(replicas=0)
    assert RayServeOptions(autoscale=(1, 4), gpus_per_replica=1).deployment_options()['autoscaling_config'] == {
        'min_replicas': 1, 'max_replicas': 4, 'initial_replicas': 1, 'target_ongoing_requests': 16.0}


def test_ray_serve_app_builder_for_config_files_and_kuberay(plugin_vit_dir):
    pytest.importorskip('ray.serve')
    from modelscope_cnclip.serve.server import app_builder
    app = app_builder({'model': str(plugin_vit_dir), 'precision': 'bf16', 'max_batch_size': 16,
                       'autoscale': [1, 3], 'gpus_per_replica': 1})
    deployment = app._bound_deployment
    assert deployment.name == 'cnclip' and deployment.ray_actor_options['num_gpus'] == 1
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(ValueError, match="unknown \\['replica'\\]"):
        app_builder({'model': 'x', 'replica': 2})
    with pytest.raises(ValueError, match='"model"'):
        app_builder({})


# --- the process: CLI, SIGTERM ---------------------------------------------------------------------------------------

def _start_cli(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, '-m', 'modelscope_cnclip', 'serve', str(model_dir), '--port', str(port),
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'CNCLIP_API_KEY': ''})
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, 'server did not become ready'
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + '/health', timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.1)


def test_slow_headers_and_silent_connections_are_closed(plugin_vit_dir):
    from modelscope_cnclip.serve.server import serve_local
    servers = []
    settings = ServeSettings(port=free_port(), read_timeout_s=1)
    thread = threading.Thread(target=serve_local, args=(ModelSpec(str(plugin_vit_dir)), settings),
                              kwargs={'ready': servers.append}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not servers:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    try:
        for first in (b'', b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n'):  # silent; headers never finished
            with socket.create_connection(('127.0.0.1', settings.port), timeout=10) as s:
                s.sendall(first)
                start = time.monotonic()
                assert s.recv(4096) == b'' and time.monotonic() - start < 5  # closed by the server
        r = httpx.post(f'http://127.0.0.1:{settings.port}/v1/embeddings', json={'input': ['猫']})
        assert r.status_code == 200
    finally:
        servers[0].should_exit = True
        thread.join(30)


def test_cli_refuses_bad_ports_and_ray_flags_without_ray(plugin_vit_dir):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, words in ((['--port', str(port)], 'cannot listen on 127.0.0.1'),
                            (['--port', '70000'], 'port=70000'), (['--replicas', '2'], 'apply to --engine ray')):
            r = subprocess.run([sys.executable, '-m', 'modelscope_cnclip', 'serve', str(plugin_vit_dir), *args],
                               capture_output=True, text=True, timeout=120, cwd=REPO)
            assert r.returncode == 2 and words in r.stderr, (args, r.stderr)


def test_cli_serves_and_sigterm_drains_in_flight_requests(plugin_vit_dir, tiny_model):
    proc, url = _start_cli(plugin_vit_dir, '--batch-wait-ms', '1500', '--host', '127.0.0.1')
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + '/v1/embeddings', json={'input': TEXTS[:2]}, timeout=30)
            time.sleep(0.5)  # the request now waits in the batcher
            proc.send_signal(signal.SIGTERM)
            r = pending.result()
        assert r.status_code == 200
        np.testing.assert_array_equal(np.float32([d['embedding'] for d in r.json()['data']]),
                                      tiny_model.encode_text(TEXTS[:2]).numpy())
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- Ray Serve  ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_serve_replicas(plugin_vit_dir, tiny_model):
    pytest.importorskip('ray.serve')
    from modelscope_cnclip.serve.server import serve_ray
    port = free_port()
    settings = ServeSettings(port=port, api_key='k')
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve_ray(ModelSpec(str(plugin_vit_dir)), settings, RayServeOptions(replicas=2, cpus_per_replica=0.5),
                      stop=stop)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            stop.set()
    thread = threading.Thread(target=run)
    thread.start()
    url, headers = f'http://127.0.0.1:{port}', {'Authorization': 'Bearer k'}
    try:
        deadline = time.monotonic() + 240
        while True:
            assert not errors, errors
            assert time.monotonic() < deadline, 'Ray Serve did not start'
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + '/health', timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        from ray import serve

        def running() -> int:
            app = serve.status().applications.get('cnclip')
            return app.deployments['cnclip'].replica_states.get('RUNNING', 0) if app else 0
        while running() < 2:  # both replicas up (each loads its own model; a busy machine takes a while)
            assert time.monotonic() < deadline, serve.status()
            time.sleep(0.5)
        expected = tiny_model.encode_text(TEXTS).numpy()
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: httpx.post(url + '/v1/embeddings', json={'input': [TEXTS[i % 8]]},
                                                    headers=headers, timeout=60), range(24)))
        for i, r in enumerate(rs):
            assert r.status_code == 200, r.text
            assert np.abs(np.float32(r.json()['data'][0]['embedding']) - expected[i % 8]).max() < 1e-5
        assert httpx.post(url + '/v1/embeddings', json={'input': 'x'}).status_code == 401
        assert error_of(httpx.post(url + '/v1/embeddings', content=b'{', headers=headers), 400)['code'] == \
            'invalid_json'
        assert running() == 2
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors
