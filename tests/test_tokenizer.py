"""Image inputs of every kind (including URLs from a local server), preprocessing semantics, tokenisation."""
import numpy as np
import pytest
import torch
from PIL import Image

from modelscope_cnclip import get_tokenizer, image_transform, load_image
from modelscope_cnclip.config import OPENAI_MEAN, OPENAI_STD


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


def test_tokenizer_reference_ids_truncation_and_padding():
    tok = get_tokenizer()
    assert tok('过年喜庆对联')['input_ids'].tolist() == [[101, 6814, 2399, 1599, 2412, 2190, 5468, 102]]
    long = '这是一段很长的中文文本' * 10
    out = tok([long, '猫'], padding='max_length')
    ids = out['input_ids']
    assert ids.shape == (2, 52) and ids[0, -1] == 102 and ids[0].ne(0).all()
    assert ids[1].tolist()[:3] == [101, 4344, 102] and ids[1, 3:].eq(0).all()
    assert torch.equal(out['attention_mask'], ids.ne(0).long())
    assert tok([long], context_length=77)['input_ids'].shape == (1, 77)
    assert tok(['猫', '小狗'])['input_ids'].shape == (2, 4)  # padded to the longest
    assert tok.tokenize('Hello世界') == ['hello', '世', '界']


def test_tokenizer_errors(tmp_path):
    tok = get_tokenizer()
    with pytest.raises(TypeError, match=r'text\[1\]: expected a str, got NoneType'):
        tok(['a', None])
    with pytest.raises(ValueError, match="padding='left'"):
        tok('a', padding='left')
    with pytest.raises(FileNotFoundError, match='vocab file .* not found'):
        get_tokenizer(tmp_path / 'vocab.txt')
    (tmp_path / 'vocab.txt').write_text('a\nb\n')
    with pytest.raises(ValueError, match='special tokens at unexpected ids'):
        get_tokenizer(tmp_path / 'vocab.txt')
