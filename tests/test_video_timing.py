"""video.py: frame sampling by time: variable-frame-rate videos are sampled by their frame timestamps, constant-rate
ones exactly as by frame number, and unusable timestamps fall back to index / average fps."""
from __future__ import annotations

import fractions
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelscope_cnclip.video import _decode, read_frames, sample_indices

from helpers import by_fps, uniform

# The VFR clip of the issue: 10 s at 1 fps, then 2 s at 30 fps (70 frames, 12 s).
VFR_TIMES = [float(k) for k in range(10)] + [10 + k / 30 for k in range(60)]
VFR_END = 12.0
GREY = 3  # frame i is the flat grey level GREY * i, encoded losslessly, so a decoded frame tells its index


def shown(times: list[float], t: float) -> int:
    """The frame on screen at time ``t``: the last one that started by then."""
    return max(i for i, start in enumerate(times) if start <= t + 1e-9)


def write_timed(path: Path, times: list[float], size: tuple[int, int] = (32, 24), rate: int = 30) -> Path:
    """A lossless (FFV1, RGB) video whose frame ``i`` is grey level ``GREY * i`` and starts at ``times[i]``
    seconds: each frame's pts is set in a 1/30000 s time base, so the container really is variable-rate."""
    import av
    tb = fractions.Fraction(1, 30000)
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('ffv1', rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = 'bgr0'
        stream.codec_context.time_base = stream.time_base = tb
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), GREY * i, np.uint8), format='rgb24')
            frame.pts, frame.time_base = round(t / tb), tb
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def grey_index(img: Image.Image) -> int:
    arr = np.asarray(img.convert('RGB'))
    assert arr.min() == arr.max() and arr.max() % GREY == 0, (arr.min(), arr.max())  # lossless: exact
    return int(arr.max()) // GREY


def vfr_stamps(times: list[float] = VFR_TIMES, end: float = VFR_END) -> np.ndarray:
    starts = np.asarray(times)
    return np.stack([starts, np.append(starts[1:], end)], 1)


# ---- sample_indices with timestamps: a pure function --------------------------------------------------------------

def test_fps_mode_takes_the_frame_shown_at_each_time():
    ts = vfr_stamps()
    for avg_fps in (70 / 12, 30.0, 0.0, math.nan):  # mp4's average, mkv's declared rate, none: the rate is unused
        got = sample_indices(70, avg_fps, by_fps(sample_fps=1), timestamps=ts)
        assert got == [shown(VFR_TIMES, t) for t in range(12)] == list(range(10)) + [10, 40]
    got = sample_indices(70, 70 / 12, by_fps(sample_fps=2), timestamps=ts)
    assert got == sorted({shown(VFR_TIMES, k / 2) for k in range(24)}) == list(range(10)) + [10, 25, 40, 55]
    # max_frames spreads over the sample times (1 s, 4 s, 7 s, 10 s of the 12), not over the frames
    assert sample_indices(70, 70 / 12, by_fps(max_frames=4), timestamps=ts) == [1, 4, 7, 10]
    assert sample_indices(70, 70 / 12, by_fps(max_frames=12),
                          timestamps=ts) == list(range(10)) + [10, 40]
    # by frame number at the average rate the fast 2 s would take 4 of the 12 samples
    assert sample_indices(70, 70 / 12, by_fps()) == [0, 5, 11, 17, 23, 29, 35, 40, 46, 52, 58, 64]


def test_uniform_segments_are_equal_durations():
    ts = vfr_stamps()
    got = sample_indices(70, 70 / 12, uniform(8), timestamps=ts)
    assert got == [shown(VFR_TIMES, (i + 0.5) * VFR_END / 8) for i in range(8)] == [0, 2, 3, 5, 6, 8, 9, 47]
    assert sample_indices(70, 70 / 12, uniform(4), timestamps=ts) == [1, 4, 7, 25]
    assert sample_indices(70, 70 / 12, uniform(8)) == [4, 13, 21, 30, 39, 48, 56, 65]  # by frame number: 6 of 8 in 2 s
    # a frame on screen at several segment centres is taken once; a short video gives every frame once
    assert sample_indices(70, 70 / 12, uniform(40), timestamps=ts) == sorted({shown(VFR_TIMES, (i + .5) * .3)
                                                                    for i in range(40)})
    assert sample_indices(3, 1.0, uniform(8), timestamps=[[0, 5], [5, 6], [6, 7]]) == [0, 1, 2]


def test_timestamps_start_end_and_offsets():
    starts = [2.5, 3.5, 3.6, 3.7, 3.8, 3.9]  # first frame at 2.5 s (an edit list or a cut): times count from it
    ends = [[s, math.nan] for s in starts]  # no end given: the last frame lasts a typical frame (0.1 s)
    assert sample_indices(6, 0.0, by_fps(sample_fps=1), timestamps=ends) == [0, 1]
    assert sample_indices(6, 0.0, by_fps(sample_fps=10), timestamps=ends) == [0, 1, 2, 3, 4, 5]
    assert sample_indices(6, 0.0, uniform(2), timestamps=ends) == [0, 2]  # centres 2.875 s and 3.625 s of [2.5, 4.0)
    # a last end before the last start is ignored the same way
    assert sample_indices(6, 0.0, uniform(2), timestamps=[[s, 0.0] for s in starts]) == [0, 2]


CFR_RATES = [5, 10, 24, 25, 30000 / 1001, 30, 60000 / 1001]


def cfr_stamps(n: int, fps: float, start: float = 0.0, clock: str = 'exact') -> np.ndarray:
    starts = start + np.arange(n + 1) / fps
    if clock == 'ms':  # Matroska/WebM/FLV: milliseconds
        starts = np.round(starts * 1000) / 1000
    elif clock == 'float32':  # decord
        starts = starts.astype(np.float32).astype(np.float64)
    return np.stack([starts[:-1], starts[1:]], 1)


@pytest.mark.parametrize('clock', ['exact', 'ms', 'float32'])
@pytest.mark.parametrize('fps', CFR_RATES)
def test_constant_rate_samples_exactly_as_by_frame_number(fps, clock):
    for n in range(1, 90):
        for start in (0.0, 1.234):
            ts = cfr_stamps(n, fps, start, clock)
            for num in (1, 3, 8, 16):
                sampling = uniform(num)
                assert sample_indices(n, fps, sampling, timestamps=ts) == sample_indices(n, fps, sampling), (n, num)
            for sample_fps in (0.5, 1, 2.5, 7, 30, 100):
                for cap in (None, 3):
                    sampling = by_fps(sample_fps=sample_fps, max_frames=cap)
                    assert sample_indices(n, fps, sampling, timestamps=ts) == sample_indices(n, fps, sampling), \
                        (n, sampling)


@pytest.mark.parametrize('timestamps,match', [
    ([[0, 1], [1, 2]], r'timestamps: shape \(2, 2\), expected \(3, 2\)'),
    ([0.0, 1.0, 2.0], r'timestamps: shape \(3,\), expected \(3, 2\): \(start, end\) seconds per frame'),
    ([[0, 1], [math.nan, 2], [2, 3]], r'timestamps: frame 1 starts at nan'),
    ([[0, 1], [2, 3], [2, 3]], r'timestamps: frame 2 starts at 2 s, not after frame 1 \(2 s\); pass timestamps=None'),
])
def test_unusable_timestamps_are_refused(timestamps, match):
    with pytest.raises(ValueError, match=match):
        sample_indices(3, 10.0, timestamps=timestamps)


# ---- the decoder reads the timestamps (a fake reader behaves like decord) -----------------------------------------

class TimedReader:
    """A decord-like reader of the VFR clip: frame ``i``'s pixels equal ``i``; frames from ``broken`` on do not
    decode; ``stamps`` is what ``get_frame_timestamp`` answers."""

    def __init__(self, stamps: np.ndarray, broken: int = 10 ** 9, fps: float = 70 / 12) -> None:
        self.stamps, self.broken, self.fps = stamps, broken, fps

    def __len__(self) -> int:
        return len(self.stamps)

    def get_avg_fps(self) -> float:
        return self.fps

    def get_frame_timestamp(self, indices: np.ndarray) -> np.ndarray:
        return self.stamps[indices]

    def get_batch(self, indices: list[int]) -> np.ndarray:
        if max(indices) >= self.broken:
            raise RuntimeError('Error sending packet')
        return np.stack([np.full((2, 2, 3), i, np.uint8) for i in indices])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get_batch([i])[0]


def timed_decode(reader: TimedReader, sample_fps: float = 1.0) -> list[int]:
    def pick(n, fps, times=None):
        return sample_indices(n, fps, by_fps(sample_fps=sample_fps), timestamps=times)
    idx, frames = _decode(lambda threads: reader, pick, "'vfr.mp4'", (RuntimeError,))
    assert frames[:, 0, 0, 0].tolist() == idx
    return idx


def test_decode_samples_by_the_readers_timestamps_and_resamples_a_broken_tail_by_time(caplog):
    assert timed_decode(TimedReader(vfr_stamps())) == list(range(10)) + [10, 40]
    with caplog.at_level(logging.WARNING, logger='modelscope_cnclip.video'):
        # frames 60..69 do not decode: probes 69, 68, 67, 65, 61 fail and 53 decodes, so the sampling is redone
        # over frames 0..53, which end at 11.467 s (the start of frame 54)
        got = timed_decode(TimedReader(vfr_stamps(), broken=60), sample_fps=4)
    assert got == sorted({shown(VFR_TIMES, k / 4) for k in range(48) if k / 4 < VFR_TIMES[54]})
    assert got[-1] == shown(VFR_TIMES, 11.25) == 47
    assert 'its last 16 of 70 frames do not decode' in caplog.text


@pytest.mark.parametrize('stamps,why', [
    (np.zeros((70, 2)), r'frame 1 starts at 0 s, not after frame 0 \(0 s\)'),
    (np.full((70, 2), np.nan), 'frame 0 starts at nan'),
    (np.zeros((3, 2)), r'shape \(3, 2\), expected \(70, 2\)'),
])
def test_garbage_timestamps_fall_back_to_the_average_rate(caplog, stamps, why):
    reader = TimedReader(vfr_stamps())
    reader.get_frame_timestamp = lambda indices: stamps
    with caplog.at_level(logging.INFO, logger='modelscope_cnclip.video'):
        assert timed_decode(reader) == sample_indices(70, 70 / 12, by_fps())
    assert "video 'vfr.mp4': its frame timestamps are unusable (" in caplog.text
    assert '); frames are timed by index / average fps' in caplog.text
    assert re.search(why, caplog.text)


def test_a_reader_whose_timestamps_fail_falls_back(caplog):
    reader = TimedReader(vfr_stamps())

    def fail(indices):
        raise RuntimeError('no index')
    reader.get_frame_timestamp = fail
    with caplog.at_level(logging.INFO, logger='modelscope_cnclip.video'):
        assert timed_decode(reader) == sample_indices(70, 70 / 12, by_fps())
    assert 'its frame timestamps are unusable (no index)' in caplog.text


# ---- real variable-frame-rate files ------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=['mkv', 'mp4'])
def vfr_clip(av, request, tmp_path_factory) -> Path:
    """mkv: decord's average fps is the declared 30; mp4: 70 frames / 12 s. Neither times a frame right."""
    return write_timed(tmp_path_factory.mktemp('vfr') / f'vfr.{request.param}', VFR_TIMES)


def test_vfr_file_sampled_at_1_fps(vfr_clip):
    got = [grey_index(f) for f in read_frames(vfr_clip, by_fps(sample_fps=1))]
    assert got == [shown(VFR_TIMES, t) for t in range(12)]
    assert sum(i < 10 for i in got) == 10 and sum(i >= 10 for i in got) == 2  # 10 s slow, 2 s fast
    got = [grey_index(f) for f in read_frames(vfr_clip, by_fps(sample_fps=4))]
    assert got == sorted({shown(VFR_TIMES, k / 4) for k in range(48)})


def test_vfr_file_max_frames(vfr_clip):
    assert [grey_index(f) for f in read_frames(vfr_clip, by_fps(max_frames=4))] == [1, 4, 7, 10]
    assert [grey_index(f) for f in read_frames(vfr_clip, by_fps(sample_fps=0.5, max_frames=3))] == [2, 6, 10]


def test_vfr_file_uniform_segments_by_time(vfr_clip):
    got = [grey_index(f) for f in read_frames(vfr_clip, uniform(8))]
    assert got == [shown(VFR_TIMES, (i + 0.5) * VFR_END / 8) for i in range(8)] == [0, 2, 3, 5, 6, 8, 9, 47]


def test_constant_rate_file_with_an_offset_clock(av, tmp_path):
    """Frames 10 per second from t = 0.5 s in a millisecond clock: sampled exactly as by frame number."""
    path = write_timed(tmp_path / 'cfr.mkv', [0.5 + k / 10 for k in range(33)], rate=10)
    assert [grey_index(f) for f in read_frames(path, uniform(8))] == sample_indices(33, 10, uniform(8))
    got = [grey_index(f) for f in read_frames(path, by_fps(sample_fps=3))]
    assert got == sample_indices(33, 10, by_fps(sample_fps=3)) == [0, 3, 6, 10, 13, 16, 20, 23, 26, 30]


def test_file_with_all_timestamps_equal_falls_back_to_its_declared_rate(av, tmp_path, caplog):
    """Matroska lets every pts be 0. decord seeks by pts, so which pictures it returns for such a file varies
    from run to run (repeats included): only the sampling (by index at the declared 10 fps) and the log are
    checked here; the fake readers above check the fallback's frames."""
    path = write_timed(tmp_path / 'zero.mkv', [0.0] * 20, rate=10)
    with caplog.at_level(logging.INFO, logger='modelscope_cnclip.video'):
        assert len(read_frames(path, by_fps(sample_fps=2))) == len([0, 5, 10, 15])
        assert len(read_frames(path, uniform(8))) == len(sample_indices(20, 10, uniform(8))) == 8
    assert (f"video '{path}': its frame timestamps are unusable (frame 1 starts at 0 s, not after frame 0 (0 s)); "
            'frames are timed by index / average fps') in caplog.text
