"""Video embedding: sample frames with decord, embed them as images, mean-pool per video and renormalise.

Videos live in the image embedding space, so a text or an image query searches videos with the same index.
decord is an optional dependency (``pip install "modelscope_cnclip[video]"``), imported only when a video is read.

Which frames are embedded is a :class:`FrameSampling` (``mode``, ``num_frames``, ``sample_fps``, ``max_frames``),
the one bundle every function and the CLI pass along.

Frame policy (``mode='uniform'``): the video is cut into ``num_frames`` equal segments and the centre frame of each
is taken, ``index_i = floor((i + 1/2) * total / num_frames)`` for a video of ``total`` frames. Every frame then
stands for the same share of the video, so the mean of their embeddings weighs the whole video evenly (including
both ends would give the first and last frames half a segment each and over-weight the boundaries), and the sample
stays clear of the first frame (often black, a fade-in or a title card) and of the last one (often a fade-out, and
the frame decord most often fails to decode when a file's index is broken). It never reaches ``total``; a video with
fewer than ``num_frames`` frames gives each of its frames once.

Time, not frame numbers: segments (``'uniform'``) and sample times (``'fps'``) are measured in seconds, and the
frame taken for a time is the one on screen then, read from the container's frame timestamps. A variable frame
rate video (phones, screen recordings) can hold 1 frame a second for a minute and then 60: sampled by frame
number, its fast part would take most of the sample. When the timestamps are those of a constant rate (every
frame within a tenth of a frame, or 1 ms, of ``index / average fps``) the frame numbers are computed exactly as
above, which picks the same frames; when they are missing or unusable (not finite, not increasing) frames are
timed by ``index / average fps``, logged at INFO. A frame on screen at several sample times is taken once.

Decoded frames are checked: each must be ``(H, W, 3)`` uint8 RGB. decord returns 4- or 6-channel arrays for some
frame widths (16, 24, 48 px among them, including widths made by rotation metadata); such a video is decoded
with PyAV instead (frames in presentation order, rotation applied) or, without PyAV, reported as a
:class:`VideoError` that names it and the shape. Nothing else is ever embedded.
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modelscope_cnclip.config import DEFAULT_NUM_FRAMES, SAMPLING_MODES, SamplingMode
from modelscope_cnclip.transform import ImageTransform
from modelscope_cnclip.utils import default_threads, fetch_url, map_ahead

if TYPE_CHECKING:
    from modelscope_cnclip.inference import CNClip

__all__ = ['SAMPLING_MODES', 'FrameSampling', 'DEFAULT_SAMPLING', 'VideoInput', 'VideoError', 'VideoFailure',
           'EncodedVideos', 'sample_indices', 'read_frames', 'load_videos', 'pool_frames', 'encode_videos',
           'as_video_batch']

logger = logging.getLogger(__name__)

VideoInput = Union[str, os.PathLike, bytes, bytearray, memoryview]
DEFAULT_BATCH = 64  # frames per model call
INSTALL_HINT = 'pip install "modelscope_cnclip[video]"'
_ACCEPTED = 'a file path, a pathlib.Path, an http(s) URL or the encoded bytes of a video file'
# How far back from the end a broken tail is probed: n-1, n-2, n-3, n-5, n-9, ... (then frame 0).
_MAX_PROBES = 24
_TRIES = 2  # reads of one frame in the frame-by-frame fallback
# Timestamps count as equal within a millisecond: the clock of Matroska, WebM and FLV, and more than float32's
# rounding (decord's timestamps) of times under about two hours.
_TIME_TOL = 1e-3
_RATE_TOL = 0.1  # frames: timestamps this close to index / fps are a constant rate
PYAV_HINT = 'pip install av'
# decord prefixes its C++ messages with "[hh:mm:ss] /path/file.cc:123: "; the reason is what follows.
_DECORD_PREFIX = re.compile(r'\[\d\d:\d\d:\d\d\] \S+?:\d+: ')


class VideoError(ValueError):
    """A video that cannot be read: unreadable, corrupt, empty or without frames. The message names it."""


class VideoFailure(NamedTuple):
    """A video that :func:`encode_videos` skipped: its position in the input, what it was, and why."""

    index: int
    source: str
    reason: str


class EncodedVideos(NamedTuple):
    """What :func:`encode_videos` returns: ``embeddings`` has one row per video read, in input order (the videos
    in ``failed`` have none)."""

    embeddings: torch.Tensor  # (N - len(failed), D) float32, L2-normalised
    failed: list[VideoFailure]


def _decord() -> ModuleType:
    try:
        import decord
    except ImportError as e:
        raise ImportError(f'reading videos needs decord: {INSTALL_HINT}') from e
    return decord


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video are embedded (validated on creation; see the module docstring).

    Attributes:
        num_frames: ``'uniform'``: how many frames (the centre frame of each of ``num_frames`` equal-duration
            segments; every frame once for a shorter video).
        mode: ``'uniform'`` or ``'fps'`` (one frame every ``1 / sample_fps`` seconds from the first frame, the one
            on screen at that time).
        sample_fps: ``'fps'``: frames per second.
        max_frames: ``'fps'``: keep at most this many of those frames, spread uniformly over them (``None``: all).

    Raises:
        ValueError: an unknown mode, a count that is not a whole number >= 1, a rate that is not > 0, or
            ``max_frames`` with ``mode='uniform'`` (where ``num_frames`` sets the count).
    """

    num_frames: int = DEFAULT_NUM_FRAMES
    mode: SamplingMode = 'uniform'
    sample_fps: float = 1.0
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f'mode={self.mode!r}: choose one of {list(SAMPLING_MODES)}')
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f'num_frames={self.num_frames!r}: expected an int >= 1 (frames sampled per video)')
        if self.mode == 'fps':
            if not (isinstance(self.sample_fps, (int, float)) and math.isfinite(self.sample_fps)
                    and self.sample_fps > 0):
                raise ValueError(f'sample_fps={self.sample_fps!r}: expected a number > 0 (frames sampled per second)')
            if self.max_frames is not None and (not isinstance(self.max_frames, int) or self.max_frames < 1):
                raise ValueError(f'max_frames={self.max_frames!r}: expected an int >= 1 or None (no cap)')
        elif self.max_frames is not None:
            raise ValueError(f"max_frames={self.max_frames!r} caps mode='fps'; with mode='uniform' num_frames sets "
                             f"the count")

    @classmethod
    def of(cls, value: FrameSampling | Mapping[str, Any] | None) -> FrameSampling:
        """A :class:`FrameSampling` from itself, a mapping of its fields (a JSON configuration) or ``None``
        (the default).

        Raises:
            TypeError: another type, or unknown fields (named). ValueError: invalid values.
        """
        if value is None:
            return DEFAULT_SAMPLING
        if isinstance(value, FrameSampling):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise TypeError(f'sampling: unknown field(s) {unknown}; FrameSampling has '
                                f'{[f.name for f in fields(cls)]}')
            return cls(**value)
        raise TypeError(f'sampling: expected a FrameSampling or a dict of its fields, got {type(value).__name__}')

    def recorded(self) -> dict[str, Any]:
        """The fields that change which frames are taken (what an embeddings dir records): ``'uniform'``: mode and
        num_frames; ``'fps'``: mode, sample_fps and max_frames."""
        used = ('mode', 'num_frames') if self.mode == 'uniform' else ('mode', 'sample_fps', 'max_frames')
        return {k: v for k, v in asdict(self).items() if k in used}


#: 8 frames, the centres of 8 equal segments (the default everywhere)
DEFAULT_SAMPLING = FrameSampling()


def _spread(n: int, num: int) -> list[int]:
    """Centres of ``num`` equal segments of ``range(n)`` (all of it when ``n <= num``); exact integer maths."""
    if n <= num:
        return list(range(n))
    return [(2 * i + 1) * n // (2 * num) for i in range(num)]


def _cap(indices: list[int], max_frames: int | None) -> list[int]:
    """At most ``max_frames`` of ``indices``, spread uniformly over them (all when ``max_frames`` is None)."""
    if max_frames is not None and len(indices) > max_frames:
        return [indices[i] for i in _spread(len(indices), max_frames)]
    return indices


def _timestamps_problem(timestamps: np.ndarray, num_frames: int) -> str | None:
    """Why ``timestamps`` cannot time the frames (None when they can): the shape, or starts that are not finite
    or not strictly increasing."""
    if timestamps.shape != (num_frames, 2):
        return f'shape {timestamps.shape}, expected ({num_frames}, 2): (start, end) seconds per frame'
    starts = timestamps[:, 0]
    bad = np.flatnonzero(~np.isfinite(starts))
    if len(bad):
        return f'frame {bad[0]} starts at {starts[bad[0]]}'
    back = np.flatnonzero(np.diff(starts) <= 0)
    if len(back):
        k = int(back[0]) + 1
        return f'frame {k} starts at {starts[k]:.6g} s, not after frame {k - 1} ({starts[k - 1]:.6g} s)'
    return None


def _constant_rate(starts: np.ndarray, fps: float) -> bool:
    """Whether frame ``k`` starts at ``starts[0] + k / fps`` for every ``k``, within a tenth of a frame or 1 ms."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        return False
    drift = np.abs(starts - starts[0] - np.arange(len(starts)) / fps).max()
    return bool(drift <= max(_RATE_TOL / fps, _TIME_TOL))


def _clock(timestamps: Any, num_frames: int, fps: float) -> tuple[np.ndarray, float] | None:
    """``(starts, end)`` in seconds to sample a variable-rate video by time, or None to sample by frame number
    (no timestamps, or those of a constant rate ``fps``). Raises ValueError for unusable timestamps."""
    if timestamps is None:
        return None
    ts = np.asarray(timestamps, np.float64)
    problem = _timestamps_problem(ts, num_frames)
    if problem:
        raise ValueError(f'timestamps: {problem}; pass timestamps=None to time frames by index / fps')
    starts = ts[:, 0]
    if _constant_rate(starts, fps):
        return None
    end = float(ts[-1, 1])
    if not (math.isfinite(end) and end > starts[-1]):  # no end given: the last frame lasts a typical frame
        end = starts[-1] + (float(np.median(np.diff(starts))) if num_frames > 1 else 0.0)
    return starts, end


def _shown_at(starts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each of ``times`` (seconds): the last one starting by then, within 1 ms."""
    return (np.searchsorted(starts, times + _TIME_TOL, side='right') - 1).clip(0, len(starts) - 1)


def sample_indices(total: int, fps: float, sampling: FrameSampling = DEFAULT_SAMPLING, *,
                   timestamps: Any = None) -> list[int]:
    """Which frames of a video to embed: sorted, distinct indices in ``[0, total)``.

    Args:
        total: frames in the video.
        fps: its average frame rate (read in ``'fps'`` mode, and to tell a constant rate from ``timestamps``).
        sampling: which frames (:class:`FrameSampling`): ``'uniform'`` takes the centre frame of each of
            ``num_frames`` equal segments of the video's duration, or every frame once when the video is shorter;
            ``'fps'`` one frame every ``1 / sample_fps`` seconds from the first frame (the frame shown at that
            time), every frame once when ``sample_fps >= fps`` at a constant rate, at most ``max_frames``.
        timestamps: optional ``(total, 2)`` float seconds, each frame's display start and end in
            presentation order (decord's ``get_frame_timestamp``, PyAV's ``pts`` and ``duration``). Unless they are
            those of the constant rate ``fps`` (which samples exactly as without them), segments and sample
            times are placed by them; the end of the last frame is the video's end. ``'fps'`` mode then needs no
            ``fps``.

    Raises:
        ValueError: a video with no frames, a frame rate that is not a positive number in ``'fps'`` mode without
            usable ``timestamps``, or timestamps of the wrong shape, not finite or not strictly increasing.
    """
    num, mode, sample_fps, max_frames = sampling.num_frames, sampling.mode, sampling.sample_fps, sampling.max_frames
    if total < 1:
        raise ValueError(f'the video has no frames (total={total}): nothing to sample')
    clock = _clock(timestamps, total, fps)
    if mode == 'uniform':
        if clock is None or total <= num:
            return _spread(total, num)
        starts, end = clock
        return np.unique(_shown_at(starts, starts[0] + (np.arange(num) + 0.5) * (end - starts[0]) / num)).tolist()
    if clock is not None:
        starts, end = clock
        count = max(1, math.ceil((end - starts[0] - _TIME_TOL) * sample_fps))  # sample times before the end
        picks = _shown_at(starts, starts[0] + np.arange(count) / sample_fps)
    else:
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"frame rate {fps!r} is not a positive number and there are no frame timestamps, so "
                             f"mode='fps' cannot time frames; use mode='uniform'")
        step = fps / sample_fps  # frames between samples
        count = max(1, math.ceil(total / step - 1e-9))  # samples at t = k / sample_fps < duration
        # The frame shown at time t is floor(t * fps); the epsilon keeps k * step = 9.9999999 on frame 10.
        picks = np.floor(np.arange(count) * step + 1e-6).astype(np.int64).clip(0, total - 1)
    return _cap(np.unique(picks).tolist(), max_frames)  # sample_fps > fps maps several samples to one frame


def _what(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f'<{len(source)} bytes>'
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else repr(source)[:200]


def _reason(e: BaseException) -> str:
    text = ' '.join(_DECORD_PREFIX.sub('', str(e)).split())
    if 'cannot find video stream' in text:
        return 'no video stream (an audio-only, truncated or corrupt file)'
    if text.startswith('Error reading'):
        return 'not a video decord can open (corrupt or truncated file, or an unsupported format)'
    return text or type(e).__name__


def _video_bytes(source: VideoInput, timeout: float) -> bytes | None:
    """Encoded bytes of an in-memory or URL source (``None`` for a file, which decord opens by path)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, str) and source.startswith(('http://', 'https://')):
        return fetch_url(source, timeout, 'video')
    if isinstance(source, (str, os.PathLike)):
        return None
    raise TypeError(f'unsupported video input {type(source).__name__}: {_what(source)}; use {_ACCEPTED}')


def _to_numpy(batch: Any) -> np.ndarray:
    # decord returns its own NDArray unless decord.bridge.set_bridge() chose torch/tf/mxnet tensors.
    return batch.asnumpy() if hasattr(batch, 'asnumpy') else np.asarray(batch)


class _WrongShape(Exception):
    """Decoded frames that are not ``(H, W, 3)`` uint8 RGB (not a read error: retrying the decoder is no use)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        super().__init__(f'{shape} {dtype} arrays, not (H, W, 3) uint8 RGB')
        self.shape, self.dtype = shape, dtype


def _rgb(frames: Any, one: bool = False) -> np.ndarray:
    """Decoded frames as numpy, checked: ``(F, H, W, 3)`` uint8 (``(H, W, 3)`` when ``one``), not empty.

    Raises:
        _WrongShape: anything else (decord gives 4- or 6-channel arrays for some frame widths), with the shape of
            one frame.
    """
    arr = _to_numpy(frames)
    if arr.dtype != np.uint8 or arr.ndim != (3 if one else 4) or arr.shape[-1] != 3 or arr.size == 0:
        raise _WrongShape(tuple(arr.shape[0 if one else 1:]), arr.dtype)
    return arr


def _frame_times(reader: Any, total: int, what: str, errors: tuple[type[BaseException], ...]) -> np.ndarray | None:
    """The reader's ``(total, 2)`` frame start/end seconds, or None (logged) when it has none that are usable."""
    get = getattr(reader, 'get_frame_timestamp', None)
    if get is None:
        return None
    try:
        times = np.asarray(_to_numpy(get(np.arange(total))), np.float64)
        problem = _timestamps_problem(times, total)
    except errors as e:
        problem = _reason(e)
    if problem:
        logger.info('video %s: its frame timestamps are unusable (%s); frames are timed by index / average fps',
                    what, problem)
        return None
    return times


def _last_decodable(open_reader: Callable[[], Any], total: int, errors: tuple[type[BaseException], ...]) -> int:
    """Index of a late frame that decodes, probing ``total-1, total-2, total-3, total-5, ...`` and then 0 (each
    on a fresh reader: decord's decoder can stay broken after an error); -1 when none does."""
    offsets = [0] + [2 ** k for k in range(_MAX_PROBES)]
    for i in [total - 1 - off for off in offsets if total - 1 - off > 0] + [0]:
        try:
            _rgb(open_reader()[i], one=True)
            return i
        except errors:
            continue
    return -1


def _decode(open_reader: Callable[[int], Any], pick: Callable[..., list[int]], what: str,
            errors: tuple[type[BaseException], ...], num_threads: int = 1) -> tuple[list[int], np.ndarray]:
    """Sample and decode frames -> ``(indices read, (F, H, W, 3) uint8)``, working around broken files.

    decord reports a frame count from the container, and the last frames of some files (a broken or missing
    index, a truncated download) do not decode; its decoder thread also reads ahead, so a broken packet can fail a
    read of the good frames before it, by chance. So each read is tried twice (the second time on a fresh reader),
    and on a failed batch read the tail is probed for the last frame that decodes and the sampling is redone over
    the frames up to it; if that fails too, each sampled frame is read on its own (a seek per frame) and those that
    decode are kept. ``open_reader(n)`` opens the video with ``n`` decoding threads; the fallbacks use one, which
    reads ahead the least. ``pick(n, fps)`` samples the first ``n`` frames, ``pick(n, fps, timestamps)`` when the
    reader has usable frame timestamps (``(n, 2)`` seconds).

    Raises:
        VideoError: no frame decodes, or the sampling fails. _WrongShape: the frames decode to something other
            than ``(H, W, 3)`` uint8.
    """
    reader = open_reader(num_threads)
    fresh = partial(open_reader, 1)
    total, fps = len(reader), float(reader.get_avg_fps())
    times = _frame_times(reader, total, what, errors)

    def sample(n: int) -> list[int]:
        return pick(n, fps) if times is None else pick(n, fps, times[:n])

    try:
        indices = sample(total)
    except ValueError as e:
        raise VideoError(f'cannot read video {what}: {e}') from None
    try:
        return indices, _twice(fresh, lambda r: r.get_batch(indices), errors, reader)
    except errors as e:
        first = _reason(e)
    last = _last_decodable(fresh, total, errors)
    if last < 0:
        raise VideoError(f'cannot read video {what}: none of its {total} frames decodes ({first})')
    if last + 1 < total:
        retry = sample(last + 1)
        try:
            frames = _twice(fresh, lambda r: r.get_batch(retry), errors)
            logger.warning('video %s: its last %d of %d frames do not decode (%s); sampled its first %d instead',
                           what, total - last - 1, total, first, last + 1)
            return retry, frames
        except errors:
            indices = retry
    reader, got = fresh(), []
    for i in indices:
        for _ in range(_TRIES):
            try:
                got.append((i, _rgb(reader[i], one=True)))
                break
            except errors:
                reader = fresh()  # decord's decoder can stay broken after an error
    if not got:
        raise VideoError(f'cannot read video {what}: none of the sampled frames {indices} decodes ({first})')
    logger.warning('video %s: read %d of the %d sampled frames one by one (%s)', what, len(got), len(indices), first)
    return [i for i, _ in got], np.stack([a for _, a in got])


def _twice(open_reader: Callable[[], Any], read: Callable[[Any], Any], errors: tuple[type[BaseException], ...],
           reader: Any = None) -> np.ndarray:
    """``read(reader)`` as a checked ``(F, H, W, 3)`` uint8 array, tried once more on a fresh reader if it fails
    (a wrong shape is not retried: it raises :class:`_WrongShape`)."""
    try:
        return _rgb(read(reader if reader is not None else open_reader()))
    except errors:
        return _rgb(read(open_reader()))


def _displayed(frame: Any) -> np.ndarray:
    """A PyAV frame as shown: ``(H, W, 3)`` uint8 RGB with its rotation metadata applied (as decord does)."""
    arr = frame.to_ndarray(format='rgb24')
    turns = round(getattr(frame, 'rotation', 0) / 90) % 4  # counter-clockwise degrees, from the display matrix
    return np.ascontiguousarray(np.rot90(arr, turns)) if turns else arr


def _packet_times(packets: list[tuple[int | None, int | None]], time_base: float) -> np.ndarray:
    """``(n, 2)`` display start/end seconds of the frames of ``(pts, duration)`` packets, in presentation order
    (each frame ends where the next starts); all NaN when a pts is missing, so frames are timed by index."""
    if not packets or any(pts is None for pts, _ in packets):
        return np.full((len(packets), 2), math.nan)
    pts, durations = zip(*sorted(packets, key=lambda p: p[0]))
    starts = np.array(pts, np.float64) * time_base
    return np.stack([starts, np.append(starts[1:], starts[-1] + (durations[-1] or 0) * time_base)], 1)


class _AVReader:
    """The part of decord's ``VideoReader`` that :func:`_decode` uses, backed by PyAV: frames in presentation
    order as shown (:func:`_displayed`), timestamps from the packets' pts as decord reads them.

    Reading frames decodes the video from its start up to the last one asked for, without seeking: exact frame
    numbers at the cost of speed, for the videos decord misdecodes (narrow ones, so small).
    """

    def __init__(self, av: ModuleType, source: str | bytes) -> None:
        self._av, self._source = av, source
        with self._open() as container:
            stream = container.streams.video[0]  # IndexError: no video stream
            packets = [(p.pts, p.duration) for p in container.demux(stream) if p.size]
            self._fps = float(stream.average_rate or 0)
            self._times = _packet_times(packets, float(stream.time_base or 0))

    def _open(self) -> Any:
        return self._av.open(io.BytesIO(self._source) if isinstance(self._source, bytes) else self._source)

    def __len__(self) -> int:
        return len(self._times)

    def get_avg_fps(self) -> float:
        return self._fps

    def get_frame_timestamp(self, indices: Any) -> np.ndarray:
        return self._times[indices]

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """``(len(indices), H, W, 3)`` uint8. Raises IndexError for frames that do not decode."""
        wanted, got = set(indices), {}
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = 'AUTO'
            for k, frame in enumerate(container.decode(stream)):
                if k in wanted:
                    got[k] = _displayed(frame)
                if len(got) == len(wanted):
                    break
        if len(got) < len(wanted):
            raise IndexError(f'frames {sorted(wanted - set(got))} of {len(self)} do not decode')
        return np.stack([got[i] for i in indices])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get_batch([i])[0]


def _decode_with_pyav(source: str | bytes, pick: Callable[..., list[int]], what: str,
                      wrong: _WrongShape) -> tuple[list[int], np.ndarray]:
    """:func:`_decode` with PyAV, for a video whose frames decord decoded as ``wrong``.

    Raises:
        VideoError: PyAV is not installed (naming the video, the shape and the fix), or cannot read the video.
    """
    try:
        import av
    except ImportError:
        raise VideoError(f'cannot read video {what}: decord decodes its frames as {wrong} (a decord bug with some '
                         f'frame widths, such as 16, 24 or 48 px); install PyAV to decode them instead: '
                         f'{PYAV_HINT}') from None
    logger.info('video %s: decord decodes its frames as %s; decoding it with PyAV instead', what, wrong)
    errors = (av.error.FFmpegError, IndexError)

    def open_reader(threads: int) -> _AVReader:
        try:
            return _AVReader(av, source)
        except (av.error.FFmpegError, IndexError) as e:
            raise VideoError(f'cannot read video {what} with PyAV: {e}') from None

    try:
        return _decode(open_reader, pick, what, errors)
    except _WrongShape as e:  # not expected: PyAV converts to RGB itself
        raise VideoError(f'cannot read video {what}: PyAV decodes its frames as {e}') from None


def read_frames(video: VideoInput, sampling: FrameSampling = DEFAULT_SAMPLING, *, num_threads: int = 2,
                timeout: float = 30.0) -> list[Image.Image]:
    """Decode the sampled frames of one video (see :func:`sample_indices`) as RGB PIL images, in time order.

    Frames are sampled by the container's frame timestamps (see the module docstring) and decoded with decord;
    when decord decodes them to anything but ``(H, W, 3)`` uint8 RGB, the video is decoded with PyAV (an
    optional dependency) instead.

    Args:
        video: a file path (str or ``os.PathLike``), an http(s) URL, or the encoded bytes of a video file.
        sampling: which frames (:class:`FrameSampling`, see :func:`sample_indices`).
        num_threads: decoding threads for this video.
        timeout: seconds allowed for a URL download.

    Raises:
        VideoError: an empty, corrupt or unreadable video, or one without frames, or whose frames decord decodes
        to a wrong shape while PyAV is not installed (the message names the shape and ``pip install av``).
        FileNotFoundError: a path that does not exist. TypeError: an unsupported input. ImportError: decord is not
        installed.
    """
    decord = _decord()
    what = _what(video)
    data = _video_bytes(video, timeout)
    if data is None:
        path = Path(video)  # type: ignore[arg-type]
        if not path.is_file():
            raise FileNotFoundError(f'video file {str(video)!r} not found (looked in {path.resolve().parent})')
        if path.stat().st_size == 0:
            raise VideoError(f'cannot read video {what}: the file is empty (0 bytes)')
        uri: Any = os.fspath(path)
    elif not data:
        raise VideoError(f'cannot read video {what}: no data')
    errors = (decord.DECORDError, RuntimeError, IndexError, StopIteration)

    def open_reader(threads: int) -> Any:
        try:
            return decord.VideoReader(io.BytesIO(data) if data is not None else uri, ctx=decord.cpu(0),
                                      num_threads=threads)
        except AssertionError:  # decord asserts on a frame count of 0
            raise VideoError(f'cannot read video {what}: it has no frames') from None
        except (decord.DECORDError, RuntimeError) as e:
            raise VideoError(f'cannot read video {what}: {_reason(e)}') from None

    def pick(total: int, fps: float, times: np.ndarray | None = None) -> list[int]:
        return sample_indices(total, fps, sampling, timestamps=times)

    try:
        indices, frames = _decode(open_reader, pick, what, errors, num_threads)
    except _WrongShape as e:
        indices, frames = _decode_with_pyav(data if data is not None else uri, pick, what, e)
    logger.debug('video %s: frames %s', what, indices)
    return [Image.fromarray(np.ascontiguousarray(f)) for f in frames]


def as_video_batch(videos: VideoInput | Sequence[VideoInput]) -> list[VideoInput]:
    """One video input or a list of them -> a list."""
    if isinstance(videos, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [videos]
    if isinstance(videos, (list, tuple)):
        return list(videos)
    raise TypeError(f'video: expected {_ACCEPTED}, or a list of them; got {type(videos).__name__}')


_READ_ERRORS = (OSError, ValueError, TypeError)


def _read_ahead(videos: Sequence[VideoInput], load: Callable[[VideoInput], np.ndarray],
                num_workers: int, ahead: int) -> Iterator[tuple[int, VideoInput, np.ndarray | Exception]]:
    """Yield ``(index, video, frames or the read error)`` in input order, reading up to ``ahead`` videos ahead in
    ``num_workers`` threads (decord and PIL release the GIL), so reading overlaps the model's work."""
    def attempt(video: VideoInput) -> np.ndarray | Exception:
        try:
            return load(video)
        except _READ_ERRORS as e:
            return e

    if num_workers <= 1 or len(videos) <= 1:
        yield from ((i, v, attempt(v)) for i, v in enumerate(videos))
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix='cnclip-video') as pool:
        yield from map_ahead(lambda iv: (*iv, attempt(iv[1])), enumerate(videos), pool, ahead)


def _indexed(e: Exception, i: int) -> Exception:
    return type(e)(f'video[{i}]: {e}')


def _workers(num_workers: int) -> int:
    return num_workers or default_threads(4)


def _frame_loader(transform: ImageTransform, sampling: FrameSampling,
                  threads: int) -> Callable[[VideoInput], np.ndarray]:
    def load(video: VideoInput) -> np.ndarray:  # (F, R, R, 3) uint8, preprocessed exactly as images are
        frames = read_frames(video, sampling, num_threads=threads)
        return np.stack([transform.to_uint8(f) for f in frames])
    return load


def load_videos(videos: Sequence[VideoInput], transform: ImageTransform, sampling: FrameSampling = DEFAULT_SAMPLING,
                *, num_workers: int = 0) -> list[np.ndarray]:
    """Sample and resize the frames of each video -> one ``(F_i, R, R, 3)`` uint8 array per video (normalise with
    ``transform.normalize``). Errors name the failing ``video[index]``."""
    workers = _workers(num_workers)
    load = _frame_loader(transform, sampling, 1 if workers > 1 else 2)
    out = []
    for i, _, result in _read_ahead(list(videos), load, workers, 2 * workers):
        if isinstance(result, Exception):
            raise _indexed(result, i) from None
        out.append(result)
    return out


def pool_frames(frames: torch.Tensor, counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Mean-pool consecutive frame embeddings per video and renormalise: ``(sum(counts), D)`` -> ``(V, D)``."""
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if sum(counts) != len(frames) or any(c < 1 for c in counts):
        raise ValueError(f'frame counts {counts} do not split {len(frames)} frame embeddings (each video needs >= 1)')
    if not counts:
        return frames.new_empty(0, frames.shape[-1])
    return F.normalize(torch.stack([chunk.mean(0) for chunk in frames.split(counts)]), dim=-1)


def encode_videos(model: CNClip, videos: VideoInput | Sequence[VideoInput], sampling: FrameSampling = DEFAULT_SAMPLING,
                  *, batch_size: int = DEFAULT_BATCH, skip_errors: bool = False,
                  num_workers: int = 0) -> EncodedVideos:
    """Embed videos: sampled frames embedded as images, mean-pooled per video, renormalised.

    Frames of several videos share each model call; videos are read in ``num_workers`` threads ahead of it.

    Args:
        model: a loaded :class:`~modelscope_cnclip.CNClip`.
        videos: one video input (path, URL or bytes) or a list of them.
        sampling: which frames (:class:`FrameSampling`, see :func:`sample_indices`).
        batch_size: frames per model call.
        skip_errors: list the videos that cannot be read in ``failed`` (with the reason) and go on, instead of
            raising on the first.
        num_workers: threads reading videos (0: one per CPU, at most 4).

    Returns:
        ``(embeddings, failed)``: ``(N, D)`` float32 L2-normalised rows for the videos read, in input order, on the
        model's device, and a list of :class:`VideoFailure` ``(index, source, reason)`` (empty unless
        ``skip_errors``).

    Raises:
        VideoError, FileNotFoundError, TypeError: a video that cannot be read (message starts ``video[i]:``),
        unless ``skip_errors``.
    """
    items = as_video_batch(videos)
    workers = _workers(num_workers)
    load = _frame_loader(model.transform, sampling, 1 if workers > 1 else 2)
    failed: list[VideoFailure] = []
    outs: list[torch.Tensor] = []
    arrays: list[np.ndarray] = []

    def flush() -> None:
        pixels = model.transform.normalize(torch.from_numpy(np.concatenate(arrays)))  # (F, 3, R, R)
        outs.append(pool_frames(model.encode_image(pixels, batch_size=batch_size), [len(a) for a in arrays]))
        arrays.clear()

    for i, video, result in _read_ahead(items, load, workers, 2 * workers + batch_size // sampling.num_frames):
        if isinstance(result, Exception):
            if not skip_errors:
                raise _indexed(result, i) from None
            failed.append(VideoFailure(i, _what(video), str(result)))
            logger.warning('video[%d] %s skipped: %s', i, _what(video), result)
            continue
        arrays.append(result)
        if sum(len(a) for a in arrays) >= batch_size:
            flush()
    if arrays:
        flush()
    embeddings = torch.cat(outs) if outs else torch.empty(0, model.config.embed_dim, device=model.device)
    return EncodedVideos(embeddings, failed)
