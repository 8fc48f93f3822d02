"""Side-by-side embedding benchmark: this plugin against its peers and the machine's matmul ceilings, in one process.

    python benchmarks/bench_embed.py                       # ViT-B-16 size, batch 16, 2 threads, CPU
    python benchmarks/bench_embed.py --memory ViT-B-16 ViT-L-14 ViT-H-14   # + peak RSS per size (subprocesses)

Peers (same random weights, same decoded PIL images and Python strings, same threads):
  * transformers ``ChineseCLIPModel`` with its own processor (pads to the longest text): always;
  * the official ``cn_clip`` package (fp32): when it imports (it needs torchvision);
  * ModelScope's built-in CLIP: its pipeline when it imports; otherwise the same work its pipeline does
    (``CLIPForMultiModalEmbedding`` + its ``FullTokenizer`` padding to 52 + the torchvision transform) when those
    import; otherwise skipped with a note.
Ratios are against the ModelScope built-in and against the fp32/bf16 matmul ceilings measured in the same run.
Prints a markdown report; ``--out FILE`` also writes it.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import PEAK_RSS_GB, emit, header  # noqa: E402

from modelscope_cnclip import get_config, load  # noqa: E402
from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir  # noqa: E402
from modelscope_cnclip.config import CLIPConfig  # noqa: E402
from modelscope_cnclip.inference import encode_images  # noqa: E402
from modelscope_cnclip.model import CLIP  # noqa: E402

logger = logging.getLogger('bench')
DEVICE = torch.device('cpu')  # set from --device in main()


def _sync() -> None:
    if DEVICE.type == 'cuda':
        torch.cuda.synchronize()

SHORT_QUERIES = ['杰尼龟', '妙蛙种子', '小火龙', '皮卡丘', '海边的日落', '一只橘猫', '红色连衣裙', '雪山', '故宫',
                 '熊猫吃竹子', '夜晚的城市', '一碗拉面', '足球比赛', '樱花盛开', '咖啡拿铁', '儿童自行车', '蓝色跑车',
                 '古风汉服', '长城', '生日蛋糕', '金毛犬', '沙漠骆驼', '荷花', '高铁']


# --- measurement helpers ----------------------------------------------------------------------------------------

def timed(fn: Callable[[], Any], reps: int) -> float:
    """Fastest of ``reps`` calls after one warm-up call (the least disturbed run on a shared machine; used for
    every system and for the ceilings alike)."""
    fn()
    _sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(fns: list[Callable[[], Any]], reps: int) -> list[float]:
    """Fastest time of each of ``fns`` over ``reps`` rounds that call every one of them once (after a warm-up
    round): unlike timing one system after another, a slow spell of a shared machine slows all systems alike."""
    for fn in fns:
        fn()
    _sync()
    best = [float('inf')] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            _sync()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def gemm_ceiling(dtype: torch.dtype, shapes: list[tuple[int, int, int]], reps: int = 3) -> float:
    """Best GFLOP/s of ``F.linear`` over ``shapes`` (M, K, N) in ``dtype``."""
    best = 0.0
    for m, k, n in shapes:
        a, w = torch.randn(m, k, device=DEVICE).to(dtype), torch.randn(n, k, device=DEVICE).to(dtype)
        sec = timed(lambda a=a, w=w: F.linear(a, w), reps)
        best = max(best, 2 * m * k * n / sec / 1e9)
    return best


def vit_image_gflop(cfg: CLIPConfig) -> float:
    """Forward GFLOP of one image through a ViT tower (all blocks on all tokens, as the peers compute it)."""
    v = cfg.vision
    n = (v.image_size // v.patch_size) ** 2 + 1
    macs = (n - 1) * v.width * 3 * v.patch_size ** 2  # patch embedding
    macs += v.layers * (12 * n * v.width ** 2 + 2 * n * n * v.width)  # qkv+out+mlp, attention
    macs += v.width * cfg.embed_dim
    return 2 * macs / 1e9


def iter_photos(n: int, size: tuple[int, int], seed: int = 0) -> Iterator[Image.Image]:
    """Smooth random "photos" (decoded PIL RGB images), made one at a time."""
    rs = np.random.RandomState(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(n):
        chans = [np.sin(x / rs.uniform(5, 80) + rs.uniform(0, 6)) * np.cos(y / rs.uniform(5, 80)) for _ in range(3)]
        arr = (np.stack(chans, -1) * 0.4 + 0.5 + rs.normal(0, 0.03, (h, w, 3)).astype(np.float32)).clip(0, 1)
        yield Image.fromarray((arr * 255).astype(np.uint8))


def make_photos(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    return list(iter_photos(n, size, seed))


def spread_weights(cfg: CLIPConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights spread like the golden tests' (plain init embeds every input almost identically, which
    would make any retrieval comparison meaningless)."""
    sys.path.insert(0, str(REPO / 'tests'))
    from golden.weights import make_state_dict, spec_from_state_dict
    with torch.device('meta'):
        spec = spec_from_state_dict(CLIP(cfg).state_dict())
    sd = make_state_dict(spec, seed)
    sd['logit_scale'] = sd['logit_scale'].reshape(())
    return sd


# --- peers ---------------------------------------------------------------------------------------------------------

class System:
    def __init__(self, name: str, images: Callable[[list], Any], texts: Callable[[list], Any],
                 embed: Callable[[list, list], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.name, self.images, self.texts, self.embed = name, images, texts, embed


def ours(model_dir: Path, precision: str, batch: int) -> System:
    m = load(model_dir, device=DEVICE, precision=precision)
    return System(f'modelscope_cnclip {precision}', lambda ims: m.encode_image(ims, batch_size=batch),
                  lambda txs: m.encode_text(txs, batch_size=batch),
                  lambda ims, txs: (m.encode_image(ims, batch_size=batch), m.encode_text(txs, batch_size=batch)))


def hf_peer(hf_dir: Path) -> System:
    from transformers import AutoTokenizer, ChineseCLIPModel
    try:
        from transformers import ChineseCLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import ChineseCLIPImageProcessor as Proc
    model = ChineseCLIPModel.from_pretrained(hf_dir).eval().to(DEVICE)
    proc = Proc.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)

    def feats(out: Any) -> torch.Tensor:
        return F.normalize(getattr(out, 'pooler_output', out), dim=-1)

    @torch.inference_mode()
    def images(ims: list) -> torch.Tensor:
        return feats(model.get_image_features(pixel_values=proc(images=ims, return_tensors='pt')['pixel_values']
                                              .to(DEVICE)))

    @torch.inference_mode()
    def texts(txs: list) -> torch.Tensor:
        enc = tok(txs, padding=True, truncation=True, max_length=52, return_tensors='pt').to(DEVICE)
        return feats(model.get_text_features(input_ids=enc['input_ids'], attention_mask=enc['attention_mask']))

    return System('transformers ChineseCLIPModel fp32', images, texts, lambda i, t: (images(i), texts(t)))


def official_peer(hub_dir: Path, sd: dict[str, torch.Tensor]) -> System:
    import cn_clip.clip as clip
    from cn_clip.clip.model import CLIP as OfficialCLIP
    cfg = {**json.loads((hub_dir / 'vision_model_config.json').read_text()),
           **json.loads((hub_dir / 'text_model_config.json').read_text())}
    model = OfficialCLIP(**cfg)
    model.load_state_dict(sd, strict=True)  # fp32 weights, not the fp16-rounding loader
    model.float().eval()
    transform = clip.image_transform(cfg['image_resolution'])

    @torch.inference_mode()
    def images(ims: list) -> torch.Tensor:
        return F.normalize(model.encode_image(torch.stack([transform(im) for im in ims])), dim=-1)

    @torch.inference_mode()
    def texts(txs: list) -> torch.Tensor:
        return F.normalize(model.encode_text(clip.tokenize(txs, context_length=52)), dim=-1)

    return System('official cn_clip 1.6 fp32', images, texts, lambda i, t: (images(i), texts(t)))


def builtin_peer(hub_dir: Path) -> System:
    """ModelScope's built-in CLIP, as its pipeline runs it."""
    try:
        from modelscope.pipelines.multi_modal.multi_modal_embedding_pipeline import MultiModalEmbeddingPipeline
        pipe = MultiModalEmbeddingPipeline(str(hub_dir), device='cpu')
        name = 'ModelScope built-in pipeline'
        run_img = lambda ims: pipe.forward({'img': ims})['img_embedding']  # noqa: E731
        run_txt = lambda txs: pipe.forward({'text': txs})['text_embedding']  # noqa: E731
    except Exception as e:  # the pipeline module pulls the OFA stack, which breaks on transformers 5
        logger.info('built-in pipeline unavailable (%s); composing its parts', type(e).__name__)
        from modelscope.models.multi_modal.clip.model import CLIPForMultiModalEmbedding
        from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor
        model = CLIPForMultiModalEmbedding(str(hub_dir))
        tok = model.tokenizer
        res = model.model_info['image_resolution']
        tf = Compose([Resize((res, res), interpolation=InterpolationMode.BICUBIC), lambda im: im.convert('RGB'),
                      ToTensor(), Normalize((0.48145466, 0.4578275, 0.40821073),
                                            (0.26862954, 0.26130258, 0.27577711))])

        def tokenize(txs: list) -> torch.Tensor:
            ids = torch.zeros(len(txs), 52, dtype=torch.long)
            for i, t in enumerate(txs):
                row = [tok.vocab['[CLS]']] + tok.convert_tokens_to_ids(tok.tokenize(t))[:50] + [tok.vocab['[SEP]']]
                ids[i, :len(row)] = torch.tensor(row)
            return ids

        name = 'ModelScope built-in (model class + its tokenizer + torchvision transform)'
        run_img = lambda ims: model.forward({'img': torch.stack([tf(im) for im in ims])})['img_embedding']  # noqa
        run_txt = lambda txs: model.forward({'text': tokenize(txs)})['text_embedding']  # noqa: E731
    img = torch.inference_mode()(run_img)
    txt = torch.inference_mode()(run_txt)
    return System(name, img, txt, lambda i, t: (img(i), txt(t)))


# --- sections --------------------------------------------------------------------------------------------------

def section_throughput(args: argparse.Namespace, work: Path, report: list[str]) -> None:
    cfg = get_config(args.arch)
    sd = spread_weights(cfg)
    ckpt = Checkpoint(sd, cfg)
    plugin = write_dir(ckpt, work / 'plugin')
    hub = write_dir(ckpt, work / 'hub', to='hub')
    hf = write_dir(ckpt, work / 'hf', to='hf') if not cfg.vision.is_resnet else None
    photos = make_photos(args.batch, (640, 480))
    queries = SHORT_QUERIES[:args.batch]

    shapes = [(4096, 4096, 4096), (3152, 768, 3072), (2048, 2048, 2048)]
    fp32_ceiling, bf16_ceiling = gemm_ceiling(torch.float32, shapes), gemm_ceiling(torch.bfloat16, shapes)
    gflop = vit_image_gflop(cfg) if not cfg.vision.is_resnet else float('nan')

    systems: list[System] = []
    notes: list[str] = []
    peers = [('builtin', lambda: builtin_peer(hub)), ('official', lambda: official_peer(hub, sd)),
             ('transformers', lambda: hf_peer(hf))]
    if DEVICE.type != 'cpu':  # the official and built-in peers are measured on the CPU only
        notes.append('- builtin, official: CPU-only in this benchmark (run without --device for them)')
        peers = peers[2:]
    for label, make in peers:
        try:
            systems.append(make())
        except Exception as e:
            notes.append(f'- {label}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})')
    exact = ours(plugin, 'fp32', args.batch)
    fast = ours(plugin, 'bf16', args.batch)
    systems += [exact, fast]
    if DEVICE.type == 'cuda':
        systems.append(ours(plugin, 'fp16', args.batch))

    # Round robin: every repetition times each system once, so slow phases of a shared machine hit all alike.
    img_t = interleaved([lambda s=s: s.images(photos) for s in systems], args.reps)
    txt_t = interleaved([lambda s=s: s.texts(queries) for s in systems], max(args.reps, 15))  # short calls
    rows = []
    for s, ti, tt in zip(systems, img_t, txt_t):
        rows.append((s.name, args.batch / ti, len(queries) / tt))
        logger.info('%s: %.2f images/s, %.1f texts/s', s.name, rows[-1][1], rows[-1][2])
    gc.collect()
    base = next((r for r in rows if r[0].startswith('ModelScope')), None)
    # Measured again after the systems; the higher reading is kept, so the ratios are conservative.
    fp32_ceiling = max(fp32_ceiling, gemm_ceiling(torch.float32, shapes))
    bf16_ceiling = max(bf16_ceiling, gemm_ceiling(torch.bfloat16, shapes))

    report.append(f'## Throughput: {args.arch}, batch {args.batch}, {args.threads} threads, end to end from '
                  f'decoded 640x480 PIL images and short Chinese queries\n')
    report.append(f'fp32 matmul ceiling: **{fp32_ceiling:.0f} GFLOP/s** = {fp32_ceiling / gflop:.2f} images/s at '
                  f'{gflop:.1f} GFLOP/image; bf16 matmul ceiling: **{bf16_ceiling:.0f} GFLOP/s** '
                  f'= {bf16_ceiling / gflop:.2f} images/s.\n')
    report.append('| system | images/s | x built-in | x fp32 ceiling | x bf16 ceiling | texts/s | x built-in |')
    report.append('|---|---|---|---|---|---|---|')
    for name, img_s, txt_s in rows:
        bi = f'{img_s / base[1]:.2f}' if base else 'n/a'
        bt = f'{txt_s / base[2]:.2f}' if base else 'n/a'
        report.append(f'| {name} | {img_s:.2f} | {bi} | {img_s * gflop / fp32_ceiling:.2f} | '
                      f'{img_s * gflop / bf16_ceiling:.2f} | {txt_s:.1f} | {bt} |')
    if notes:
        report.append('\nPeers not measured:\n' + '\n'.join(notes))

    # Fast mode accuracy: cosine to exact mode, and top-1 agreement of text->image retrieval.
    more_photos = make_photos(args.retrieval, (320, 240), seed=1)
    more_texts = [f'{a}{b}' for a in SHORT_QUERIES for b in ('的照片', '', '特写', '在户外')][:args.retrieval]
    ei, et = exact.embed(more_photos, more_texts)
    fi, ft = fast.embed(more_photos, more_texts)
    cos_i, cos_t = (ei * fi).sum(-1), (et * ft).sum(-1)
    agree_t2i = (et @ ei.T).argmax(1).eq((ft @ fi.T).argmax(1)).float().mean().item() * 100
    agree_i2t = (ei @ et.T).argmax(1).eq((fi @ ft.T).argmax(1)).float().mean().item() * 100
    report.append(f'\nFast mode (bf16) vs exact (fp32) on {args.retrieval} images and {args.retrieval} texts: '
                  f'image cosine min {cos_i.min():.5f} (mean {cos_i.mean():.5f}), text cosine min {cos_t.min():.5f} '
                  f'(mean {cos_t.mean():.5f}); retrieval top-1 agreement text->image {agree_t2i:.1f}%, '
                  f'image->text {agree_i2t:.1f}% (exact mode taken as ground truth: R@1 moves by at most '
                  f'{100 - min(agree_t2i, agree_i2t):.1f} points).\n')

    section_input_pipeline(args, exact, fast, work, report)


def section_input_pipeline(args: argparse.Namespace, exact: System, fast: System, work: Path,
                           report: list[str]) -> None:
    """A folder of 12 MP JPEG photos: decoding overlapped with the model, and the reduced-size decode."""
    folder = work / 'photos'
    folder.mkdir()
    for i, im in enumerate(iter_photos(args.photos, (4000, 3000), seed=2)):
        im.save(folder / f'{i:03d}.jpg', quality=90)
    paths = sorted(folder.glob('*.jpg'))
    report.append(f'## Input pipeline: {len(paths)} JPEG photos of 4000x3000 (12 MP) from disk, batch {args.batch}\n')
    report.append('| mode | model only, images/s | end to end, images/s | share of model-only |')
    report.append('|---|---|---|---|')
    m32 = load(work / 'plugin', device=DEVICE, precision='fp32')
    m16 = load(work / 'plugin', device=DEVICE, precision='bf16')
    mfast = load(work / 'plugin', device=DEVICE, precision='bf16', fast_decode=True)
    m32fast = load(work / 'plugin', device=DEVICE, precision='fp32', fast_decode=True)
    pixels = m32.transform.batch(paths[:args.batch])
    n = len(paths)
    for label, model, e2e_model, threads in [
            ('fp32, exact decode, sequential', m32, m32, 1),
            ('fp32, exact decode, prefetch threads', m32, m32, 0),
            ('fp32, reduced-size decode, prefetch', m32, m32fast, 0),
            ('bf16, exact decode, prefetch threads', m16, m16, 0),
            ('bf16, reduced-size decode, prefetch', m16, mfast, 0)]:
        model_only = args.batch / timed(lambda model=model: model.encode_image(pixels, batch_size=args.batch), 2)
        t = time.perf_counter()
        encode_images(e2e_model.model, e2e_model.transform, paths, batch_size=args.batch, num_threads=threads)
        _sync()
        e2e = n / (time.perf_counter() - t)
        report.append(f'| {label} | {model_only:.2f} | {e2e:.2f} | {e2e / model_only:.0%} |')
    exact_emb = m32.encode_image(paths)
    draft_emb = m32fast.encode_image(paths)
    cos = (exact_emb * draft_emb).sum(-1)
    report.append(f'\nReduced-size JPEG decode (`fast_decode=True`, `--fast-decode`): embedding cosine to the exact '
                  f'decode min {cos.min():.5f}, mean {cos.mean():.5f} (fp32 model, these photos).\n')


def section_memory(args: argparse.Namespace, work: Path, report: list[str]) -> None:
    """Peak RSS of a fresh process that loads each size from a plugin dir and embeds 4 images + 4 texts."""
    report.append('## Memory: fresh process, load plugin dir (safetensors) + embed 4 images and 4 texts, fp32\n')
    report.append('| model | parameters | weights on disk | load s | peak RSS | peak RSS, bf16 |')
    report.append('|---|---|---|---|---|---|')
    for arch in args.memory:
        d = work / f'mem-{arch}'
        cfg = get_config(arch)
        with torch.device('meta'):
            shapes = {k: (t.shape, t.dtype) for k, t in CLIP(cfg).state_dict().items()}
        g = torch.Generator().manual_seed(0)
        sd = {k: (torch.randn(s, generator=g) * 0.02).to(dt) if dt.is_floating_point else torch.zeros(s, dtype=dt)
              for k, (s, dt) in shapes.items()}
        write_dir(Checkpoint(sd, cfg), d)
        del sd
        gc.collect()
        results = []
        for precision in ('fp32', 'bf16'):
            code = f'''
import time, torch, json, sys
sys.path.insert(0, {str(REPO)!r})
torch.set_num_threads({args.threads})
from PIL import Image
from modelscope_cnclip import load
t = time.perf_counter(); m = load({str(d)!r}, precision={precision!r}); load_s = time.perf_counter() - t
m.encode_image([Image.new('RGB', (640, 480), (i * 40, 90, 200)) for i in range(4)])
m.encode_text(['猫', '狗', '海边', '雪山'])
print(json.dumps({{'load_s': load_s, 'rss_gb': {PEAK_RSS_GB}}}))
'''
            out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=1800)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        n = sum(s.numel() for s, _ in shapes.values())
        size = (d / 'model.safetensors').stat().st_size / 2**30
        report.append(f'| {arch} | {n / 1e6:.1f}M | {size:.2f} GB | {results[0]["load_s"]:.1f} | '
                      f'{results[0]["rss_gb"]:.2f} GB | {results[1]["rss_gb"]:.2f} GB |')
        shutil.rmtree(d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='ViT-B-16')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cpu', help='cpu or cuda (then e.g. --batch 256; CPU-only peers skipped)')
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--retrieval', type=int, default=64, help='images/texts for the fast-mode agreement check')
    p.add_argument('--photos', type=int, default=64, help='12 MP JPEGs for the input-pipeline section')
    p.add_argument('--memory', nargs='*', default=[], help='architectures for the peak-RSS section')
    p.add_argument('--skip-throughput', action='store_true')
    p.add_argument('--out', type=Path, help='also write the markdown report here')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 ceiling and exact mode stay true fp32
    report = header('Embedding benchmark', argv)
    with tempfile.TemporaryDirectory(prefix='cnclip-bench-') as tmp:
        work = Path(tmp)
        if not args.skip_throughput:
            section_throughput(args, work, report)
        if args.memory:
            section_memory(args, work, report)
    emit(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
