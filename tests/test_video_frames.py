"""video.py: decoded video frames are checked before they are embedded: narrow and rotated videos that decord
misdecodes are decoded with PyAV, and without PyAV a wrong shape is a VideoError naming the video and the shape,
through read_frames, encode_videos, the pipeline and `cnclip embed`."""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modelscope_cnclip.cli import main
from modelscope_cnclip.video import VideoError, _AVReader, encode_videos, read_frames, sample_indices

from helpers import SIZE, by_fps, coloured_video, index_of, uniform, write_video

NARROW = [16, 24, 48]  # widths decord 0.6 decodes as 6-, 4- and 4-channel arrays
HEIGHT = 32


def blocks(seed: int, width: int, height: int, n: int) -> list[np.ndarray]:
    """``n`` frames of random 8x8 colour blocks, a new pattern each frame (so frames tell each other apart) that
    survives lossy 4:2:0 coding."""
    rs = np.random.RandomState(seed)
    return [np.kron(rs.randint(0, 256, (height // 8, width // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
            for _ in range(n)]


def write_rotated(path: Path, frames: list[np.ndarray], degrees: int) -> Path:
    """An mp4 of ``(H, W, 3)`` frames with a display matrix rotating them ``degrees`` counter-clockwise."""
    import av
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('mpeg4', rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.bit_rate = 'yuv420p', 2_000_000
        stream.set_display_rotation(degrees)
        for arr in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format='rgb24')))
        container.mux(stream.encode())
    return path


def pyav_frames(path: Path) -> list[np.ndarray]:
    """Every frame as PyAV decodes it, turned as its rotation metadata says (the reference)."""
    import av
    with av.open(str(path)) as container:
        return [np.rot90(f.to_ndarray(format='rgb24'), f.rotation // 90) for f in container.decode(video=0)]


def pooled(model, frames: list[np.ndarray]) -> torch.Tensor:
    return F.normalize(model.encode_image([Image.fromarray(np.ascontiguousarray(f)) for f in frames]).mean(0), dim=0)


def close(got: np.ndarray, want: np.ndarray) -> bool:
    """The same picture through lossy coding (a wrong frame or garbage differs by ~85 grey levels)."""
    return got.shape == want.shape and float(np.abs(got.astype(np.float32) - want).mean()) < 12


# ---- real narrow and rotated videos ------------------------------------------------------------------------------

@pytest.mark.parametrize('width', NARROW)
def test_narrow_video_frames_are_rgb_at_their_size(av, tmp_path, width):
    source = blocks(width, width, HEIGHT, 12)
    path = write_video(tmp_path / f'w{width}.mp4', source)
    frames = read_frames(path, uniform(4))
    reference = pyav_frames(path)
    assert [(f.size, f.mode) for f in frames] == [((width, HEIGHT), 'RGB')] * 4
    for got, i in zip(frames, sample_indices(12, 10, uniform(4))):
        np.testing.assert_array_equal(np.asarray(got), reference[i])
        assert close(np.asarray(got), source[i])


@pytest.mark.parametrize('coded,degrees', [((48, 16), 90), ((48, 24), -90), ((16, 32), 180), ((64, 32), 90),
                                           ((64, 32), -90)])
def test_rotated_video_frames_are_shown_turned(av, tmp_path, coded, degrees):
    """48x16 turned 90 degrees is 16 px wide (decord misdecodes it, PyAV reads it); 64x32 decord reads itself,
    and both turn the frames the same way."""
    width, height = coded
    source = blocks(width + degrees % 360, width, height, 8)
    path = write_rotated(tmp_path / f'r{width}x{height}_{degrees}.mp4', source, degrees)
    frames = read_frames(path, uniform(4))
    shown = (height, width) if degrees % 180 else (width, height)
    assert [(f.size, f.mode) for f in frames] == [(shown, 'RGB')] * 4
    for got, i in zip(frames, sample_indices(8, 10, uniform(4))):
        assert close(np.asarray(got), np.rot90(source[i], degrees // 90))


def test_pyav_reader_reads_like_decord(av, tmp_path):
    import decord
    path = coloured_video(tmp_path / 'c.mp4', 30)
    for source in (str(path), path.read_bytes()):
        reader, theirs = _AVReader(av, source), decord.VideoReader(str(path))
        assert len(reader) == len(theirs) == 30 and reader.get_avg_fps() == theirs.get_avg_fps() == 10
        np.testing.assert_allclose(reader.get_frame_timestamp(np.arange(30)),
                                   theirs.get_frame_timestamp(np.arange(30)), atol=1e-6)
        batch = reader.get_batch([3, 17, 29])
        assert batch.shape == (3, SIZE[1], SIZE[0], 3) and batch.dtype == np.uint8
        assert [index_of(Image.fromarray(a)) for a in batch] == [3, 17, 29] == [index_of(Image.fromarray(reader[i]))
                                                                               for i in (3, 17, 29)]
    with pytest.raises(IndexError, match=r'frames \[30\] of 30 do not decode'):
        reader[30]


def test_narrow_videos_embed_their_frames(av, tmp_path, tiny_model):
    paths = [write_video(tmp_path / f'e{w}.mp4', blocks(w + 1, w, HEIGHT, 10)) for w in NARROW]
    paths.append(write_rotated(tmp_path / 'e_rot.mp4', blocks(99, 48, 16, 10), 90))
    got = encode_videos(tiny_model, paths, uniform(4), batch_size=6)
    assert got.failed == [] and got.embeddings.shape == (4, 32)
    for row, path in zip(got.embeddings, paths):
        reference = pyav_frames(path)
        assert reference[0].shape[1] in NARROW
        want = pooled(tiny_model, [reference[i] for i in sample_indices(10, 10, uniform(4))])
        assert torch.allclose(row, want, atol=1e-5)


def test_real_narrow_video_without_pyav_is_a_video_error(av, tmp_path, monkeypatch):
    import decord
    path = write_video(tmp_path / 'w16.mp4', blocks(1, 16, HEIGHT, 6))
    if decord.VideoReader(str(path))[0].shape == (HEIGHT, 16, 3):
        pytest.skip('this decord decodes 16 px wide frames right')
    monkeypatch.setitem(sys.modules, 'av', None)
    with pytest.raises(VideoError, match=rf"cannot read video '{re.escape(str(path))}': decord decodes its frames "
                                         rf"as \({HEIGHT}, 16, \d+\) uint8 arrays, not \(H, W, 3\) uint8 RGB"):
        read_frames(path)


# ---- a decoder returning a wrong shape (monkeypatched decord) ------------------------------------------------------

WRONG = {
    'rgba': (lambda a: np.concatenate([a, np.full((*a.shape[:-1], 1), 255, np.uint8)], -1), r'\(48, 64, 4\) uint8'),
    'six': (lambda a: np.concatenate([a, a], -1), r'\(48, 64, 6\) uint8'),
    'float': (lambda a: a.astype(np.float32) / 255, r'\(48, 64, 3\) float32'),
    'grey': (lambda a: a[..., 0], r'\(48, 64\) uint8'),
}


def misdecode(monkeypatch: pytest.MonkeyPatch, kind: str) -> str:
    """Make decord return every frame as ``WRONG[kind]`` makes it; returns the shape that should be reported."""
    import decord
    wrong, shape = WRONG[kind]
    get_batch, get_item = decord.VideoReader.get_batch, decord.VideoReader.__getitem__
    monkeypatch.setattr(decord.VideoReader, 'get_batch', lambda self, idx: wrong(get_batch(self, idx).asnumpy()))
    monkeypatch.setattr(decord.VideoReader, '__getitem__', lambda self, i: wrong(get_item(self, i).asnumpy()))
    return shape


@pytest.fixture(params=list(WRONG))
def misdecoded(av, request, monkeypatch) -> str:
    return misdecode(monkeypatch, request.param)


@pytest.fixture
def no_pyav(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, 'av', None)


def wrong_shape_error(path: Path, shape: str) -> str:
    return (rf"cannot read video '{re.escape(str(path))}': decord decodes its frames as {shape} arrays, not "
            r"\(H, W, 3\) uint8 RGB \(a decord bug with some frame widths, such as 16, 24 or 48 px\); install PyAV "
            r"to decode them instead: pip install av")


@pytest.fixture
def clip(av, tmp_path) -> Path:
    return coloured_video(tmp_path / 'clip.mp4', 30)  # 64x48


def test_wrong_shape_is_decoded_with_pyav(clip, misdecoded, caplog):
    with caplog.at_level(logging.INFO, logger='modelscope_cnclip.video'):
        frames = read_frames(clip)
        assert [index_of(f) for f in read_frames(clip, by_fps(sample_fps=2))] == list(range(0, 30, 5))
    assert [(f.size, f.mode) for f in frames] == [(SIZE, 'RGB')] * 8
    assert [index_of(f) for f in frames] == sample_indices(30, 10, uniform(8))
    assert re.search(rf"video '{re.escape(str(clip))}': decord decodes its frames as {misdecoded} arrays, not "
                     r"\(H, W, 3\) uint8 RGB; decoding it with PyAV instead", caplog.text)


def test_wrong_shape_without_pyav_is_a_video_error(clip, misdecoded, no_pyav):
    with pytest.raises(VideoError, match=wrong_shape_error(clip, misdecoded)):
        read_frames(clip)
    with pytest.raises(VideoError, match=r'cannot read video <\d+ bytes>: decord decodes its frames as '):
        read_frames(clip.read_bytes())


def test_encode_videos_falls_back_or_reports(clip, tiny_model, monkeypatch):
    want = pooled(tiny_model, [pyav_frames(clip)[i] for i in sample_indices(30, 10, uniform(8))])
    shape = misdecode(monkeypatch, 'rgba')
    got = encode_videos(tiny_model, [clip, clip])
    assert got.failed == [] and torch.allclose(got.embeddings, want.expand(2, -1), atol=1e-5)

    monkeypatch.setitem(sys.modules, 'av', None)
    vectors, failed = encode_videos(tiny_model, [clip], skip_errors=True)
    assert vectors.shape == (0, 32) and [(f.index, f.source) for f in failed] == [(0, repr(str(clip)))]
    assert re.fullmatch(wrong_shape_error(clip, shape), failed[0].reason)
    with pytest.raises(VideoError, match=r'video\[0\]: ' + wrong_shape_error(clip, shape)):
        encode_videos(tiny_model, clip)


# ---- the pipeline and `cnclip embed --modality video` ----------------------------------------------------------

def test_pipeline_video_input_with_a_wrong_shape(clip, tiny_pipe, monkeypatch):
    want = pooled(tiny_pipe.model.core, [pyav_frames(clip)[i] for i in sample_indices(30, 10, uniform(8))])
    shape = misdecode(monkeypatch, 'six')
    assert torch.allclose(tiny_pipe({'video': str(clip)})['video_embedding'], want[None], atol=1e-5)
    monkeypatch.setitem(sys.modules, 'av', None)
    with pytest.raises(VideoError, match=r'video\[0\]: ' + wrong_shape_error(clip, shape)):
        tiny_pipe({'video': str(clip)})


def test_cnclip_embed_lists_a_wrong_shape_in_errors_jsonl(av, tmp_path, plugin_vit_dir, monkeypatch, capsys):
    videos = tmp_path / 'videos'
    videos.mkdir()
    path = coloured_video(videos / 'a.mp4', 20)
    shape = misdecode(monkeypatch, 'rgba')

    def embed(out: str) -> dict:
        assert main(['embed', str(plugin_vit_dir), str(videos), '--out', str(tmp_path / out), '--modality', 'video',
                     '--num-frames', '4', '--no-progress']) == 0
        return json.loads(capsys.readouterr().out)

    report = embed('with_pyav')
    assert (report['embedded'], report['failed']) == (1, 0)
    monkeypatch.setitem(sys.modules, 'av', None)
    report = embed('without_pyav')
    assert (report['embedded'], report['failed']) == (0, 1)
    [error] = [json.loads(line) for line in (tmp_path / 'without_pyav' / 'errors.jsonl').read_text().splitlines()]
    assert error['id'] == 'a.mp4' and re.search(wrong_shape_error(path, shape), error['error'])
