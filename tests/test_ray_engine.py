"""jobs/ray_engine.py: the Ray engine fails like the local one: workers no node can hold are refused at once on a Ray
instance cnclip started (after a bounded wait on a cluster, which may grow), and errors raised in workers reach the
caller with their own type and message, so ``cnclip embed --engine ray`` exits as ``--engine local`` does. (That it
writes what the local engine writes: test_jobs.py.)

One local Ray instance (2 CPUs, bound to 127.0.0.1) serves the module; every test is bounded by an alarm.
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

import modelscope_cnclip.jobs.ray_engine as scale
import modelscope_cnclip.jobs.run as embed_mod
from modelscope_cnclip.cli import main
from modelscope_cnclip.embeddings import SHARDS
from modelscope_cnclip.jobs import ShardSettings
from modelscope_cnclip.jobs.ray_engine import WorkerRequest, unschedulable, worker_request
from modelscope_cnclip.video import FrameSampling

TEST_LIMIT_S = 180


@pytest.fixture(autouse=True)
def time_limit() -> Iterator[None]:
    """Fail a test that runs past TEST_LIMIT_S (a Ray job waiting for resources would otherwise wait forever)."""
    def expire(signum: int, frame: object) -> None:
        pytest.fail(f'still running after {TEST_LIMIT_S} s')
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope='module')
def own_ray() -> Iterator[object]:
    """The Ray instance run_ray starts when none is running (as ``cnclip embed --engine ray`` does), on 127.0.0.1."""
    ray = pytest.importorskip('ray')
    pytest.importorskip('ray.data')
    if ray.is_initialized():
        pytest.skip('this process is already connected to Ray')
    with pytest.MonkeyPatch.context() as mp:
        # Ray binds a node to the address it would reach other nodes from, unless told it is a one-machine cluster.
        mp.setenv('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
        mp.setattr(ray._private.ray_constants, 'ENABLE_RAY_CLUSTER', False)
        assert scale._connect(ray, None) is True
    assert {n['NodeManagerAddress'] for n in ray.nodes()} == {'127.0.0.1'}
    yield ray
    ray.shutdown()


@pytest.fixture()
def photo_dir(tmp_path: Path) -> Path:
    d = tmp_path / 'photos'
    d.mkdir()
    rs = np.random.RandomState(0)
    for n in range(3):
        Image.fromarray(rs.randint(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f'{n}.png')
    return d


def _error_line(err: str) -> str:
    """The CLI's one-line error (Ray may log other lines to stderr)."""
    lines = [line for line in err.splitlines() if line.startswith('cnclip embed: error: ')]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _embed(model: Path, photos: Path, out: Path, *options: str) -> int:
    return main(['embed', str(model), str(photos), '--out', str(out), '--no-progress', *options])


# --- item 1: workers no node can hold --------------------------------------------------------------------------------

def test_no_node_with_enough_gpus_is_found_per_node() -> None:
    """Cluster totals are not enough: a worker runs on one node."""
    two_gpu_nodes = [{'CPU': 8.0, 'GPU': 1.0}, {'CPU': 8.0, 'GPU': 1.0}]
    reason = unschedulable(WorkerRequest(1.0, 2.0), two_gpu_nodes, 'the Ray cluster at auto')
    assert reason == ('--gpus-per-worker 2 (gpus_per_worker=2) needs a node with 2 GPUs; the Ray cluster at auto has '
                      'at most 1 GPU on one node (2 nodes: 8 CPUs + 1 GPU, 8 CPUs + 1 GPU): lower --gpus-per-worker '
                      'to 1 or less, or drop it to run on CPUs')
    assert unschedulable(WorkerRequest(1.0, 1.0), two_gpu_nodes, 'x') is None
    assert unschedulable(WorkerRequest(1.0, 0.5), two_gpu_nodes, 'x') is None
    cpu_only = [{'CPU': 2.0}]
    assert unschedulable(WorkerRequest(1.0, 1.0), cpu_only, 'this Ray instance') == (
        '--gpus-per-worker 1 (gpus_per_worker=1) needs a node with 1 GPU; this Ray instance has 0 GPUs (CPUs: 2): '
        'drop --gpus-per-worker to run on CPUs, or use a cluster with GPUs')
    # GPUs on a node without CPUs, CPUs on a node without GPUs: no node has both.
    split = [{'CPU': 0.0, 'GPU': 1.0}, {'CPU': 4.0}]
    reason = unschedulable(WorkerRequest(1.0, 1.0), split, 'the Ray cluster')
    assert reason.startswith('a Ray worker needs a node with 1 CPU and 1 GPU; the Ray cluster has none (2 nodes: '
                             '0 CPUs + 1 GPU, 4 CPUs + 0 GPUs): give a node CPUs')


def test_cpu_workers_never_ask_for_more_than_the_largest_node() -> None:
    """One CPU worker on two 4-CPU nodes asks for 4 CPUs, not the cluster's 8 (which no node has)."""
    nodes = [{'CPU': 4.0}, {'CPU': 4.0}]
    assert worker_request(nodes, 1, 0.0) == WorkerRequest(4.0)
    assert worker_request(nodes, 4, 0.0) == WorkerRequest(2.0)
    assert worker_request([{'CPU': 0.0}], 1, 0.0) == WorkerRequest(1.0)  # a head node without CPUs: wait for one
    assert worker_request(nodes, 2, 1.0) == WorkerRequest(1.0, 1.0)
    assert all(unschedulable(worker_request(nodes, n, 0.0), nodes, 'x') is None for n in (1, 2, 3, 8))


def test_bad_options_are_refused_before_ray_starts(plugin_vit_dir: Path, photo_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked by the CLI's parser and embed_collection before anything is loaded or started."""
    ray = pytest.importorskip('ray')
    running = ray.is_initialized()

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError('Ray was started')
    monkeypatch.setattr(scale, '_connect', no_ray)
    with pytest.raises(SystemExit) as stop:
        _embed(plugin_vit_dir, photo_dir, tmp_path / 'a.emb', '--engine', 'ray', '--num-frames', '0')
    assert stop.value.code == 2
    with pytest.raises(SystemExit):
        _embed(plugin_vit_dir, photo_dir, tmp_path / 'b.emb', '--engine', 'ray', '--schedule-timeout', '-1')
    from modelscope_cnclip.jobs.run import embed_collection
    with pytest.raises(ValueError, match='num_frames'):
        embed_collection(plugin_vit_dir, photo_dir, tmp_path / 'c.emb', engine='ray',
                         settings=ShardSettings(sampling=FrameSampling(num_frames=0)))
    assert ray.is_initialized() == running


def test_ray_failures_without_an_error_of_their_own_are_one_line() -> None:
    """A task error Ray kept is itself; a worker killed (e.g. out of memory) is a one-line RuntimeError."""
    ray = pytest.importorskip('ray')
    cause = FileNotFoundError(2, 'No such file or directory', '/data/a.jpg')
    assert scale._ray_failure(ray, ray.exceptions.RayTaskError('f', 'remote traceback', cause)) is cause
    died = scale._ray_failure(ray, ray.exceptions.ActorDiedError())
    assert isinstance(died, RuntimeError) and '\n' not in str(died)
    assert str(died).startswith('the Ray job failed (ActorDiedError: The actor died unexpectedly')
    assert str(died).endswith('rerun the same command to finish it (the shards written so far are kept)')


@pytest.mark.ray
def test_own_instance_refuses_unschedulable_gpu_workers_at_once(own_ray, plugin_vit_dir: Path, photo_dir: Path,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Today Ray Data waits forever for a GPU that never comes; cnclip refuses before submitting any work."""
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError('work was submitted to Ray')
    monkeypatch.setattr(own_ray.data, 'from_items', no_work)
    gpus = max(n['Resources'].get('GPU', 0.0) for n in own_ray.nodes()) + 1  # 1 on a machine without GPUs
    cpus = own_ray.cluster_resources()['CPU']
    started = time.monotonic()
    assert _embed(plugin_vit_dir, photo_dir, tmp_path / 'gpu.emb', '--engine', 'ray',
                  '--gpus-per-worker', f'{gpus:g}') == 2
    assert time.monotonic() - started < 30
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f'cnclip embed: error: --gpus-per-worker {gpus:g} (gpus_per_worker={gpus:g}) needs a node '
                           f'with {gpus:g} GPU')
    if gpus == 1:
        assert line.endswith(f'this Ray instance has 0 GPUs (CPUs: {cpus:g}): drop --gpus-per-worker to run on CPUs, '
                             f'or use a cluster with GPUs')


@pytest.mark.ray
def test_own_instance_checks_each_node(own_ray, plugin_vit_dir: Path, photo_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 1-GPU nodes hold 2 GPUs in all, but a 2-GPU worker fits on neither."""
    monkeypatch.setattr(scale, '_alive_nodes', lambda ray: [{'CPU': 8.0, 'GPU': 1.0}, {'CPU': 8.0, 'GPU': 1.0}])
    assert _embed(plugin_vit_dir, photo_dir, tmp_path / 'two.emb', '--engine', 'ray', '--gpus-per-worker', '2') == 2
    assert 'this Ray instance has at most 1 GPU on one node' in _error_line(capsys.readouterr().err)


@pytest.mark.ray
def test_cluster_waits_for_a_node_then_gives_up(own_ray, plugin_vit_dir: Path, photo_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An external cluster (--ray-address) may grow: warn, wait --schedule-timeout seconds, then a one-line error."""
    monkeypatch.setattr(scale, '_POLL_S', 0.2)
    address = own_ray.get_runtime_context().gcs_address
    gpus = max(n['Resources'].get('GPU', 0.0) for n in own_ray.nodes()) + 1
    started = time.monotonic()
    assert _embed(plugin_vit_dir, photo_dir, tmp_path / 'wait.emb', '--engine', 'ray', '--ray-address', address,
                  '--gpus-per-worker', f'{gpus:g}', '--schedule-timeout', '1.5') == 2
    assert 1.5 <= time.monotonic() - started < 30
    line = _error_line(capsys.readouterr().err)
    assert line.startswith('cnclip embed: error: no node could hold a Ray worker after waiting 1.5 s '
                           f'(schedule_timeout, CLI: --schedule-timeout): --gpus-per-worker {gpus:g}')
    assert f'the Ray cluster at {address} has' in line
    assert any('Waiting up to 1.5 s (--schedule-timeout)' in r.getMessage() for r in caplog.records)
    # The placement group that asked an autoscaler for the node is gone.
    from ray.util import placement_group_table
    assert {g['state'] for g in placement_group_table().values()} <= {'REMOVED'}


@pytest.mark.ray
def test_cluster_wait_ends_when_a_node_joins(own_ray, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale, '_POLL_S', 0.1)
    views = iter([[{'CPU': 2.0}], [{'CPU': 2.0}], [{'CPU': 2.0}, {'CPU': 4.0, 'GPU': 1.0}]])
    last: list[dict[str, float]] = []

    def nodes(ray: object) -> list[dict[str, float]]:
        last[:] = next(views, last)
        return last
    monkeypatch.setattr(scale, '_alive_nodes', nodes)
    scale._wait_for_node(own_ray, WorkerRequest(1.0, 1.0), 'the Ray cluster', timeout=30)
    assert len(last) == 2


# --- item 2: errors raised in workers --------------------------------------------------------------------------------

def _replace_bytes(path: Path, data: bytes) -> None:
    """Swap ``path``'s content for ``data`` (a new file: a reader that mapped the old one keeps it)."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_bytes(data)
    tmp.replace(path)


@pytest.mark.ray
def test_model_unreadable_on_the_workers_is_reported_like_a_local_job(own_ray, plugin_vit_dir: Path, photo_dir: Path,
                                                                      tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver loads the model, the workers find it truncated: the same ValueError as a local job's load."""
    model = shutil.copytree(plugin_vit_dir, tmp_path / 'model')
    weights = model / 'model.safetensors'
    good = weights.read_bytes()
    _replace_bytes(weights, good[:len(good) // 2])
    assert _embed(model, photo_dir, tmp_path / 'local.emb') == 2
    local = _error_line(capsys.readouterr().err)
    assert 'model.safetensors: not a readable safetensors file' in local
    _replace_bytes(weights, good)
    run_ray = scale.run_ray

    def truncate_then_run(*args: object, **kwargs: object) -> None:
        _replace_bytes(weights, good[:len(good) // 2])
        run_ray(*args, **kwargs)
    monkeypatch.setattr(scale, 'run_ray', truncate_then_run)
    assert _embed(model, photo_dir, tmp_path / 'ray.emb', '--engine', 'ray') == 2
    assert _error_line(capsys.readouterr().err) == local


@pytest.fixture
def blocked_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every job's shards folder is a file: writing a shard fails with FileExistsError, locally or on a worker."""
    prepare = embed_mod._prepare_out

    def block_shards(out: Path, *args: object, **kwargs: object) -> list[int]:
        done = prepare(out, *args, **kwargs)
        (out / SHARDS).write_text('in the way')
        return done
    monkeypatch.setattr(embed_mod, '_prepare_out', block_shards)


@pytest.mark.ray
def test_shard_write_error_on_a_worker_is_reported_like_a_local_job(own_ray, blocked_shards, plugin_vit_dir: Path,
                                                                    photo_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A shard the worker cannot write (a file where the shards folder goes): the same OSError, exit 2."""
    assert _embed(plugin_vit_dir, photo_dir, tmp_path / 'local.emb') == 2
    local = _error_line(capsys.readouterr().err)
    assert local == f'cnclip embed: error: [Errno 17] File exists: \'{tmp_path / "local.emb" / SHARDS}\''
    assert _embed(plugin_vit_dir, photo_dir, tmp_path / 'ray.emb', '--engine', 'ray') == 2
    assert _error_line(capsys.readouterr().err) == local.replace('local.emb', 'ray.emb')


@pytest.mark.ray
def test_worker_error_keeps_its_type_and_worker_traceback(own_ray, blocked_shards, plugin_vit_dir: Path,
                                                          photo_dir: Path, tmp_path: Path) -> None:
    """The API raises the worker's exception itself; its note carries the worker's traceback for debugging."""
    from modelscope_cnclip.jobs.run import embed_collection
    with pytest.raises(FileExistsError) as info:
        embed_collection(plugin_vit_dir, photo_dir, tmp_path / 'api.emb', engine='ray')
    notes = getattr(info.value, '__notes__', None)
    if notes is not None:  # Python >= 3.11
        assert 'raised on the Ray worker on' in notes[0] and 'write_shard' in notes[0]
