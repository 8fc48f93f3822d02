"""transform.py: image inputs of every kind (including URLs from a local server), preprocessing semantics, and
inputs that are not plain 8-bit images: 16-bit and float images, tensors of pixels, empty images and decompression
bombs (the pixel limit), in the library, the pipeline, the CLI, zero-shot, search, training and embedding jobs."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from modelscope.trainers import build_trainer
from PIL import Image

import modelscope_cnclip
from modelscope_cnclip import image_transform, load_image
from modelscope_cnclip.cli import main
from modelscope_cnclip.config import OPENAI_MEAN, OPENAI_STD
from modelscope_cnclip.index import Index
from modelscope_cnclip.transform import MAX_PIXELS_ENV, set_max_image_pixels

from helpers import bomb_png

BOMB_ERROR = r'200,000,000 pixels is more than the limit of 89,478,485 .*set_max_image_pixels\(N\)'


@pytest.fixture()
def pixel_limit():
    """Restore PIL's pixel limit and the environment after a test that changes them."""
    before, env = Image.MAX_IMAGE_PIXELS, os.environ.get(MAX_PIXELS_ENV)
    yield
    Image.MAX_IMAGE_PIXELS = before
    if env is None:
        os.environ.pop(MAX_PIXELS_ENV, None)
    else:
        os.environ[MAX_PIXELS_ENV] = env


@pytest.fixture(scope='module')
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('bomb') / 'scan.png'
    path.write_bytes(bomb_png(20000, 10000))
    assert path.stat().st_size < 30_000
    return path


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b).min())


# --- every input kind, preprocessing --------------------------------------------------------------------------------

def test_every_input_kind_gives_identical_pixels(images, tmp_path, http_dir):
    root, url = http_dir
    img = images[0]
    img.save(tmp_path / 'a.png')
    img.save(root / 'a.png')
    t = image_transform(image_size=64)
    kinds = [img, str(tmp_path / 'a.png'), tmp_path / 'a.png', (tmp_path / 'a.png').read_bytes(),
             bytearray((tmp_path / 'a.png').read_bytes()), np.asarray(img), f'{url}/a.png']
    batch = t.batch(kinds)
    assert batch.shape == (len(kinds), 3, 64, 64)
    for row in batch:
        assert torch.equal(row, batch[0])
    assert torch.equal(t(img), batch[0])


def test_preprocessing_is_resize_then_convert_then_normalise():
    # A palette image resizes with NEAREST in its own mode, then converts: converting first would blend colours.
    p = Image.new('P', (4, 4))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1] * 8)
    t = image_transform(image_size=7)
    want = np.asarray(p.resize((7, 7), Image.Resampling.BICUBIC).convert('RGB'), dtype=np.float32) / 255
    want = (want - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
    got = t(p).permute(1, 2, 0).numpy()
    assert np.allclose(got, want, atol=1e-6)
    assert set(np.unique(np.asarray(p.resize((7, 7), Image.Resampling.BICUBIC)))) <= {0, 1}


def test_numpy_variants_and_errors():
    t = image_transform(image_size=16)
    gray = np.arange(100, dtype=np.uint8).reshape(10, 10)
    assert torch.equal(t(gray), t(gray[:, :, None]))
    assert t(np.zeros((5, 6, 4), np.uint8)).shape == (3, 16, 16)
    with pytest.raises(TypeError, match=r'expected dtype uint8.*astype\(np.uint8\)'):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r'expected HxW, HxWxC or CxHxW with C in \(1, 3, 4\)'):
        load_image(np.zeros((3, 8, 8), np.uint8).transpose(0, 1, 2).reshape(8, 8, 3)[:, :, :2])


def test_load_errors_name_the_input(tmp_path, http_dir):
    _, url = http_dir
    with pytest.raises(FileNotFoundError, match="image file 'nope.jpg' not found"):
        load_image('nope.jpg')
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    with pytest.raises(ValueError, match='cannot decode image .*broken.jpg'):
        load_image(tmp_path / 'broken.jpg')
    with pytest.raises(OSError, match=f'cannot download image {url}/missing.png'):
        load_image(f'{url}/missing.png')
    with pytest.raises(TypeError, match='unsupported image input dict'):
        load_image({'a': 1})


def test_empty_batch():
    assert image_transform(image_size=16).batch([]).shape == (0, 3, 16, 16)


# --- images whose range is not 0-255 ---------------------------------------------------------------------------------

def sixteen_bit_variants(gray8: np.ndarray, tmp_path: Path, noise: np.ndarray | None = None) -> dict:
    v16 = gray8.astype(np.uint16) * 257
    if noise is not None:
        v16 = np.clip(v16.astype(np.int64) + noise, 0, 65535).astype(np.uint16)
    Image.fromarray(v16).save(tmp_path / 'i16.png')  # Pillow writes (and reads back) I;16
    tiff = io.BytesIO()
    Image.fromarray(v16.astype(np.int32)).save(tiff, format='TIFF')  # a 32-bit integer image holding 16-bit values
    h, w = v16.shape
    return {'I;16 png': tmp_path / 'i16.png',
            'I;16B': Image.frombytes('I;16B', (w, h), v16.astype('>u2').tobytes()),
            'I tiff': tiff.getvalue(),
            'uint16 array': v16}


def test_16bit_images_are_scaled_to_8_bits_before_the_resize(tiny_model, photo, tmp_path):
    gray8 = photo[:, :, 0]
    Image.fromarray(gray8).save(tmp_path / 'l8.png')
    want = tiny_model.encode_image(tmp_path / 'l8.png')
    variants = sixteen_bit_variants(gray8, tmp_path)
    assert Image.open(variants['I;16 png']).mode == 'I;16' and Image.open(io.BytesIO(variants['I tiff'])).mode == 'I'
    for name, image in variants.items():
        got = tiny_model.encode_image(image)
        # v16 = v8 * 257 scales back exactly: the same pixels, the same embedding
        assert torch.equal(got, want), name
    # real 16-bit detail (not a multiple of 257) still embeds like the 8-bit picture
    noise = np.random.RandomState(0).randint(-128, 128, gray8.shape)
    for name, image in sixteen_bit_variants(gray8, tmp_path, noise).items():
        assert cosine(tiny_model.encode_image(image), want) >= 0.999, name


def test_8bit_data_in_mode_I_keeps_reference_behaviour(tiny_model, photo):
    img = Image.fromarray(photo[:, :, 1].astype(np.int32))  # mode I, values 0-255
    assert img.mode == 'I'
    reference = np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC).convert('RGB'))
    assert np.array_equal(tiny_model.transform.load(img), reference)


def test_float_and_out_of_range_images_are_refused_with_the_fix(tiny_model, photo):
    with pytest.raises(ValueError, match=r'img\[0\]: image .*mode F\) has no defined value range; convert it to 8 '
                                         r'bits first'):
        tiny_model.encode_image([Image.fromarray(photo[:, :, 0].astype(np.float32) / 255)])
    with pytest.raises(ValueError, match=r'mode I\) with values -5..300 has no 8- or 16-bit range'):
        load_image(Image.fromarray(np.array([[-5, 300]], np.int32)))
    with pytest.raises(TypeError, match=r'expected dtype uint8 \(0-255\) or uint16'):
        load_image(photo.astype(np.float32))


def test_16bit_images_in_zeroshot_and_the_pipeline(tiny_model, tiny_pipe, photo, tmp_path, capsys):
    gray8 = photo[:, :, 2]
    for cls in ('a', 'b'):
        (tmp_path / 'imgs' / cls).mkdir(parents=True)
    Image.fromarray(gray8).save(tmp_path / 'imgs' / 'a' / 'l8.png')
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / 'imgs' / 'b' / 'i16.png')
    from modelscope_cnclip.evaluation.zeroshot import evaluate_zeroshot
    res = evaluate_zeroshot(tiny_model, tmp_path / 'imgs', ['甲', '乙'], ['{}'])
    assert torch.equal(res['logits'][0], res['logits'][1])  # the same picture, 8 or 16 bits
    out = tiny_pipe({'img': [str(tmp_path / 'imgs' / 'a' / 'l8.png'), str(tmp_path / 'imgs' / 'b' / 'i16.png')]})
    assert torch.equal(out['img_embedding'][0], out['img_embedding'][1])


# --- tensors ---------------------------------------------------------------------------------------------------------

def test_uint8_tensors_are_images_like_the_same_numpy_array(tiny_model, photo):
    want = tiny_model.encode_image(photo)
    hwc = torch.from_numpy(photo)
    chw = hwc.permute(2, 0, 1)
    for name, image in {'HWC tensor': hwc, 'CHW tensor': chw, 'CHW contiguous': chw.contiguous(),
                        'CHW array': photo.transpose(2, 0, 1), 'list of tensors': [hwc]}.items():
        assert torch.equal(tiny_model.encode_image(image), want), name
    other = np.ascontiguousarray(photo[::-1])
    want2 = tiny_model.encode_image([photo, other])
    for name, batch in {'NHWC tensor (decord)': torch.stack([hwc, torch.from_numpy(other)]),
                        'NCHW tensor (torchvision.io)': torch.stack([chw, torch.from_numpy(other).permute(2, 0, 1)]),
                        'NHWC array': np.stack([photo, other]), 'list': [hwc, torch.from_numpy(other)]}.items():
        assert torch.equal(tiny_model.encode_image(batch), want2), name
    gray = torch.from_numpy(photo[:, :, 0].copy())
    assert torch.equal(tiny_model.encode_image(gray), tiny_model.encode_image(photo[:, :, 0]))


def test_uint8_tensors_through_the_pipeline(tiny_model, tiny_pipe, photo):
    chw = torch.from_numpy(photo).permute(2, 0, 1)
    assert torch.equal(tiny_pipe({'img': chw})['img_embedding'], tiny_model.encode_image(photo))
    assert torch.equal(tiny_pipe.forward({'img': chw[None]})['img_embedding'], tiny_model.encode_image(photo))


def test_float_pixels_must_have_the_models_shape(tiny_model, photo):
    pixels = tiny_model.transform.batch([photo])
    assert torch.equal(tiny_model.encode_image(pixels), tiny_model.encode_image(photo))
    for bad in (torch.zeros(1, 3, 32, 32), torch.zeros(2, 64, 64, 3), torch.zeros(64, 64), torch.zeros(1, 1, 64, 64)):
        with pytest.raises(ValueError, match=r'img: a pixel tensor must be \(N, 3, 64, 64\) for this model \(image '
                                             r'size 64\), got'):
            tiny_model.encode_image(bad)
    with pytest.raises(ValueError, match='NaN or infinite'):
        tiny_model.encode_image(torch.full((1, 3, 64, 64), float('nan')))
    with pytest.raises(TypeError, match=r'img\[0\]: image tensor .*int64.*only as uint8 \(or uint16\) pixels'):
        tiny_model.encode_image(torch.zeros(64, 64, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r'img\[0\]: image tensor .*float32.*given directly as the image batch'):
        tiny_model.encode_image([pixels[0]])


def test_raw_pixels_get_a_warning_normalised_ones_do_not(tiny_model, photo):
    pixels = tiny_model.transform.batch([photo])
    raw = torch.from_numpy(tiny_model.transform.load(photo).copy()).permute(2, 0, 1)[None].float()  # 0-255
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        tiny_model.encode_image(pixels)
    with pytest.warns(UserWarning, match=r'looks like raw \[0, 255\] pixels.*model.transform'):
        tiny_model.encode_image(raw)
    with pytest.warns(UserWarning, match=r'looks like raw \[0, 1\] pixels'):
        tiny_model.encode_image(raw / 255)


# --- decompression bombs and huge scans -------------------------------------------------------------------------------

def test_bomb_is_a_per_input_error_in_the_api(tiny_model, photo, bomb, tmp_path, http_dir):
    root, url = http_dir
    Image.fromarray(photo).save(tmp_path / 'ok.png')
    for image in (bomb, str(bomb), bomb.read_bytes()):
        with pytest.raises(ValueError, match=r'img\[1\]: cannot decode image .*' + BOMB_ERROR):
            tiny_model.encode_image([tmp_path / 'ok.png', image])
    (root / 'scan.png').write_bytes(bomb.read_bytes())
    with pytest.raises(ValueError, match=r'img\[0\]: cannot decode image http.*' + BOMB_ERROR):
        tiny_model.encode_image(f'{url}/scan.png')
    # between PIL's limit and twice it PIL only warns; here it is refused like any other too-large image
    (tmp_path / 'big.png').write_bytes(bomb_png(10000, 10000))
    with pytest.raises(ValueError, match=r'img\[0\]: .*10000x10000 = 100,000,000 pixels is more than the limit'):
        tiny_model.encode_image(tmp_path / 'big.png')


def test_bomb_in_the_pipeline(tiny_pipe, photo, bomb):
    with pytest.raises(ValueError, match=r'img\[1\]: cannot decode image .*' + BOMB_ERROR):
        tiny_pipe({'img': [photo, str(bomb)]})


def test_pixel_limit_is_configurable(tiny_model, tmp_path, pixel_limit):
    Image.new('RGB', (40, 40), 'red').save(tmp_path / 'small.png')
    modelscope_cnclip.set_max_image_pixels(1000)  # the name the error message gives
    assert os.environ[MAX_PIXELS_ENV] == '1000'
    with pytest.raises(ValueError, match=r'40x40 = 1,600 pixels is more than the limit of 1,000'):
        tiny_model.encode_image(tmp_path / 'small.png')
    set_max_image_pixels(None)
    assert tiny_model.encode_image(tmp_path / 'small.png').shape == (1, 32)
    with pytest.raises(ValueError, match=r"max_image_pixels='lots': expected a number of pixels"):
        set_max_image_pixels('lots')


def test_pixel_limit_from_the_environment_and_the_cli(plugin_vit_dir, tmp_path, pixel_limit, capsys):
    Image.new('RGB', (40, 40), 'red').save(tmp_path / 'small.png')
    code = ('from modelscope_cnclip.transform import load_image\n'
            f'load_image({str(tmp_path / "small.png")!r})')
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={**os.environ, MAX_PIXELS_ENV: '1000'})
    assert run.returncode == 1 and 'more than the limit of 1,000' in run.stderr
    assert main(['--max-image-pixels', '1000', 'similarity', str(plugin_vit_dir), str(tmp_path / 'small.png'),
                 '猫']) == 2
    err = capsys.readouterr().err
    assert 'cnclip similarity: error: img[0]: cannot decode image' in err and 'limit of 1,000' in err


def test_bomb_skipped_and_reported_by_zeroshot(plugin_vit_dir, photo, bomb, tmp_path, capsys):
    for cls in ('a', 'b'):
        (tmp_path / 'imgs' / cls).mkdir(parents=True)
        Image.fromarray(photo).save(tmp_path / 'imgs' / cls / 'ok.png')
    (tmp_path / 'imgs' / 'b' / 'scan.png').write_bytes(bomb.read_bytes())
    (tmp_path / 'labels.txt').write_text('甲\n乙\n', encoding='utf-8')
    args = ['zeroshot', str(plugin_vit_dir), '--images', str(tmp_path / 'imgs'), '--labels',
            str(tmp_path / 'labels.txt'), '--templates', 'openai']
    assert main(args) == 2
    assert 'scan.png: unreadable image' in capsys.readouterr().err
    assert main(args + ['--skip-errors']) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)['n_skipped'] == 1 and json.loads(captured.out)['n_images'] == 2


def test_bomb_query_in_search_is_a_clear_error(plugin_vit_dir, tiny_model, photo, bomb, tmp_path, capsys):
    meta = {'model': tiny_model.info()}
    Index.from_arrays(['a'], tiny_model.encode_image(photo).numpy(), meta=meta).save(tmp_path / 'idx')
    assert main(['search', str(tmp_path / 'idx'), str(bomb)]) == 2
    err = capsys.readouterr().err
    assert 'cnclip search: error: img[0]: cannot decode image' in err and '200,000,000 pixels' in err


def test_bomb_skipped_by_training_with_skip_errors(plugin_vit_dir, photo, bomb, tmp_path):
    Image.fromarray(photo).save(tmp_path / 'ok.png')
    lines = [{'image': 'ok.png', 'text': '图'}, {'image': str(bomb), 'text': '扫描', 'id': 'scan'}] * 4
    (tmp_path / 'train.jsonl').write_text('\n'.join(json.dumps(x, ensure_ascii=False) for x in lines))
    overrides = {'train': {'max_epochs': 1, 'dataloader': {'batch_size_per_gpu': 4, 'workers_per_gpu': 0}}}
    kw = dict(model=str(plugin_vit_dir), work_dir=str(tmp_path / 'w'), train_dataset=str(tmp_path / 'train.jsonl'),
              cfg_overrides=overrides)
    with pytest.raises(ValueError, match=r"image 'scan': cannot decode image .*200,000,000 pixels.*skip_errors"):
        build_trainer('cnclip-trainer', kw).train()
    trainer = build_trainer('cnclip-trainer', dict(kw, skip_errors=True))
    trainer.train()
    assert trainer.train_pairs.skipped == ['scan']


def test_bomb_listed_by_embedding_jobs(plugin_vit_dir, photo, bomb, tmp_path, capsys):
    (tmp_path / 'photos').mkdir()
    Image.fromarray(photo).save(tmp_path / 'photos' / 'ok.png')
    (tmp_path / 'photos' / 'scan.png').write_bytes(bomb.read_bytes())
    assert main(['embed', str(plugin_vit_dir), str(tmp_path / 'photos'), '--out', str(tmp_path / 'emb'),
                 '--no-progress']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['embedded'] == 1 and report['failed'] == 1
    error = json.loads((tmp_path / 'emb' / 'errors.jsonl').read_text().splitlines()[0])
    assert error['id'] == 'scan.png' and '200,000,000 pixels' in error['error']


def test_transform_alone_refuses_bombs(bomb):
    with pytest.raises(ValueError, match=BOMB_ERROR):
        image_transform(image_size=16)(bomb)


def test_empty_images_lazy_bombs_and_uint16_tensors(tiny_model, photo, bomb):
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((5, 0), np.uint8), Image.new('RGB', (0, 4))):
        with pytest.raises(ValueError, match=r'img\[0\]: image .*an empty image has no pixels to embed'):
            tiny_model.encode_image([empty])
    # an image the user opened but PIL has not decoded yet is checked before it is decoded
    with pytest.raises(ValueError, match=r'img\[0\]: .*20000x10000 = 200,000,000 pixels is more than the limit'):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS  # let PIL open it; our check still holds
            try:
                lazy = Image.open(bomb)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
        tiny_model.encode_image([lazy])
    gray8 = photo[:, :, 0]
    if hasattr(torch, 'uint16'):
        v16 = torch.from_numpy(gray8.astype(np.int32) * 257).to(torch.uint16)
        assert torch.equal(tiny_model.encode_image(v16), tiny_model.encode_image(gray8))




def test_formats_that_run_external_programs_are_never_opened(tmp_path):
    """EPS is decoded by running Ghostscript on the file: whoever sends one would run PostScript on the host."""
    eps = b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n'
    with pytest.raises(ValueError, match='not an image format that PIL reads'):
        load_image(eps)
    (tmp_path / 'x.eps').write_bytes(eps)
    with pytest.raises(ValueError, match='not an image format'):
        load_image(tmp_path / 'x.eps')
