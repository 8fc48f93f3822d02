"""video.py: frame sampling, decoding (with decord) of generated videos, pooling, the pipeline's video input.
Decoded frames checked (narrow, rotated, misdecoded videos): test_video_frames.py; sampling by time:
test_video_timing.py."""
from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modelscope_cnclip.jobs.collection import VIDEO_EXTENSIONS
from modelscope_cnclip.video import (
    EncodedVideos,
    FrameSampling,
    VideoError,
    VideoFailure,
    _decode,
    encode_videos,
    pool_frames,
    read_frames,
    sample_indices,
)

from helpers import SIZE, by_fps, coloured_video, index_of, textured, uniform, write_video

# ---- sample_indices: a pure function ----------------------------------------------------------------------------

def test_uniform_takes_segment_centres_exhaustively():
    for n in range(1, 70):
        for num in range(1, 13):
            idx = sample_indices(n, 25.0, uniform(num))
            assert idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < n
            assert len(idx) == min(n, num)
            if n <= num:
                assert idx == list(range(n))  # a short video: each frame once, no duplicates
                continue
            for i, j in enumerate(idx):  # frame j shows the centre time of segment i of num equal segments
                assert j <= (i + 0.5) * n / num < j + 1
                assert abs(idx[i] + idx[num - 1 - i] - (n - 1)) <= 1  # symmetric about the middle
            if n > 2 * num:
                assert idx[0] > 0 and idx[-1] < n - 1  # first and last frames deliberately left out


def test_uniform_examples_and_fps_is_not_read():
    assert sample_indices(20, 10.0, uniform(8)) == [1, 3, 6, 8, 11, 13, 16, 18]
    assert sample_indices(11, 10.0, uniform(8)) == [0, 2, 3, 4, 6, 7, 8, 10]
    assert sample_indices(1, 10.0, uniform(8)) == [0]
    assert sample_indices(100, 0.0, uniform(1)) == [50] == sample_indices(100, float('nan'), uniform(1))


def test_fps_mode_samples_by_time():
    assert sample_indices(20, 10, by_fps()) == [0, 10]  # t = 0 s, 1 s; 2 s is the end
    assert sample_indices(25, 10, by_fps()) == [0, 10, 20]
    assert sample_indices(300, 29.97, by_fps()) == [math.floor(k * 29.97) for k in range(11)]
    assert sample_indices(20, 10, by_fps(sample_fps=25)) == list(range(20))  # faster than the video
    assert sample_indices(3, 30, by_fps(sample_fps=0.1)) == [0]
    assert sample_indices(300, 30, by_fps(sample_fps=2, max_frames=4)) == [30, 105, 180, 255]
    assert sample_indices(300, 30, by_fps(sample_fps=2, max_frames=100)) == list(range(0, 300, 15))


@pytest.mark.parametrize('fps', [5, 10, 24, 25, 29.97, 30, 59.94])
@pytest.mark.parametrize('sample_fps', [0.5, 1, 2.5, 7, 30, 100])
def test_fps_mode_exhaustively(fps, sample_fps):
    for n in range(1, 80):
        idx = sample_indices(n, fps, by_fps(sample_fps=sample_fps))
        assert idx[0] == 0 and idx == sorted(set(idx)) and idx[-1] < n
        if sample_fps >= fps:
            assert idx == list(range(n))
            continue
        assert idx == [math.floor(k * fps / sample_fps + 1e-6) for k in range(len(idx))]
        assert len(idx) == math.ceil(n * sample_fps / fps - 1e-9)  # every sample time before the end
        for cap in (1, 3, 8):
            capped = sample_indices(n, fps, by_fps(sample_fps=sample_fps, max_frames=cap))
            assert len(capped) == min(cap, len(idx)) and set(capped) <= set(idx)


@pytest.mark.parametrize('total,fps,sampling,match', [
    (0, 10, {}, r'the video has no frames \(total=0\)'),
    (10, 10, {'mode': 'random'}, r"mode='random': choose one of \['uniform', 'fps'\]"),
    (10, 10, {'num_frames': 0}, r'num_frames=0: expected an int >= 1'),
    (10, 10, {'mode': 'fps', 'sample_fps': 0}, r'sample_fps=0: expected a number > 0'),
    (10, 10, {'mode': 'fps', 'max_frames': 0}, r'max_frames=0: expected an int >= 1'),
    (10, 10, {'max_frames': 4}, r"max_frames=4 caps mode='fps'"),
    (10, 0.0, {'mode': 'fps'}, r"frame rate 0.0 is not a positive number.*mode='uniform'"),
])
def test_sampling_errors(total, fps, sampling, match):
    """Invalid sampling is refused when the FrameSampling is made, before any video is read."""
    with pytest.raises(ValueError, match=match):
        sample_indices(total, fps, FrameSampling(**sampling))


def test_video_extensions_for_folder_scans():
    assert all(e.startswith('.') and e == e.lower() for e in VIDEO_EXTENSIONS)
    assert {'.mp4', '.avi', '.mov', '.mkv', '.webm', '.flv', '.m4v', '.mpg', '.mpeg', '.wmv', '.ts'} <= set(
        VIDEO_EXTENSIONS)


def test_missing_decord_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'decord', None)
    with pytest.raises(ImportError, match=r'pip install "modelscope_cnclip\[video\]"'):
        read_frames(tmp_path / 'a.mp4')


# ---- decoding around broken files (a fake reader behaves like decord) --------------------------------------------

class FakeError(RuntimeError):
    pass


class FakeReader:
    """Frames ``0..total-1`` whose pixels equal their index; ``broken`` ones fail to decode, and after a failure
    the reader stays broken (as decord's threaded decoder can)."""

    opened = 0

    def __init__(self, total: int, broken: set[int]) -> None:
        self.total, self.broken, self.failed = total, broken, False
        FakeReader.opened += 1

    def __len__(self) -> int:
        return self.total

    def get_avg_fps(self) -> float:
        return 10.0

    def _frames(self, indices: list[int]) -> np.ndarray:
        if self.failed or set(indices) & self.broken:
            self.failed = True
            raise FakeError('Error sending packet')
        return np.stack([np.full((2, 2, 3), i, np.uint8) for i in indices])

    def get_batch(self, indices: list[int]) -> np.ndarray:
        return self._frames(list(indices))

    def __getitem__(self, i: int) -> np.ndarray:
        return self._frames([i])[0]


def fake_decode(total: int, broken: set[int], num: int = 8) -> tuple[list[int], np.ndarray]:
    return _decode(lambda threads: FakeReader(total, broken), lambda n, fps: sample_indices(n, fps, uniform(num)),
                   "'fake.mp4'", (FakeError,))


def test_decode_of_a_sound_file_is_one_batch():
    FakeReader.opened = 0
    idx, frames = fake_decode(40, set())
    assert idx == sample_indices(40, 10, uniform(8)) and frames[:, 0, 0, 0].tolist() == idx and FakeReader.opened == 1


def test_broken_tail_is_resampled_over_the_frames_that_decode(caplog):
    with caplog.at_level(logging.WARNING, logger='modelscope_cnclip.video'):
        idx, frames = fake_decode(40, set(range(34, 40)), num=20)
    # probes 39, 38, 37, 35 fail and 31 decodes: the sampling is redone over frames 0..31
    assert idx == sample_indices(32, 10, uniform(20)) and frames[:, 0, 0, 0].tolist() == idx
    assert "'fake.mp4': its last 8 of 40 frames do not decode (Error sending packet)" in caplog.text


def test_broken_middle_frame_falls_back_to_one_seek_per_frame(caplog):
    wanted = sample_indices(40, 10, uniform(8))
    with caplog.at_level(logging.WARNING, logger='modelscope_cnclip.video'):
        idx, frames = fake_decode(40, {wanted[3]})
    assert idx == wanted[:3] + wanted[4:] and frames[:, 0, 0, 0].tolist() == idx
    assert 'read 7 of the 8 sampled frames one by one' in caplog.text


def test_no_decodable_frame_is_a_video_error():
    with pytest.raises(VideoError, match=r"cannot read video 'fake.mp4': none of its 40 frames decodes "
                                         r"\(Error sending packet\)"):
        fake_decode(40, set(range(40)))
    with pytest.raises(VideoError, match=r"'fake.mp4': none of the sampled frames \[\d+(, \d+)*\] decodes"):
        fake_decode(40, set(sample_indices(40, 10, uniform(8))))


# ---- real videos ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['clip.mp4', 'clip.avi'])
def test_read_frames_reads_the_sampled_frames(av, tmp_path, name):
    path = coloured_video(tmp_path / name, 30)
    frames = read_frames(path)
    assert [f.size for f in frames] == [SIZE] * 8 and all(f.mode == 'RGB' for f in frames)
    assert [index_of(f) for f in frames] == sample_indices(30, 10, uniform(8)) == [1, 5, 9, 13, 16, 20, 24, 28]
    assert [index_of(f) for f in read_frames(str(path), uniform(3))] == [5, 15, 25]
    assert [index_of(f) for f in read_frames(path, by_fps(sample_fps=2))] == list(range(0, 30, 5))
    assert [index_of(f) for f in read_frames(path, by_fps(sample_fps=4, max_frames=3))] == [5, 15, 25]
    from_bytes = read_frames(path.read_bytes())
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(from_bytes, frames))


def test_url_input(av, tmp_path):
    import functools
    import http.server
    import threading
    coloured_video(tmp_path / 'web.mp4', 12)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}'
        assert [index_of(f) for f in read_frames(f'{url}/web.mp4', uniform(4))] == sample_indices(12, 10, uniform(4))
        with pytest.raises(OSError, match=f'cannot download video {url}/nope.mp4'):
            read_frames(f'{url}/nope.mp4')
    finally:
        server.shutdown()


def test_short_video_gives_every_frame_once(av, tmp_path):
    path = coloured_video(tmp_path / 'short.avi', 5)
    assert [index_of(f) for f in read_frames(path, uniform(8))] == [0, 1, 2, 3, 4]


def test_truncated_file_keeps_the_frames_that_decode(av, tmp_path, caplog):
    data = coloured_video(tmp_path / 'full.avi', 30).read_bytes()
    cut = tmp_path / 'cut.avi'
    cut.write_bytes(data[:len(data) * 2 // 3])  # no index, last frame cut in half
    with caplog.at_level(logging.WARNING, logger='modelscope_cnclip.video'):
        got = [index_of(f) for f in read_frames(cut, uniform(100))]
    # decord's decoder reads ahead into the broken packet by chance, so which frames survive varies a little
    assert got == sorted(set(got)) and len(got) >= 12 and got[-1] < 20
    assert f"video '{cut}': " in caplog.text
    assert 'do not decode' in caplog.text or 'sampled frames one by one' in caplog.text


def test_unreadable_videos_are_explained(av, tmp_path):
    corrupt = tmp_path / 'corrupt.mp4'
    corrupt.write_bytes(b'\x00\x00\x00\x18ftypmp42' + bytes(range(256)) * 8)
    empty = tmp_path / 'empty.avi'
    empty.write_bytes(b'')
    with pytest.raises(VideoError, match=f"cannot read video '{corrupt}': not a video decord can open"):
        read_frames(corrupt)
    with pytest.raises(VideoError, match=f"cannot read video '{empty}': the file is empty"):
        read_frames(empty)
    with pytest.raises(VideoError, match=r'cannot read video <3000 bytes>: not a video'):
        read_frames(b'xyz' * 1000)
    with pytest.raises(FileNotFoundError, match="video file 'missing.mp4' not found"):
        read_frames('missing.mp4')
    with pytest.raises(TypeError, match='unsupported video input int'):
        read_frames(3)
    assert issubclass(VideoError, ValueError)


# ---- embedding -------------------------------------------------------------------------------------------------

def test_pool_frames_is_the_renormalised_mean():
    frames = F.normalize(torch.randn(7, 5), dim=-1)
    want = torch.stack([F.normalize(frames[:3].mean(0), dim=0), frames[3], F.normalize(frames[4:].mean(0), dim=0)])
    assert torch.allclose(pool_frames(frames, [3, 1, 3]), want, atol=1e-6)
    assert pool_frames(frames[:0], []).shape == (0, 5)
    with pytest.raises(ValueError, match=r'frame counts \[3, 3\] do not split 7 frame embeddings'):
        pool_frames(frames, [3, 3])


def test_encode_videos_is_the_mean_of_its_frames_as_images(av, tmp_path, tiny_model):
    paths = [write_video(tmp_path / f'v{k}.avi', textured(k, 12 + 3 * k)) for k in range(3)]
    got = encode_videos(tiny_model, paths, uniform(4), batch_size=5)  # model calls span videos
    assert isinstance(got, EncodedVideos) and got.failed == []
    assert got.embeddings.shape == (3, 32) and got.embeddings.dtype == torch.float32
    for row, path in zip(got.embeddings, paths):
        want = F.normalize(tiny_model.encode_image(read_frames(path, uniform(4))).mean(0), dim=0)
        assert torch.allclose(row, want, atol=1e-5)
    assert torch.allclose(tiny_model.encode_video(paths[1], uniform(4)), got.embeddings[1:2], atol=1e-5)
    one_by_one = torch.cat([tiny_model.encode_video(p, uniform(4)) for p in paths])
    assert torch.allclose(encode_videos(tiny_model, paths, uniform(4), num_workers=1).embeddings,
                          one_by_one, atol=1e-5)


def test_still_video_embeds_like_its_image(av, tmp_path, tiny_model, images):
    still = images[0].resize(SIZE)
    path = write_video(tmp_path / 'still.avi', [np.asarray(still)] * 10, lossless=True)
    assert all(np.array_equal(np.asarray(f), np.asarray(still)) for f in read_frames(path))
    assert torch.allclose(tiny_model.encode_video(path), tiny_model.encode_image(still), atol=1e-5)
    assert torch.allclose(tiny_model.encode_video(path, by_fps(sample_fps=3)), tiny_model.encode_image(still),
                          atol=1e-5)


def test_skip_errors_lists_failures_and_keeps_the_rest(av, tmp_path, tiny_model, caplog):
    good = [write_video(tmp_path / f'g{k}.mp4', textured(k, 10)) for k in range(2)]
    bad = tmp_path / 'bad.mp4'
    bad.write_bytes(b'not a video' * 50)
    videos = [good[0], bad, str(tmp_path / 'gone.mp4'), good[1]]
    with caplog.at_level(logging.WARNING, logger='modelscope_cnclip.video'):
        vectors, failed = encode_videos(tiny_model, videos, skip_errors=True)
    assert torch.allclose(vectors, tiny_model.encode_video(good), atol=1e-5)
    assert [(f.index, f.source) for f in failed] == [(1, repr(str(bad))), (2, repr(str(tmp_path / 'gone.mp4')))]
    assert 'not a video decord can open' in failed[0].reason and 'not found' in failed[1].reason
    assert all(isinstance(f, VideoFailure) for f in failed) and 'video[1]' in caplog.text
    with pytest.raises(VideoError, match=rf"video\[1\]: cannot read video '{bad}'"):
        encode_videos(tiny_model, videos)
    with pytest.raises(ValueError, match="mode='every'"):  # an argument error is not a per-video failure
        encode_videos(tiny_model, videos, FrameSampling(mode='every'), skip_errors=True)
    assert encode_videos(tiny_model, [bad], skip_errors=True).embeddings.shape == (0, 32)


def test_a_frame_retrieves_its_video(av, tmp_path, tiny_model):
    clips = [textured(10 + k, 16) for k in range(5)]
    paths = [write_video(tmp_path / f'r{k}.mp4', frames) for k, frames in enumerate(clips)]
    index = tiny_model.encode_video(paths)  # (5, D): videos in the image space
    queries = tiny_model.encode_image([Image.fromarray(frames[7]) for frames in clips])
    assert (queries @ index.t()).argmax(1).tolist() == list(range(5))
    assert (tiny_model.encode_text(['海边的日落']) @ index.t()).shape == (1, 5)


# ---- the ModelScope pipeline -------------------------------------------------------------------------------------

def test_pipeline_video_input(av, tmp_path, tiny_pipe, images):
    paths = [write_video(tmp_path / f'p{k}.mp4', textured(20 + k, 12)) for k in range(2)]
    out = tiny_pipe({'video': str(paths[0])})
    assert out['img_embedding'] is None and out['text_embedding'] is None
    emb = out['video_embedding']
    assert emb.shape == (1, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert torch.allclose(emb, tiny_pipe.model.core.encode_video(paths[0]), atol=1e-5)
    both = tiny_pipe({'img': images, 'video': paths, 'text': ['猫', '狗']})
    shapes = [both[k].shape for k in ('img_embedding', 'video_embedding', 'text_embedding')]
    assert shapes == [(3, 32), (2, 32), (2, 32)]
    assert torch.allclose(both['video_embedding'][:1], emb, atol=1e-5)
    assert tiny_pipe({'text': '猫'})['video_embedding'] is None
    assert torch.allclose(tiny_pipe.forward({'video': paths[1]})['video_embedding'], both['video_embedding'][1:],
                          atol=1e-5)


def test_pipeline_frame_sampling_arguments(av, tmp_path, tiny_pipe):
    path = write_video(tmp_path / 'args.avi', textured(30, 20))
    two = tiny_pipe({'video': path}, sampling=uniform(2))['video_embedding']
    assert torch.allclose(two, tiny_pipe.model.core.encode_video(path, uniform(2)), atol=1e-5)
    assert not torch.allclose(two, tiny_pipe({'video': path})['video_embedding'], atol=1e-4)
    fps_sampling = by_fps(sample_fps=5, max_frames=3)
    fps = tiny_pipe({'video': path}, sampling=fps_sampling)['video_embedding']
    assert torch.allclose(fps, tiny_pipe.model.core.encode_video(path, fps_sampling), atol=1e-5)
    # a dict of the fields (as a configuration file gives it) is the same sampling
    assert torch.allclose(tiny_pipe({'video': path}, sampling={'mode': 'fps', 'sample_fps': 5, 'max_frames': 3})[
        'video_embedding'], fps, atol=1e-5)
    assert torch.allclose(tiny_pipe.forward({'video': path}, sampling=uniform(2))['video_embedding'], two,
                          atol=1e-5)
    batch = tiny_pipe.preprocessor({'video': [path, path]}, sampling=uniform(3))
    assert batch['video_pixel_values'].shape == (6, 3, 64, 64) and batch['video_frame_counts'].tolist() == [3, 3]
    with pytest.raises(TypeError, match=r"unknown pipeline argument\(s\) \['frames'\]"):
        tiny_pipe({'video': path}, frames=2)
    with pytest.raises(ValueError, match=r"mode='x': choose one of"):
        tiny_pipe({'video': path}, sampling={'mode': 'x'})
    with pytest.raises(TypeError, match=r"sampling: unknown field\(s\) \['video_mode'\]"):
        tiny_pipe({'video': path}, sampling={'video_mode': 'fps'})


def test_pipeline_bad_video_is_explained(av, tmp_path, tiny_pipe):
    bad = tmp_path / 'bad.avi'
    bad.write_bytes(b'RIFF' + b'\x00' * 100)
    with pytest.raises(VideoError, match=rf"video\[0\]: cannot read video '{bad}'"):
        tiny_pipe({'video': str(bad)})
    with pytest.raises(ValueError, match=r'unknown input key\(s\) \[\'videos\'\]; use "img" \(images\), "video"'):
        tiny_pipe({'videos': str(bad)})
