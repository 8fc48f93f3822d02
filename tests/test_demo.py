"""demo/: the notebook pictures (render.py), the app's functions (Demo), gallery indexes, the Gradio app through
gradio_client and in a real browser (headless Chromium from Debian, driven by Playwright) with the model trained in
the test suite, the ModelScope studio example, and examples/quickstart.ipynb executed by a Jupyter kernel."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from modelscope_cnclip.data import COLORS, PLACES, SHAPES, draw_scene
from modelscope_cnclip.demo import heatmap, hits_grid, show_hits
from modelscope_cnclip.demo.app import Demo, DemoInputError, gallery_index, split_labels
from modelscope_cnclip.index import Hit, Index

from helpers import REPO, bomb_png

SCREENSHOTS = os.environ.get('CNCLIP_SCREENSHOTS')  # also save the browser screenshots there (docs/screenshots)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def shapes_gallery(tmp_path_factory) -> Path:
    """Every scene of the generated dataset, one file each, named after it (e.g. 红色的圆形_左边.png)."""
    d = tmp_path_factory.mktemp('gallery')
    for i, (color, shape, place) in enumerate((c, s, p) for c in COLORS for s in SHAPES for p in PLACES):
        draw_scene(color, shape, place, seed=i).save(d / f'{color}的{shape}_{place}.png')
    return d


@pytest.fixture()
def not_an_image(tmp_path) -> Path:
    path = tmp_path / 'notes.png'
    path.write_text('this is not a picture')
    return path


# --- pictures -------------------------------------------------------------------------------------------------------

def test_hits_grid_and_heatmap(images, photo):
    grid = hits_grid([*images, photo, '/nowhere.png'], ['a · 0.9', 'b · 0.8', 'c · 0.7', '红色的圆形 · 0.6', 'x'],
                     columns=3, side=80)
    assert isinstance(grid, Image.Image) and grid.size[0] > 3 * 80 and grid.size[1] > 2 * 80
    hits = [Hit('a', images_path := '/nowhere/a.png', 0.9, 1), Hit('b', images_path, 0.5, 2)]
    assert show_hits(hits, columns=2).size == show_hits([h.to_dict() for h in hits], columns=2).size
    probs = np.array([[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]])
    hm = heatmap(probs, images, ['猫', '狗'], title='t')
    assert isinstance(hm, Image.Image) and hm.size[0] > 2 * 96
    assert np.asarray(hm).std() > 10  # drawn, not blank
    with pytest.raises(ValueError, match='3 images x 3 texts'):
        heatmap(probs, images, ['a', 'b', 'c'])
    with pytest.raises(ValueError, match='captions'):
        hits_grid(images, ['a'])
    with pytest.raises(ValueError, match='more than 10000 cells'):
        heatmap(np.zeros((3, 4000)), images, ['t'] * 4000)


def test_split_labels():
    assert split_labels('猫, 狗，汽车、花;\n山\n\n猫') == ['猫', '狗', '汽车', '花', '山']
    assert split_labels('') == []


# --- the app's functions ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def demo(tiny_model, shapes_gallery, tmp_path_factory) -> Demo:
    return Demo(tiny_model, gallery_index(tiny_model, shapes_gallery, cache_dir=tmp_path_factory.mktemp('cache')))


def test_demo_functions(demo, shapes_gallery, images):
    hits = demo.search_text('红色的圆形', 5)
    assert len(hits) == 5 and all(isinstance(img, Image.Image) and ' · ' in caption for img, caption in hits)
    first = next(shapes_gallery.iterdir())
    assert demo.search_image(str(first), 1)[0][1].startswith(first.stem)  # an image finds itself
    probs = demo.classify(str(first), '猫, 狗, 汽车', '一张{}的照片')
    assert list(probs) == ['猫', '狗', '汽车'] and abs(sum(probs.values()) - 1) < 1e-5
    files = [str(p) for p in sorted(shapes_gallery.iterdir())[:3]]
    picture, table = demo.score(files, '猫\n狗')
    assert isinstance(picture, Image.Image) and table['headers'] == ['image', '猫', '狗']
    assert len(table['data']) == 3 and abs(sum(table['data'][0][1:]) - 1) < 1e-3


@pytest.mark.parametrize('call,message', [
    (lambda d, bad: d.search_text('   ', 5), '请输入查询文字'),
    (lambda d, bad: d.search_image(None, 5), '请上传图片'),
    (lambda d, bad: d.search_image(str(bad), 5), 'notes.png'),
    (lambda d, bad: d.classify(str(bad), '猫, 狗'), 'not an image format'),
    (lambda d, bad: d.classify(None, '猫, 狗'), '请上传图片'),
    (lambda d, bad: d.classify(str(bad).replace('notes', 'bomb'), '猫, 狗'), 'decompression bombs'),
    (lambda d, bad: d.classify(str(next(iter(Path(bad).parent.glob('*.jpg')))), '猫'), 'at least two labels'),
    (lambda d, bad: d.classify(str(next(iter(Path(bad).parent.glob('*.jpg')))), '猫, 狗', 'a photo'),
     'needs {}'),
    (lambda d, bad: d.score([], '猫'), '请上传图片'),
    (lambda d, bad: d.score([str(bad)], '猫'), 'notes.png'),
    (lambda d, bad: d.score([str(next(iter(Path(bad).parent.glob('*.jpg'))))], ' \n '), '请输入文字'),
    (lambda d, bad: d.score([str(next(iter(Path(bad).parent.glob('*.jpg'))))], '\n'.join(map(str, range(51)))),
     'at most 50 texts'),
    (lambda d, bad: d.classify(str(next(iter(Path(bad).parent.glob('*.jpg')))), ','.join(map(str, range(51)))),
     'at most 50 labels'),
])
def test_bad_input_gets_a_message(demo, not_an_image, call, message):
    (not_an_image.parent / 'bomb.png').write_bytes(bomb_png())
    draw_scene('红色', '圆形').save(not_an_image.parent / 'ok.jpg')
    with pytest.raises(DemoInputError, match=message.replace('{', r'\{').replace('}', r'\}')) as e:
        call(demo, not_an_image)
    assert str(not_an_image.parent) not in str(e.value)  # the server's temp paths stay hidden


def test_an_exported_model_runs_the_demo(plugin_vit_dir, shapes_gallery, tmp_path, tiny_model):
    pytest.importorskip('onnxruntime')
    from modelscope_cnclip import load
    from modelscope_cnclip.deploy import export
    exported = load(export(plugin_vit_dir, tmp_path / 'onnx').out)
    index = gallery_index(tiny_model, shapes_gallery, cache_dir=tmp_path / 'cache')  # built with the torch model
    ours = Demo(exported, index).search_text('红色的圆形', 3)
    assert [c for _, c in ours] == [c for _, c in Demo(tiny_model, index).search_text('红色的圆形', 3)]


def test_search_without_a_gallery(tiny_model):
    with pytest.raises(DemoInputError, match='--gallery'):
        Demo(tiny_model).search_text('猫')


def test_gallery_index_is_built_once_and_rebuilt_when_photos_change(tiny_model, tmp_path, monkeypatch):
    import modelscope_cnclip.jobs as jobs
    gallery = tmp_path / 'photos'
    gallery.mkdir()
    for i in range(3):
        draw_scene('蓝色', '正方形', seed=i).save(gallery / f'{i}.png')
    calls = []
    real = jobs.embed_collection
    monkeypatch.setattr(jobs, 'embed_collection', lambda *a, **k: calls.append(1) or real(*a, **k))
    first = gallery_index(tiny_model, gallery, cache_dir=tmp_path / 'cache')
    again = gallery_index(tiny_model, gallery, cache_dir=tmp_path / 'cache')
    assert len(first) == len(again) == 3 and len(calls) == 1
    draw_scene('红色', '圆形').save(gallery / 'new.png')
    assert len(gallery_index(tiny_model, gallery, cache_dir=tmp_path / 'cache')) == 4 and len(calls) == 2
    assert not any(p.name.startswith('.') for p in gallery.iterdir())  # nothing written into the gallery
    with pytest.raises(FileNotFoundError, match='not a folder'):
        gallery_index(tiny_model, tmp_path / 'missing')


def test_gallery_from_another_model_is_refused(tiny_model, tmp_path, images):
    index = Index.from_arrays(['a'], tiny_model.encode_image(images[:1]).numpy(),
                              meta={'model': {**tiny_model.info(), 'fingerprint': '0' * 16}})
    with pytest.raises(ValueError):
        Demo(tiny_model, index)


# --- the Gradio app -------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained_demo(trained, train_root, shapes_gallery, tmp_path_factory) -> Iterator[str]:
    """The app with the model trained in the test suite and the shapes gallery, on 127.0.0.1; yields its URL."""
    pytest.importorskip('gradio')
    from modelscope_cnclip import load
    from modelscope_cnclip.demo.app import build_demo
    model = load(train_root / 'work' / 'output')
    index = gallery_index(model, shapes_gallery, cache_dir=tmp_path_factory.mktemp('cache'))
    app = build_demo(model, index, top_k=6, labels='红色的圆形, 蓝色的正方形, 绿色的三角形', template='{}')
    port = free_port()
    app.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f'http://127.0.0.1:{port}/'
    finally:
        app.close()


@pytest.mark.slow
def test_app_api_through_gradio_client(trained_demo, shapes_gallery, not_an_image):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    client = Client(trained_demo, verbose=False)
    results = client.predict('红色的圆形', 3, api_name='/search_text')
    assert results[0]['caption'].startswith('红色的圆形'), results
    red = shapes_gallery / '红色的圆形_左边.png'
    label = client.predict(handle_file(str(red)), '红色的圆形, 蓝色的正方形, 绿色的三角形', '{}', api_name='/classify')
    assert label['label'] == '红色的圆形', label
    with pytest.raises(AppError, match='notes.png'):
        client.predict(handle_file(str(not_an_image)), '猫, 狗', '{}', api_name='/classify')
    with pytest.raises(AppError, match='请输入查询文字'):
        client.predict('', 3, api_name='/search_text')


def _chromium() -> str:
    path = shutil.which('chromium') or shutil.which('chromium-browser')
    if path is None:
        pytest.skip('headless Chromium is not installed (apt-get install chromium fonts-noto-cjk)')
    pytest.importorskip('playwright')
    return path


def _shot(page: Any, tmp_path: Path, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(tmp_path / f'{name}.png'), full_page=full_page)
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / f'{name}.png', Path(SCREENSHOTS) / f'{name}.png')


@pytest.mark.slow
def test_app_in_a_real_browser(trained_demo, shapes_gallery, not_an_image, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    executable = _chromium()
    expect.set_options(timeout=60_000)  # a slow CI machine runs the model and the browser on the same 2 cores
    red = shapes_gallery / '红色的圆形_右边.png'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=['--no-sandbox'])
        page = browser.new_page(viewport={'width': 1280, 'height': 900})
        page.set_default_timeout(60_000)
        page.goto(trained_demo)
        # text -> image
        page.locator('#query textarea').fill('红色的圆形')
        page.locator('#search-button').click()
        first = page.locator('#text-results .caption-label, #text-results [class*="caption"]').first
        expect(first).to_contain_text('红色的圆形')
        _shot(page, tmp_path, 'text-search')
        # image -> image
        page.get_by_role('tab', name='图搜图').click()
        page.locator('#query-image input[type=file]').set_input_files(str(red))
        page.locator('#image-search-button').click()
        expect(page.locator('#image-results .caption-label, #image-results [class*="caption"]').first
               ).to_contain_text('红色的圆形_右边')
        _shot(page, tmp_path, 'image-search')
        # zero-shot
        page.get_by_role('tab', name='零样本分类').click()
        page.locator('#zs-image input[type=file]').set_input_files(str(red))
        page.locator('#zs-button').click()
        expect(page.locator('#zs-result h2, #zs-result .output-class').first).to_contain_text('红色的圆形')
        _shot(page, tmp_path, 'zeroshot')
        # a non-image: a readable message, no stack trace
        page.get_by_role('tab', name='图文打分').click()
        page.locator('#score-images input[type=file]').set_input_files([str(red), str(not_an_image)])
        page.locator('#score-button').click()
        toast = page.locator('.toast-body, [data-testid="toast-body"]').first
        expect(toast).to_contain_text('notes.png')
        expect(toast).to_be_visible()
        page.wait_for_timeout(1000)  # the toast slides in
        assert 'Traceback' not in page.content()
        _shot(page, tmp_path, 'bad-upload', full_page=False)
        # images x texts, on a fresh page
        page.reload()
        page.get_by_role('tab', name='图文打分').click()
        page.locator('#score-images input[type=file]').set_input_files(
            [str(red), str(shapes_gallery / '蓝色的正方形_左边.png'), str(shapes_gallery / '绿色的三角形_右边.png')])
        page.locator('#score-texts textarea').fill('红色的圆形\n蓝色的正方形\n绿色的三角形')
        page.locator('#score-button').click()
        expect(page.locator("#score-heatmap img")).to_be_visible()
        _shot(page, tmp_path, 'score')
        browser.close()
    for name in ('text-search', 'image-search', 'zeroshot', 'bad-upload', 'score'):
        assert (tmp_path / f'{name}.png').stat().st_size > 10_000


def test_cnclip_demo_command_serves_a_gallery(plugin_vit_dir, shapes_gallery, tmp_path):
    pytest.importorskip('gradio')
    import subprocess
    import time
    import urllib.request
    port = free_port()
    cmd = [sys.executable, '-m', 'modelscope_cnclip', 'demo', str(plugin_vit_dir), '--gallery', str(shapes_gallery),
           '--cache', str(tmp_path / 'cache'), '--port', str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'GRADIO_ANALYTICS_ENABLED': 'False'})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, 'the demo did not start'
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=2) as r:
                    if r.status == 200 and 'Chinese CLIP' in r.read().decode('utf-8', 'replace'):
                        break
            time.sleep(0.3)
        assert (tmp_path / 'cache' / 'galleries').is_dir()
    finally:
        proc.terminate()
        proc.wait(30)
    r = subprocess.run(cmd[:7] + ['--index', 'x'], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'exclude each other' in r.stderr
    r = subprocess.run(cmd[:5] + ['--index', str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'not an index dir' in r.stderr


# --- the studio example and the notebook -----------------------------------------------------------------------------

def test_studio_example_builds_the_app(plugin_vit_dir, shapes_gallery, tmp_path, monkeypatch):
    pytest.importorskip('gradio')
    import runpy
    studio = tmp_path / 'studio'
    shutil.copytree(REPO / 'examples' / 'studio', studio)
    monkeypatch.setenv('CNCLIP_MODEL', str(plugin_vit_dir))
    monkeypatch.setenv('CNCLIP_GALLERY', str(shapes_gallery))
    namespace = runpy.run_path(str(studio / 'app.py'))  # not __main__: builds, does not launch
    assert len(namespace['index']) == 36 and type(namespace['demo']).__name__ == 'Blocks'
    assert (studio / '.cache').is_dir() and not any(p.name == '.cache' for p in shapes_gallery.iterdir())


@pytest.mark.slow
def test_quickstart_notebook_runs_end_to_end(trained, train_root, tmp_path):
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    pytest.importorskip('ipykernel')
    nb = nbformat.read(REPO / 'examples' / 'quickstart.ipynb', as_version=4)
    env = {'CNCLIP_MODEL': str(train_root / 'work' / 'output')}
    with _env(env):
        nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                                resources={'metadata': {'path': str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    text = ''.join(o.get('text', '') + str(o.get('data', {}).get('text/plain', '')) for o in outputs)
    assert 'top hit: 红色的圆形' in text and '(6, ' in text
    assert sum('image/png' in o.get('data', {}) for o in outputs) == 3  # heat map and two grids, inline


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_importing_the_library_does_not_load_gradio():
    import subprocess
    out = subprocess.run([sys.executable, '-c', 'import modelscope_cnclip, modelscope_cnclip.demo, sys; '
                          'print("gradio" in sys.modules)'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == 'False', out.stderr
