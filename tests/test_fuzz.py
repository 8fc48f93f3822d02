"""Property-based tests (hypothesis) over everything that reads untrusted bytes or text: image decoding and
preprocessing, the tokenizer, the collection readers (jsonl / csv / tsv tables, official splits) and the server's
request parsing. Any input gives a valid result or the documented error, never a crash, a hang or another
exception. Bounded: a fixed number of examples each, derandomized, so CI time is fixed."""
from __future__ import annotations

import base64
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

hypothesis = pytest.importorskip('hypothesis')
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from modelscope_cnclip import get_tokenizer, load_image  # noqa: E402
from modelscope_cnclip.transform import image_transform  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOKENIZER = get_tokenizer()
TRANSFORM = image_transform(image_size=32)


def _encoded(fmt: str, mode: str = 'RGB', size: tuple[int, int] = (12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 'red' if mode == 'RGB' else 128).save(buf, fmt)
    return buf.getvalue()


SAMPLES = [_encoded('PNG'), _encoded('JPEG'), _encoded('GIF', 'L'), _encoded('WEBP'), _encoded('BMP'),
           _encoded('TIFF'), _encoded('PNG', 'I;16')]


@st.composite
def mangled_images(draw: st.DrawFn) -> bytes:
    """A real encoded image, then truncated, bit-flipped, spliced or padded."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    op = draw(st.sampled_from(['truncate', 'flip', 'splice', 'pad', 'header-only']))
    if op == 'truncate':
        del data[draw(st.integers(0, len(data) - 1)):]
    elif op == 'flip':
        for _ in range(draw(st.integers(1, 16))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif op == 'splice':
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=64))
    elif op == 'pad':
        data += draw(st.binary(max_size=256))
    else:
        data = data[:draw(st.integers(8, 40))]
    return bytes(data)


def _image_or_documented_error(data: bytes) -> None:
    try:
        img = load_image(data)
    except ValueError as e:
        assert str(e)  # a message, naming the input
        return
    assert isinstance(img, Image.Image) and img.size[0] > 0 and img.size[1] > 0
    pixels = TRANSFORM(img)
    assert pixels.shape == (3, 32, 32) and torch.isfinite(pixels).all()


@FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes_decode_or_raise_value_error(data):
    _image_or_documented_error(data)


@FUZZ
@given(mangled_images())
def test_damaged_images_decode_or_raise_value_error(data):
    _image_or_documented_error(data)


@FUZZ
@given(st.integers(0, 3), st.lists(st.integers(0, 40), min_size=0, max_size=4),
       st.sampled_from([np.uint8, np.uint16, np.float32, np.int64, np.bool_]))
def test_any_array_is_an_image_or_a_type_or_value_error(ndim, dims, dtype):
    shape = tuple((dims + [3, 3, 3, 3])[:ndim])
    arr = np.zeros(shape, dtype=dtype)
    try:
        pixels = TRANSFORM(arr)
    except (TypeError, ValueError) as e:
        assert str(e)
        return
    assert pixels.shape == (3, 32, 32)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_tokenizes_within_the_vocabulary_and_context(text):
    out = TOKENIZER(text)
    ids = out['input_ids']
    assert ids.shape[0] == 1 and 2 <= ids.shape[1] <= 52
    assert int(ids.min()) >= 0 and int(ids.max()) < TOKENIZER.vocab_size
    assert ids[0, 0] == 101 and int(out['attention_mask'].sum()) == TOKENIZER.num_tokens(text)[0]


@FUZZ
@given(st.lists(st.text(max_size=20), min_size=1, max_size=5))
def test_any_text_batch_tokenizes(texts):
    assert TOKENIZER(texts)['input_ids'].shape[0] == len(texts)


# --- collection readers ----------------------------------------------------------------------------------------------

TABLE_TEXT = st.text(alphabet=st.characters(blacklist_categories=('Cs',)), max_size=400)


def _read_table(suffix: str, content: bytes) -> None:
    from modelscope_cnclip.jobs.collection import open_collection
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f'table{suffix}'
        path.write_bytes(content)
        try:
            collection = open_collection(path)
        except (ValueError, FileNotFoundError) as e:
            assert str(e)
            return
        assert len(collection.items) > 0 and collection.modality in ('image', 'text', 'video')


@FUZZ
@given(st.sampled_from(['.jsonl', '.csv', '.tsv']), TABLE_TEXT)
def test_any_table_text_opens_or_raises_value_error(suffix, text):
    _read_table(suffix, text.encode('utf-8'))


@FUZZ
@given(st.sampled_from(['.jsonl', '.csv', '.tsv']), st.binary(max_size=400))
def test_any_table_bytes_open_or_raise_value_error(suffix, data):
    _read_table(suffix, data)


@FUZZ
@given(st.sampled_from(['.jsonl', '.csv']), st.lists(st.dictionaries(
    st.sampled_from(['id', 'image', 'text', 'video', 'path', 'caption', 'x']),
    st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12), st.booleans(),
              st.lists(st.integers(), max_size=2))), min_size=1, max_size=6))
def test_tables_of_odd_records_open_or_raise_value_error(suffix, rows):
    if suffix == '.jsonl':
        content = '\n'.join(json.dumps(r, ensure_ascii=False) for r in rows)
    else:
        keys = sorted({k for r in rows for k in r}) or ['x']
        content = '\n'.join([','.join(keys)] + [','.join(str(r.get(k, '')) for k in keys) for r in rows])
    _read_table(suffix, content.encode('utf-8'))


@FUZZ
@given(TABLE_TEXT, TABLE_TEXT)
def test_any_official_split_files_open_or_raise_value_error(tsv, jsonl):
    from modelscope_cnclip.data import OfficialSplit
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / 'valid_imgs.tsv').write_text(tsv, encoding='utf-8')
        (d / 'valid_texts.jsonl').write_text(jsonl, encoding='utf-8')
        try:
            split = OfficialSplit(d, 'valid')
            for t in split.texts:
                assert isinstance(t.text, str)
            for image_id in list(split.image_ids)[:3]:
                try:
                    load_image(split.image_bytes(image_id))
                except ValueError:
                    pass
        except (ValueError, FileNotFoundError, KeyError) as e:
            assert str(e)


# --- the server's request parsing ------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                                       max_size=4), max_leaves=12)
REQUEST = st.fixed_dictionaries({}, optional={
    'input': JSON | st.lists(st.text(max_size=40), max_size=5), 'model': JSON, 'encoding_format': JSON,
    'modality': st.sampled_from(['text', 'image']) | JSON, 'dimensions': JSON, 'image': JSON, 'texts': JSON,
    'text': JSON, 'images': JSON, 'query': JSON, 'top_k': JSON})


@FUZZ
@given(st.binary(max_size=300))
def test_any_body_bytes_parse_or_give_an_api_error(body):
    pytest.importorskip('fastapi')
    from modelscope_cnclip.serve.schema import ApiError, parse_embeddings, read_json
    from modelscope_cnclip.serve.settings import ServeSettings
    try:
        parse_embeddings(read_json(body), ServeSettings())
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message


@FUZZ
@given(REQUEST)
def test_any_json_request_parses_or_gives_an_api_error(request):
    from modelscope_cnclip.serve.schema import ApiError, parse_embeddings, parse_rank, parse_search
    from modelscope_cnclip.serve.settings import ServeSettings
    settings = ServeSettings(max_items=4)
    for parse in (parse_embeddings, parse_rank, parse_search):
        try:
            parse(request, settings)
        except ApiError as e:
            assert 400 <= e.status < 500 and e.message
            assert e.index is None or isinstance(e.index, int)
            json.dumps(e.to_dict())


@FUZZ
@given(st.text(max_size=200) | st.builds(lambda b: 'data:image/png;base64,' + base64.b64encode(b).decode(),
                                         st.binary(max_size=120)))
def test_any_image_string_gives_bytes_or_an_api_error(item):
    from modelscope_cnclip.serve.schema import ApiError
    from modelscope_cnclip.serve.service import image_bytes
    from modelscope_cnclip.serve.settings import ServeSettings
    try:
        data = image_bytes(item, 'input[0]', ServeSettings())
    except ApiError as e:
        assert 400 <= e.status < 500 and 'input[0]' in e.message
        return
    assert isinstance(data, bytes)
