"""Command line: ``cnclip <command>`` (also ``python -m modelscope_cnclip``).

Every command is a function over the plain Python API, registered with :func:`command` together with its
arguments; options that several commands share (the model and how it is loaded) are declared once below, and
choices and defaults come from the library's constants (:mod:`modelscope_cnclip.config`). Importing this module
imports neither torch nor ModelScope: a command imports what it uses when it runs. ``main(argv)`` takes an argument
list, so tests call it directly. Every output is named with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Sequence

from modelscope_cnclip import __version__
from modelscope_cnclip.config import (
    BACKENDS,
    DEFAULT_BATCH,
    DEFAULT_NUM_FRAMES,
    DEFAULT_SCHEDULE_TIMEOUT,
    DEFAULT_SHARD_SIZE,
    DIRECTIONS,
    ENGINES,
    EXPORT_FORMATS,
    EXPORT_PRECISIONS,
    LAYOUTS,
    MODALITIES,
    PRECISION_NAMES,
    SAMPLING_MODES,
)

__all__ = ['main', 'build_parser', 'command', 'COMMANDS']

logger = logging.getLogger('modelscope_cnclip')


# --- argument types ------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text) if text.strip().lstrip('+').isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a whole number >= 1, got {text!r}')
    return value


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f'expected a whole number >= 0, got {text!r}')
    return int(text)


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float('inf'):
        raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text!r}')
    return value


def _key_value(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition('=')
    if not sep or not key or not value:
        raise ValueError(f'{option} {text!r}: expected ROLE=NAME, e.g. {option} image=pic_path')
    return key, value


# --- declarations ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call, as data."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    name: str  # 'embed', or 'index build' for a sub-command of a group
    help: str
    args: tuple[Arg, ...]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
GROUPS = {'index': 'build, extend or describe a vector index of embeddings (needs faiss: modelscope_cnclip[index])'}


def command(name: str, help: str, *args: Arg) -> Callable[[Callable[[argparse.Namespace], int]],
                                                          Callable[[argparse.Namespace], int]]:
    """Register the decorated function as ``cnclip <name>`` with its arguments."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, args, run)
        return run
    return register


# Shared options, declared once.
MODEL = arg('model', help='a model: an architecture name from `cnclip models`, a model dir of any layout, a weights '
                          'file, a ModelScope hub id, or a dir written by `cnclip export`')
DEVICE = arg('--device', default='cpu', help='cpu, gpu, cuda:1, ... (default cpu)')
PRECISION = arg('--precision', choices=PRECISION_NAMES,
                help='fp32 (the default for checkpoints, exact), bf16 (fast on AVX512-BF16/AMX CPUs and GPUs), fp16 '
                     '(GPU); an exported dir runs in the precision it was exported in, or bf16 on OpenVINO')
BACKEND = arg('--backend', choices=BACKENDS,
              help='torch (checkpoints), onnxruntime, openvino, tensorrt (exported dirs; default: the export\'s own)')
CONFIG = arg('--config', help='architecture name (e.g. ViT-B-16) or config JSON, when the source does not describe '
                              'itself')
FAST_DECODE = arg('--fast-decode', action='store_true', help='reduced-size JPEG decoding (faster, slightly inexact)')
LOADED_MODEL = (MODEL, DEVICE, PRECISION, CONFIG, BACKEND)
BATCH_SIZE = arg('--batch-size', type=_positive_int, default=DEFAULT_BATCH,
                 help=f'inputs per forward pass (default {DEFAULT_BATCH})')
SKIP_ERRORS = arg('--skip-errors', action='store_true', help='skip unreadable images (each is reported)')
JSON = arg('--json', action='store_true', help='print JSON')


def _load(args: argparse.Namespace) -> Any:
    from modelscope_cnclip.inference import load
    return load(args.model, device=args.device, precision=args.precision, config=args.config,
                fast_decode=getattr(args, 'fast_decode', False), backend=args.backend)


# --- commands -------------------------------------------------------------------------------------------------------

@command('models', 'list the shipped architectures')
def _models(args: argparse.Namespace) -> int:
    from modelscope_cnclip.config import available_models, get_config
    for name in available_models():
        cfg = get_config(name)
        print(f'{name}\tembed_dim={cfg.embed_dim}\timage_size={cfg.vision.image_size}')
    return 0


@command('info', 'show the layout and architecture detected for a checkpoint (JSON; "guessed" lists config fields '
                 'the weights could not tell)', MODEL, CONFIG)
def _info(args: argparse.Namespace) -> int:
    from modelscope_cnclip.checkpoints import check_fits, read_source
    from modelscope_cnclip.runtime import is_export_dir, read_manifest
    if is_export_dir(args.model):  # an exported dir describes itself: its manifest
        print(json.dumps(read_manifest(args.model).to_dict(), ensure_ascii=False, indent=2))
        return 0
    ckpt = read_source(args.model, args.config)
    check_fits(ckpt)  # a --config that does not fit the weights is an error here too, not a report
    n = sum(t.numel() for t in ckpt.state_dict.values())
    print(json.dumps({'source': ckpt.source, 'layout': ckpt.layout, 'architecture': ckpt.name,
                      'parameters': n, 'config': ckpt.config.to_dict(), 'guessed': list(ckpt.guessed)},
                     ensure_ascii=False, indent=2))
    return 0


@command('convert', 'convert any checkpoint into a plugin, ModelScope hub or Hugging Face dir', MODEL,
         arg('--out', required=True, help='directory to write (must not exist or be empty, unless --overwrite)'),
         arg('--to', choices=LAYOUTS, default=LAYOUTS[0], help=f'target layout (default {LAYOUTS[0]})'), CONFIG,
         arg('--overwrite', action='store_true', help='replace a non-empty --out'),
         arg('--max-shard-size', help='split the weights into safetensors shards of at most this size plus an '
                                      'index, e.g. 2GB (plugin and hf layouts; hub stays one pytorch_model.bin)'))
def _convert(args: argparse.Namespace) -> int:
    from modelscope_cnclip.checkpoints import convert
    print(convert(args.model, args.out, to=args.to, config=args.config, overwrite=args.overwrite,
                  max_shard_size=args.max_shard_size))
    return 0


@command('export', 'export a checkpoint to ONNX, OpenVINO IR or TensorRT engines (dynamic batch; int8 calibrated '
                   'and gated on your data); the exported dir is a model source for every command',
         MODEL, arg('out', nargs='?', help='directory to write (or --out)'),
         arg('--out', dest='out_option', metavar='OUT', help='directory to write'),
         arg('--format', default=EXPORT_FORMATS[0], choices=EXPORT_FORMATS,
             help='onnx (default; ONNX Runtime and OpenVINO run it), openvino (IR), tensorrt (engines; on a GPU)'),
         arg('--precision', default='fp32', choices=EXPORT_PRECISIONS,
             help='fp32 (default, exact), fp16 (onnx, tensorrt: for GPUs), int8 (onnx, openvino: needs '
                  '--calibration; a tower that fails the accuracy gate stays fp32)'),
         arg('--calibration', help='int8: your images (a folder, a .jsonl/.csv of paths) or image-text pairs (an '
                                   'official-format dir, a .jsonl/.csv with image and text columns)'),
         arg('--calibration-split', default='valid', help='split of official-format calibration data (default valid)'),
         arg('--calibration-texts', help='int8: texts (.txt, one a line; or .jsonl/.csv) when --calibration has none'),
         arg('--calibration-size', type=_positive_int, default=300,
             help='calibration inputs per modality (default 300)'),
         arg('--min-cosine', type=float, default=0.99,
             help='int8 gate: mean cosine to fp32 at least this (default 0.99)'),
         arg('--max-r1-drop', type=_non_negative_float, default=1.0,
             help='int8 gate: R@1 at most this many points below fp32, each direction (default 1)'),
         arg('--max-batch', type=_positive_int, default=256, help='tensorrt: largest batch of the engine profile'),
         arg('--opset', type=_positive_int, default=17, help='ONNX opset (default 17)'), CONFIG,
         arg('--overwrite', action='store_true', help='replace a non-empty output dir'))
def _export(args: argparse.Namespace) -> int:
    from modelscope_cnclip.deploy import Int8Gate, export
    if (args.out is None) == (args.out_option is None):
        raise ValueError('give the output directory once: cnclip export MODEL OUT, or --out OUT')
    report = export(args.model, args.out or args.out_option, format=args.format, precision=args.precision,
                    calibration=args.calibration, calibration_split=args.calibration_split,
                    calibration_texts=args.calibration_texts, calibration_size=args.calibration_size,
                    gate=Int8Gate(args.min_cosine, args.max_r1_drop), max_batch=args.max_batch, opset=args.opset,
                    overwrite=args.overwrite, config=args.config)
    print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    return 0


@command('similarity', 'score one image against texts (softmax probabilities over the texts)', *LOADED_MODEL,
         FAST_DECODE, arg('image', help='image path or http(s) URL'), arg('texts', nargs='+', help='candidate texts'),
         arg('--json', action='store_true', help='print one JSON object {text: probability}'))
def _similarity(args: argparse.Namespace) -> int:
    probs = _load(args).probabilities(args.image, args.texts)[0].tolist()
    if args.json:
        print(json.dumps(dict(zip(args.texts, probs)), ensure_ascii=False))
    else:
        width = max(len(t) for t in args.texts)
        for text, p in sorted(zip(args.texts, probs), key=lambda tp: -tp[1]):
            print(f'{text:<{width}}  {p:.4f}')
    return 0


@command('eval', 'text-to-image and image-to-text retrieval R@1/5/10 and MR (official scoring)', *LOADED_MODEL,
         arg('--data', required=True, help='dir with {split}_imgs.tsv and {split}_texts.jsonl, or their LMDB form'),
         arg('--split', default='valid', help='default valid'), BATCH_SIZE,
         arg('--out', help='also write the official top-10 prediction files (t2i, i2t) and the i2t ground truth '
                           'there, for `cnclip score` or the official scorers; required for an unlabelled split '
                           '(texts with "image_ids": [], e.g. MUGE test), whose submission files are all it makes'))
def _eval(args: argparse.Namespace) -> int:
    from modelscope_cnclip.evaluation import evaluate_split
    print(json.dumps(evaluate_split(_load(args), args.data, args.split, batch_size=args.batch_size,
                                    predictions_dir=args.out)))
    return 0


@command('score', 'score an official top-10 prediction file (the official evaluation.py numbers)',
         arg('predictions', help='jsonl: {"text_id", "image_ids"} (t2i) or {"image_id", "text_ids"} (i2t)'),
         arg('ground_truth', help="the split's {split}_texts.jsonl (either direction) or an i2t .tr.jsonl"),
         arg('--direction', choices=DIRECTIONS, default=DIRECTIONS[0], help=f'default {DIRECTIONS[0]}'))
def _score(args: argparse.Namespace) -> int:
    from modelscope_cnclip.evaluation import score_predictions
    print(json.dumps({args.direction: score_predictions(args.predictions, args.ground_truth, args.direction)}))
    return 0


@command('zeroshot', 'zero-shot classification top-1/top-5 on an image folder (official method)', *LOADED_MODEL,
         arg('--images', required=True, help='dir with one sub-folder of images per class (sorted by name)'),
         arg('--labels', required=True, help='class names, one a line in the order of the sorted class folders; '
                                             'or "imagenet"'),
         arg('--templates', help='template set (openai, flower, ...), or a file with one template a line with {} '
                                 'for the class name (default: the official set of --dataset)'),
         arg('--dataset', default='imagenet', help='dataset name: picks the official templates and names the --out '
                                                   'file (default imagenet)'),
         arg('--out', help='write <dataset>.json there (the official ELEVATER prediction output)'),
         SKIP_ERRORS, BATCH_SIZE)
def _zeroshot(args: argparse.Namespace) -> int:
    from modelscope_cnclip.evaluation import (
        elevater_output,
        evaluate_zeroshot,
        read_classnames,
        templates,
        templates_for_dataset,
    )
    classnames = read_classnames(args.labels)
    name, prompts = (args.templates, templates(args.templates)) if args.templates else \
        templates_for_dataset(args.dataset)
    model = _load(args)
    res = evaluate_zeroshot(model, args.images, classnames, prompts, batch_size=args.batch_size,
                            skip_errors=args.skip_errors)
    if args.out:
        elevater_output(model, args.dataset, res['logits'], args.out)
    print(json.dumps({'top1': res['top1'], 'top5': res['top5'], 'n_images': res['n_images'],
                      'n_classes': res['n_classes'], 'templates': name, 'n_skipped': len(res['skipped'])},
                     ensure_ascii=False))
    return 0


@command('embed', 'embed a collection into an embeddings dir (sharded, resumable, errors reported)', *LOADED_MODEL,
         FAST_DECODE,
         arg('input', help='image/video folder (recursive), s3://... folder, .jsonl/.csv/.tsv of paths, URLs or '
                           'texts, official-format dir or its LMDB form'),
         arg('--out', required=True, help='embeddings dir to write (rerun the same command to resume)'),
         arg('--modality', default='auto', choices=('auto', *MODALITIES)),
         arg('--split', help='split of official/LMDB data (default valid)'),
         arg('--column', action='append', default=[], metavar='ROLE=NAME',
             help='jsonl/csv column for a role: id, image, video, text (repeatable)'),
         arg('--root', help='folder that relative paths in a jsonl/csv are relative to'),
         arg('--batch-size', type=_positive_int, help='default: 16 images / 64 texts on CPU, 256 / 512 on GPU'),
         arg('--shard-size', type=_positive_int, default=DEFAULT_SHARD_SIZE,
             help=f'inputs per output shard (default {DEFAULT_SHARD_SIZE})'),
         arg('--threads', type=_count, default=0, help='input decoding threads (default: one per CPU, max 8)'),
         arg('--overwrite', action='store_true', help='replace an embeddings dir of another job'),
         arg('--no-progress', action='store_true', help='no progress bar'),
         arg('--sampling-mode', default=SAMPLING_MODES[0], choices=SAMPLING_MODES,
             help='video frames: uniform (--num-frames segment centres, the default) or fps (--sample-fps a second, '
                  'at most --max-frames)'),
         arg('--num-frames', type=_positive_int, default=DEFAULT_NUM_FRAMES,
             help=f'video frames per video in uniform sampling (default {DEFAULT_NUM_FRAMES})'),
         arg('--sample-fps', type=float, default=1.0, help='fps sampling: frames per second (default 1)'),
         arg('--max-frames', type=_positive_int, help='fps sampling: at most this many frames a video'),
         arg('--engine', default=ENGINES[0], choices=ENGINES, help='ray: spread shards over Ray'),
         arg('--ray-address', help="Ray cluster: 'auto' on a cluster node, or ray://HEAD:10001"),
         arg('--ray-workers', type=_positive_int,
             help='Ray actors (default: one per GPU with --gpus-per-worker, else 1)'),
         arg('--gpus-per-worker', type=_non_negative_float, default=0.0, help='GPUs per Ray actor (0: CPU workers)'),
         arg('--schedule-timeout', type=_non_negative_float, metavar='SECONDS', default=DEFAULT_SCHEDULE_TIMEOUT,
             help=f'with --ray-address: how long to wait for a node that can hold a worker (an autoscaler may add '
                  f'one) before giving up (default {DEFAULT_SCHEDULE_TIMEOUT:g}); a Ray instance cnclip starts '
                  f'refuses at once'))
def _embed(args: argparse.Namespace) -> int:
    from modelscope_cnclip.jobs import RayOptions, ShardSettings, embed_collection
    from modelscope_cnclip.video import FrameSampling
    # The options are validated when these are made: a bad value stops here, before anything is loaded or started.
    sampling = FrameSampling(args.num_frames, args.sampling_mode, args.sample_fps, args.max_frames)
    settings = ShardSettings(args.shard_size, args.batch_size, args.threads, sampling)
    ray = RayOptions(args.ray_address, args.ray_workers, args.gpus_per_worker, args.schedule_timeout)
    columns = dict(_key_value(c, '--column') for c in args.column)
    report = embed_collection(
        args.model, args.input, args.out, modality=args.modality, split=args.split, columns=columns, root=args.root,
        settings=settings, engine=args.engine, ray=ray, overwrite=args.overwrite,
        progress=False if args.no_progress else None, device=args.device, precision=args.precision,
        fast_decode=args.fast_decode, backend=args.backend)
    print(json.dumps(report.to_dict(), ensure_ascii=False))
    return 0


@command('index build', 'index an embeddings dir (exact search up to 100,000 vectors, IVF above)',
         arg('embeddings', help='embeddings dir written by `cnclip embed`'),
         arg('--out', required=True, help='index dir to write'),
         arg('--kind', default='auto', help='auto (default), flat (exact), ivf, hnsw, ivfpq (compressed), or a faiss '
                                            'index_factory string such as "IVF1024,SQ8"'),
         arg('--nprobe', type=_positive_int, help='IVF lists searched per query (default: 3 sqrt(nlist))'),
         arg('--overwrite', action='store_true', help='replace an existing index dir'))
def _index_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modelscope_cnclip.index import Index
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:  # refused before building
        raise FileExistsError(f'{out} already exists; pass --overwrite to replace it, or choose another --out')
    index = Index.build(args.embeddings, kind=args.kind, **({'nprobe': args.nprobe} if args.nprobe else {}))
    index.save(out, overwrite=args.overwrite)
    print(f'{args.out}: {len(index)} vectors, kind {index.kind} ({index.factory}), '
          f'model {index.model.get("source")}')
    return 0


@command('index add', 'add an embeddings dir made by the same model to an index', arg('index', help='index dir'),
         arg('embeddings', help='embeddings dir written by `cnclip embed`'),
         arg('--skip-existing', action='store_true', help='skip ids already in the index (default: refuse)'))
def _index_add(args: argparse.Namespace) -> int:
    from modelscope_cnclip.index import Index
    index = Index.load(args.index)
    added = index.add_embeddings(args.embeddings, skip_existing=args.skip_existing)
    index.save(args.index, overwrite=True)  # its own index, updated in place
    print(f'{args.index}: added {added} vectors; it now holds {len(index)}')
    return 0


@command('index info', "print an index's meta.json (count, kind, model, params)", arg('index', help='index dir'))
def _index_info(args: argparse.Namespace) -> int:
    from modelscope_cnclip.index import read_meta
    print(json.dumps(read_meta(args.index), ensure_ascii=False, indent=2))
    return 0


@command('search', 'search an index by text or image with the model that built it',
         arg('index', help='index dir (`cnclip index build`)'),
         arg('query', help='text, or an image file / http(s) URL (image-to-image search)'),
         arg('--top-k', type=_positive_int, default=10, help='results (default 10)'),
         arg('--json', action='store_true', help='one JSON object per hit: {"id", "path", "score"}'),
         arg('--text', action='store_true', help='treat the query as text even if it names a file'),
         arg('--image', action='store_true', help='treat the query as an image'),
         arg('--model', help='model to embed the query with (default: the one the index records); its export too'),
         DEVICE, PRECISION, BACKEND)
def _search(args: argparse.Namespace) -> int:
    from modelscope_cnclip.index import Searcher
    if args.text and args.image:
        raise ValueError('--text and --image exclude each other: give one, or neither to guess from the query')
    searcher = Searcher.open(args.index, model=args.model, device=args.device, precision=args.precision,
                             backend=args.backend)
    hits = searcher.search(args.query, k=args.top_k, kind='text' if args.text else 'image' if args.image else None)
    if args.json:
        for hit in hits:
            print(json.dumps(hit.to_dict(), ensure_ascii=False))
    else:
        print(f'{"rank":>4}  {"score":>7}  path')
        for hit in hits:
            print(f'{hit.rank:>4}  {hit.score:>7.4f}  {hit.path}')
    return 0


def _replica_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(':')
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected MIN:MAX replicas, e.g. 1:4, got {text!r}') from None


@command('serve', 'serve embeddings, ranking and search over HTTP (OpenAI embeddings API; batched; Ray Serve)',
         *LOADED_MODEL,
         arg('--index', help='an index dir (`cnclip index build`) made by this model, for POST /v1/search'),
         arg('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1; 0.0.0.0 exposes it)'),
         arg('--port', type=int, default=8000, help='port (default 8000; 0 picks a free one)'),
         arg('--api-key', help='require "Authorization: Bearer KEY" (prefer the CNCLIP_API_KEY environment variable: '
                               'a flag is visible in the process list)'),
         arg('--model-name', default='cnclip', help='the model id clients name (default cnclip)'),
         arg('--max-batch-size', type=_positive_int, default=32,
             help='items per model batch, merged across concurrent requests (default 32)'),
         arg('--batch-wait-ms', type=_non_negative_float, default=5.0,
             help='longest wait for a batch to fill, ms (default 5)'),
         arg('--max-items', type=_positive_int, default=256, help='items per request (default 256)'),
         arg('--max-body-mb', type=_positive_int, default=64, help='request body limit, MiB (default 64)'),
         arg('--max-text-chars', type=_positive_int, default=2000, help='characters per text (default 2000)'),
         arg('--allow-urls', action='store_true',
             help='fetch http(s) image URLs (public addresses only; off by default)'),
         arg('--url-timeout', type=_non_negative_float, default=10.0, help='seconds per image URL (default 10)'),
         arg('--decode-threads', type=int, default=0, help='image decoding threads (default: one per core, <= 8)'),
         arg('--drain-timeout', type=_non_negative_float, default=30.0,
             help='seconds in-flight requests may take after SIGTERM (default 30)'),
         arg('--read-timeout', type=_non_negative_float, default=30.0,
             help='seconds a client has to send its request headers (then the connection is closed) and its body '
                  '(then 408) (default 30)'),
         arg('--limit-concurrency', type=_positive_int, default=1024,
             help='connections and requests at once; more get 503 (default 1024)'),
         arg('--engine', choices=('local', 'ray'), default='local',
             help='local: this process (default); ray: replicas on Ray Serve'),
         arg('--replicas', type=_positive_int, default=1, help='ray: replicas (default 1)'),
         arg('--autoscale', type=_replica_range, metavar='MIN:MAX', help='ray: autoscale between MIN and MAX replicas'),
         arg('--gpus-per-replica', type=_non_negative_float, default=0.0,
             help='ray: GPUs per replica (a GPU replica loads the model on cuda)'),
         arg('--cpus-per-replica', type=_non_negative_float, default=1.0, help='ray: CPUs per replica (default 1)'),
         arg('--ray-address', help='ray: cluster address (default: start a local Ray instance)'))
def _serve(args: argparse.Namespace) -> int:
    from modelscope_cnclip.serve.server import ModelSpec, RayServeOptions, serve_local, serve_ray
    from modelscope_cnclip.serve.settings import MiB, ServeSettings
    settings = ServeSettings(host=args.host, port=args.port, model_name=args.model_name, api_key=args.api_key,
                             max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                             max_items=args.max_items, max_body_bytes=args.max_body_mb * MiB,
                             max_text_chars=args.max_text_chars, allow_urls=args.allow_urls,
                             url_timeout_s=args.url_timeout, decode_threads=args.decode_threads,
                             drain_timeout_s=args.drain_timeout, read_timeout_s=args.read_timeout,
                             limit_concurrency=args.limit_concurrency)
    if args.engine != 'ray':
        ray_only = (('--replicas', args.replicas, 1), ('--autoscale', args.autoscale, None),
                    ('--gpus-per-replica', args.gpus_per_replica, 0.0),
                    ('--cpus-per-replica', args.cpus_per_replica, 1.0), ('--ray-address', args.ray_address, None))
        given = [flag for flag, value, default in ray_only if value != default]
        if given:
            raise ValueError(f'{", ".join(given)} apply to --engine ray only')
    spec = ModelSpec(args.model, {'device': args.device, 'precision': args.precision, 'config': args.config,
                                  'backend': args.backend}, args.index)
    if args.engine == 'ray':
        return serve_ray(spec, settings, RayServeOptions(
            address=args.ray_address, replicas=args.replicas, autoscale=args.autoscale,
            gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica))
    return serve_local(spec, settings)


@command('demo', 'open the retrieval demo (Gradio): text and image search over a gallery, zero-shot, scoring',
         *LOADED_MODEL,
         arg('--gallery', help='a folder of photos: indexed once (progress bar), reused while it is unchanged'),
         arg('--index', help='an index dir built before (`cnclip index build`) instead of --gallery'),
         arg('--cache',
             help='where gallery indexes are kept (default $CNCLIP_CACHE or ~/.cache/modelscope_cnclip)'),
         arg('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1)'),
         arg('--port', type=int, default=7860, help='port (default 7860)'),
         arg('--top-k', type=_positive_int, default=12, help='results shown by default (default 12)'),
         arg('--title', default='Chinese CLIP 图文检索', help='page title'))
def _demo(args: argparse.Namespace) -> int:
    from modelscope_cnclip.demo.app import MAX_UPLOAD, build_demo, gallery_index
    if args.gallery and args.index:
        raise ValueError('--gallery and --index exclude each other: a folder of photos, or an index built before')
    model = _load(args)
    index = None
    if args.gallery:
        index = gallery_index(model, args.gallery, cache_dir=args.cache, progress=True)
    elif args.index:
        from modelscope_cnclip.index import Index
        index = Index.load(args.index)
    app = build_demo(model, index, title=args.title, top_k=args.top_k)
    # results are sent as thumbnails (no file access); uploads above max_file_size are refused by Gradio itself
    app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)
    return 0


@command('train', 'finetune with the ModelScope trainer; <out>/output is a plugin model dir', MODEL,
         arg('--data', required=True, help='official-format dir (train split), dir with train.jsonl, or .jsonl'),
         arg('--eval-data', help='evaluation data (default: --data, valid split)'),
         arg('--out', help="the work dir: logs, checkpoints and output/ (default: the --cfg file's train.work_dir, "
                           "else ./work)"),
         arg('--cfg', help="configuration.json with train/evaluation settings (e.g. the tutorial's)"),
         arg('--max-epochs', type=_positive_int), arg('--batch-size', type=_positive_int, help='per device'),
         arg('--lr', type=_non_negative_float),
         arg('--loader-workers', type=_count, default=2, help='DataLoader worker processes per device (default 2)'),
         arg('--device', default=None, help='cpu, gpu, cuda:1 (default: GPU if available)'),
         arg('--mask-ratio', type=float, default=0.0, help='FLIP patch masking ratio (ViT only)'),
         arg('--freeze-vision', action='store_true', help='train the text tower only'),
         arg('--grad-checkpointing', action='store_true', help='less activation memory, more compute'), SKIP_ERRORS,
         arg('--amp', choices=('bf16', 'fp16'), help='mixed precision: bf16 (CPU or GPU) or fp16 (GPU)'),
         arg('--accum-freq', type=_positive_int, default=1,
             help='run each batch in this many chunks, keeping the whole batch as negatives (cached features)'),
         arg('--resume', action='store_true',
             help='continue from the newest complete epoch checkpoint in the work dir (after a crash or kill)'))
def _train(args: argparse.Namespace) -> int:
    from modelscope.trainers import build_trainer

    from modelscope_cnclip.ms import TRAINER_TYPE
    train: dict[str, Any] = {'dataloader': {'workers_per_gpu': args.loader_workers}}
    if args.max_epochs is not None:
        train['max_epochs'] = args.max_epochs
    if args.batch_size is not None:
        train['dataloader']['batch_size_per_gpu'] = args.batch_size
    if args.lr is not None:
        train['optimizer_hparams'] = {'lr': args.lr}
    overrides = {'train': train, 'evaluation': {'dataloader': {'workers_per_gpu': args.loader_workers}}}
    trainer = build_trainer(TRAINER_TYPE, dict(
        model=args.model, cfg_file=args.cfg, work_dir=args.out, train_dataset=args.data,
        eval_dataset=args.eval_data or args.data, cfg_overrides=overrides, device=args.device,
        mask_ratio=args.mask_ratio, freeze_vision=args.freeze_vision, grad_checkpointing=args.grad_checkpointing,
        skip_errors=args.skip_errors, accum_freq=args.accum_freq, amp=args.amp))
    checkpoint = None
    if args.resume:
        from modelscope_cnclip.train import latest_checkpoint
        checkpoint = latest_checkpoint(trainer.work_dir)
        logging.getLogger(__name__).warning('resuming from %s' if checkpoint else 'nothing to resume in %s%s',
                                            checkpoint or trainer.work_dir, '' if checkpoint else ': starting')
    trainer.train(checkpoint_path=str(checkpoint) if checkpoint else None)
    print(json.dumps(trainer.evaluate()))
    return 0


# --- the parser -----------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``cnclip embed: error: ...``), like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """Options every command accepts, before or after its name (a sub-command's default never hides the top's)."""
    default = {} if top else {'default': argparse.SUPPRESS}
    parser.add_argument('-v', '--verbose', action='store_true', help='log progress (INFO level)', **default)
    parser.add_argument('--max-image-pixels', metavar='N', help='refuse images with more pixels than N (a '
                        'decompression-bomb guard; default: PIL\'s 89478485; "none" for no limit); also read from '
                        'CNCLIP_MAX_IMAGE_PIXELS', **({'default': None} if top else default))


def build_parser() -> argparse.ArgumentParser:
    """The ``cnclip`` parser, built from :data:`COMMANDS`."""
    parser = _Parser(prog='cnclip', description='Chinese CLIP for ModelScope.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    _common(parser, top=True)
    sub = parser.add_subparsers(dest='command', required=True, metavar='command')
    groups: dict[str, Any] = {}
    for cmd in COMMANDS.values():
        group, _, leaf = cmd.name.rpartition(' ')
        where = sub
        if group:
            if group not in groups:
                g = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group])
                groups[group] = g.add_subparsers(dest=f'{group}_command', required=True, metavar='command')
            where = groups[group]
        p = where.add_parser(leaf, help=cmd.help, description=cmd.help)
        for a in cmd.args:
            p.add_argument(*a.flags, **a.options)
        _common(p, top=False)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 with a one-line message for bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(levelname)s %(name)s: %(message)s')
    try:
        if args.max_image_pixels is not None:
            from modelscope_cnclip.transform import set_max_image_pixels
            set_max_image_pixels(args.max_image_pixels)
        return args.run(args)
    except (ValueError, TypeError, ImportError, OSError) as e:
        if args.verbose:
            raise
        print(f'cnclip {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
