"""Produce the golden reference outputs in ``tests/data/golden/`` with the official Chinese-CLIP code.

This script is NOT part of the test suite and does not run in the project's venv: it needs the
official ``cn_clip`` package, which was installed in a throwaway venv outside the repository::

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/refvenv/bin/pip install --no-deps cn_clip==1.6.0
    /work/refvenv/bin/pip install timm six lmdb tqdm numpy pillow==13.0.0
    /work/refvenv/bin/python tests/golden/make_golden.py          # from the repository root

Versions used for the committed files: cn_clip 1.6.0, torch 2.14.1 (CPU, fp32), torchvision
0.29.1, Pillow 13.0.0, numpy 2.4.6, Python 3.11.7 (the exact versions are also recorded in each
``golden.json``).

What it does (deterministic; re-running rewrites byte-identical files on the same versions):

1. draws the test images from seeded numpy fields and writes them to ``inputs/`` (PNG/JPEG), and
   writes ``inputs/texts.json``;
2. for each tiny model (``tiny-vit``, ``tiny-rn``): writes the hub-layout config files, builds
   ``cn_clip.clip.model.CLIP(**vision_cfg, **text_cfg)``, records its state-dict layout in
   ``spec.json``, loads ``tests/golden/weights.make_state_dict(spec, seed)`` with ``strict=True``,
   and stores the unnormalised ``encode_image`` / ``encode_text`` outputs (``golden.npz``) plus
   metadata, pixel hashes and statistics (``golden.json``).  Weights are not stored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import zipfile
from pathlib import Path

import cn_clip
import cn_clip.clip
import cn_clip.clip.model
import numpy as np
import PIL
import torch
import torchvision
from cn_clip.clip.model import CLIP, convert_weights
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import weights  # noqa: E402  (tests/golden/weights.py)

log = logging.getLogger("make_golden")

OUT = REPO / "tests" / "data" / "golden"
INPUTS = OUT / "inputs"
RESOLUTION = 224
CONTEXT = 52
CONTEXT_LONG = 77
IMAGE_SEED = 20240611

CONFIGURATION_JSON = {
    "framework": "pytorch",
    "task": "multi-modal-embedding",
    "model": {"type": "clip-multi-modal-embedding"},
    "pipeline": {"type": "multi-modal-embedding"},
}

_TEXT_BASE = {
    "vocab_size": 21128,
    "text_hidden_size": 48,
    "text_intermediate_size": 96,
    "text_num_attention_heads": 4,
    "text_num_hidden_layers": 2,
    "text_max_position_embeddings": 512,
    "text_type_vocab_size": 2,
    "text_hidden_act": "gelu",
    "text_hidden_dropout_prob": 0.1,
    "text_attention_probs_dropout_prob": 0.1,
    "text_initializer_range": 0.02,
}

MODELS = {
    "tiny-vit": {
        "seed": 1001,
        "vision": {"embed_dim": 32, "image_resolution": 224, "vision_layers": 2, "vision_width": 64,
                   "vision_patch_size": 32, "vision_head_width": 32},
        "text": dict(_TEXT_BASE),
    },
    "tiny-rn": {
        "seed": 2002,
        "vision": {"embed_dim": 32, "image_resolution": 224, "vision_layers": [1, 1, 1, 1],
                   "vision_width": 16, "vision_patch_size": None},
        "text": dict(_TEXT_BASE, text_hidden_size=32, text_intermediate_size=64,
                     text_num_attention_heads=2, text_num_hidden_layers=3),
    },
}

TEXTS = [
    "杰尼龟",
    "妙蛙种子",
    "小火龙",
    "皮卡丘",
    "过年喜庆对联",
    # long Chinese paragraph (> 52 tokens: truncation)
    "春节是中国最重要的传统节日，家家户户都会在门上贴上红色的对联和福字，晚上全家人围坐在一起吃年夜饭，"
    "看春节联欢晚会，孩子们穿着新衣服放鞭炮、收红包，大街小巷张灯结彩，到处洋溢着喜庆祥和的气氛，"
    "人们互相拜年，祝愿新的一年身体健康、万事如意、阖家幸福。",
    # long English sentence with subword splits (> 52 tokens)
    "The unbelievably photogenic hippopotamus was photographed swimming gracefully underneath the "
    "shimmering Mediterranean sunset, while internationally renowned cinematographers enthusiastically "
    "documented everything for an extraordinary documentary about biodiversity and conservation.",
    "2024年iPhone 15 Pro Max发布会，售价¥7999起，支持5G和Wi-Fi 7",
    "ＣＬＩＰ模型，真ＧＯＯＤ！１２３",
    "今天天气真好😀🎉",
    "這是一隻貓在沙發上睡覺",
    "Café naïve RÉSUMÉ",
    "A PHOTO OF A DOG PLAYING IN THE SNOW",
    "これはペンです。カタカナとひらがな",
    "안녕하세요 세계, 고양이 사진",
    "罕见字𠀀和㐀测试",
    # tabs, newlines, CR, zero-width space (Cf: removed, joins "zero"+"width"), NUL, BEL,
    # no-break space and ideographic space (Zs: whitespace)
    "一只\t黑猫\n在\r\n沙发上\x00睡\x07觉 zero\u200bwidth\u00a0end\u3000尾",
    # chars on which cn_clip's Python BasicTokenizer and HF's Rust BertNormalizer disagree:
    # VT/FF are Cc (removed here -> "tabvt" one word; whitespace in Rust), U+E000 private use and
    # U+0378 unassigned (kept here -> [UNK]; removed in Rust); U+FFFD removed by both; U+2028
    # (Zl) survives cleaning but str.split() drops it
    "tab\x0bvt form\x0cfeed 私\ue000用 未\u0378配 替\ufffd换 行\u2028分",
    # one 150-char "word": cn_clip's max_input_chars_per_word is 200 (HF: 100 -> [UNK])
    "编号" + "1234567890" * 15 + "结束",
    "   前后都有空格   ",
    "",
    "！？。，、…《》“”!?.,;:()[]{}@#$%^&*~`",
]

IMAGE_NAMES = [
    "rgb.png", "rgba.png", "l.png", "p.png", "la.png", "bilevel.png", "cmyk.jpg", "photo.jpg",
    "gray.jpg", "i16.png", "tiny_1x1.png", "wide.png", "tall.png", "exif_rotated.jpg",
]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def _field(rs: np.random.RandomState, h: int, w: int, channels: int) -> np.ndarray:
    """Smooth random field in [0, 1], shape [h, w, channels]: gradient + sinusoids + blobs."""
    y = (np.arange(h, dtype=np.float64)[:, None] + 0.5) / max(h, w)
    x = (np.arange(w, dtype=np.float64)[None, :] + 0.5) / max(h, w)
    out = np.empty((h, w, channels), dtype=np.float64)
    for c in range(channels):
        v = rs.uniform(-1, 1) * x + rs.uniform(-1, 1) * y
        for _ in range(4):  # sinusoids, 0.5 .. 14 cycles across the long side
            f = rs.uniform(0.5, 14.0)
            th = rs.uniform(0, 2 * np.pi)
            v = v + rs.uniform(0.15, 0.5) * np.sin(2 * np.pi * f * (np.cos(th) * x + np.sin(th) * y)
                                                   + rs.uniform(0, 2 * np.pi))
        for _ in range(3):  # gaussian blobs
            cx, cy = rs.uniform(0, w / max(h, w)), rs.uniform(0, h / max(h, w))
            s = rs.uniform(0.05, 0.3)
            v = v + rs.uniform(-1, 1) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
        lo, hi = v.min(), v.max()
        out[..., c] = (v - lo) / (hi - lo + 1e-12)
    return out


def _to_u8(rs: np.random.RandomState, f: np.ndarray, noise: float = 3.0) -> np.ndarray:
    v = 8.0 + f * 239.0 + rs.normal(0.0, noise, size=f.shape)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def make_images(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(IMAGE_SEED)
    png = {"optimize": False, "compress_level": 9}

    Image.fromarray(_to_u8(rs, _field(rs, 150, 200, 3)), "RGB").save(dest / "rgb.png", **png)

    rgb = _to_u8(rs, _field(rs, 140, 180, 3), noise=6.0)  # noisy colours also under transparent areas
    a = _field(rs, 140, 180, 1)[..., 0]
    alpha = np.clip((a - 0.3) / 0.4, 0.0, 1.0)  # ~30% fully transparent, ~30% opaque, ramp between
    alpha8 = np.rint(alpha * 255).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha8]), "RGBA").save(dest / "rgba.png", **png)

    Image.fromarray(_to_u8(rs, _field(rs, 130, 170, 1))[..., 0], "L").save(dest / "l.png", **png)

    src = Image.fromarray(_to_u8(rs, _field(rs, 120, 160, 3)), "RGB")
    p_img = src.quantize(colors=48)
    assert p_img.mode == "P"
    p_img.save(dest / "p.png", **png)

    lum = _to_u8(rs, _field(rs, 110, 150, 1))[..., 0]
    a = _field(rs, 110, 150, 1)[..., 0]
    alpha8 = np.rint(np.clip((a - 0.25) / 0.5, 0.0, 1.0) * 255).astype(np.uint8)
    Image.fromarray(np.dstack([lum, alpha8]), "LA").save(dest / "la.png", **png)

    bil = Image.fromarray(_to_u8(rs, _field(rs, 120, 160, 1))[..., 0], "L").convert("1")  # dithered
    assert bil.mode == "1"
    bil.save(dest / "bilevel.png", **png)

    cmyk = _to_u8(rs, _field(rs, 135, 180, 4))
    Image.fromarray(cmyk, "CMYK").save(dest / "cmyk.jpg", quality=90)

    Image.fromarray(_to_u8(rs, _field(rs, 240, 320, 3)), "RGB").save(dest / "photo.jpg", quality=90)

    Image.fromarray(_to_u8(rs, _field(rs, 160, 200, 1))[..., 0], "L").save(dest / "gray.jpg", quality=90)

    # 16-bit grayscale with values 0..600: Pillow resizes in I;16 and convert("RGB") clips at 255
    v16 = np.clip(np.rint(_field(rs, 100, 130, 1)[..., 0] * 600.0 + rs.normal(0, 2, (100, 130))), 0, 65535)
    im16 = Image.frombytes("I;16", (130, 100), v16.astype("<u2").tobytes())
    im16.save(dest / "i16.png", **png)

    Image.fromarray(rs.randint(0, 256, size=(1, 1, 3)).astype(np.uint8), "RGB").save(
        dest / "tiny_1x1.png", **png)
    Image.fromarray(_to_u8(rs, _field(rs, 6, 1500, 3)), "RGB").save(dest / "wide.png", **png)
    Image.fromarray(_to_u8(rs, _field(rs, 900, 5, 3)), "RGB").save(dest / "tall.png", **png)

    # EXIF Orientation=6 ("rotate 90 CW to display"): cn_clip does NOT apply it (no exif_transpose)
    ex = Image.fromarray(_to_u8(rs, _field(rs, 120, 160, 3)), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    ex.save(dest / "exif_rotated.jpg", quality=90, exif=exif.tobytes())

    for name in IMAGE_NAMES:
        with Image.open(dest / name) as im:
            log.info("input %-18s mode=%-5s size=%s bytes=%d", name, im.mode, im.size,
                     (dest / name).stat().st_size)


def write_texts(dest: Path) -> None:
    with open(dest / "texts.json", "w", encoding="utf-8") as f:
        json.dump(TEXTS, f, ensure_ascii=False, indent=1)
        f.write("\n")


def load_images(src: Path):
    out = []
    for name in IMAGE_NAMES:
        im = Image.open(src / name)  # exactly what a user would pass: no convert, no exif_transpose
        im.load()
        out.append(im)
    return out


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def save_npz_deterministic(path: Path, arrays: dict) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so re-runs are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def cosine_summary(feats: torch.Tensor) -> dict:
    f = feats.double()
    f = f / f.norm(dim=-1, keepdim=True)
    c = (f @ f.T).numpy()
    iu = np.triu_indices(c.shape[0], k=1)
    v = c[iu]
    return {
        "n_pairs": int(v.size),
        "min": round(float(v.min()), 4),
        "p10": round(float(np.percentile(v, 10)), 4),
        "median": round(float(np.median(v)), 4),
        "p90": round(float(np.percentile(v, 90)), 4),
        "max": round(float(v.max()), 4),
        "frac_in_0.3_0.9": round(float(np.mean((v >= 0.3) & (v <= 0.9))), 3),
        "frac_above_0.99": round(float(np.mean(v > 0.99)), 3),
    }


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max-per-row |b|: fp32 noise floor relative to the feature scale."""
    a, b = a.double(), b.double()
    scale = b.abs().amax(dim=-1, keepdim=True)
    return float(((a - b).abs() / scale).max())


def versions() -> dict:
    return {
        "cn_clip": cn_clip.__version__ if hasattr(cn_clip, "__version__") else _dist_version("cn_clip"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# --------------------------------------------------------------------------------------------
# golden
# --------------------------------------------------------------------------------------------

def preprocess(images):
    transform = cn_clip.clip.image_transform(RESOLUTION)
    pix = [transform(im) for im in images]
    for t in pix:
        assert t.dtype == torch.float32 and tuple(t.shape) == (3, RESOLUTION, RESOLUTION)
    return pix


def pixel_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def pixel_stats(t: torch.Tensor) -> dict:
    a = t.double().numpy()
    flat = t.contiguous().numpy().reshape(-1)
    idx = np.linspace(0, flat.size - 1, 8).astype(np.int64)
    return {
        "mean_per_channel": [round(float(x), 7) for x in a.mean(axis=(1, 2))],
        "abs_sum": round(float(np.abs(a).sum()), 4),
        "samples_at": idx.tolist(),
        "samples": [float(x) for x in flat[idx]],
    }


def bug_sensitivity(model, sd, cfg, images, img, tok, txt) -> dict:
    """How far plausible implementation mistakes move the features (max_rel_err vs golden)."""
    from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

    norm = Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    variants = {
        "bilinear_resize": Compose([Resize((RESOLUTION, RESOLUTION), interpolation=InterpolationMode.BILINEAR),
                                    lambda im: im.convert("RGB"), ToTensor(), norm]),
        "convert_rgb_before_resize": Compose([lambda im: im.convert("RGB"),
                                              Resize((RESOLUTION, RESOLUTION), interpolation=InterpolationMode.BICUBIC),
                                              ToTensor(), norm]),
    }
    out = {}
    with torch.no_grad():
        ref = [model.encode_image(p[None]) for p in preprocess(images)]  # one at a time, like below
        for vname, tf in variants.items():
            out[vname] = {name: float("%.3g" % max_rel_err(model.encode_image(tf(im)[None]), r))
                          for name, im, r in zip(IMAGE_NAMES, images, ref)}
        m16 = CLIP(**cfg["vision"], **cfg["text"])
        m16.load_state_dict({k: (v.half().float() if v.is_floating_point() else v) for k, v in sd.items()})
        m16 = m16.eval().float()
        b = torch.stack(preprocess(images))
        out["fp16_rounded_weights"] = {"image": max_rel_err(m16.encode_image(b), img),
                                       "text": max_rel_err(m16.encode_text(tok), txt)}
        x = model.bert(tok, attention_mask=torch.ones_like(tok).float())[0]
        out["no_attention_mask"] = {"text": max_rel_err(x[:, 0, :] @ model.text_projection, txt)}
    return out


def build_model(cfg: dict, seed: int):
    model = CLIP(**cfg["vision"], **cfg["text"])
    spec = weights.spec_from_state_dict(model.state_dict())
    sd = weights.make_state_dict(spec, seed)
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    model = model.eval().float()
    return model, spec, sd


def run_model(name: str, cfg: dict, images, pix, texts) -> None:
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    seed = cfg["seed"]
    for fname, obj in (("configuration.json", CONFIGURATION_JSON),
                       ("vision_model_config.json", cfg["vision"]),
                       ("text_model_config.json", cfg["text"])):
        with open(d / fname, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    shutil.copyfile(Path(cn_clip.clip.__file__).parent / "vocab.txt", d / "vocab.txt")

    model, spec, sd = build_model(cfg, seed)
    weights.save_spec(d / "spec.json", spec)
    assert weights.load_spec(d / "spec.json") == spec
    has_pooler = any(k.startswith("bert.pooler.") for k, _, _ in spec)
    log.info("%s: %d state-dict entries, bert.pooler present: %s, weights sha256 %s",
             name, len(spec), has_pooler, weights.tensor_digest(sd))

    tok = cn_clip.clip.tokenize(texts, context_length=CONTEXT)
    tok77 = cn_clip.clip.tokenize(texts, context_length=CONTEXT_LONG)
    batch = torch.stack(pix)
    with torch.no_grad():
        img = model.encode_image(batch)
        txt = model.encode_text(tok)
        txt77 = model.encode_text(tok77)
        # one-at-a-time, to show batch-composition independence
        img_single = torch.cat([model.encode_image(p[None]) for p in pix])
        txt_single = torch.cat([model.encode_text(t[None]) for t in tok])
        # float64 run of the same model: fp32 noise floor.  cn_clip's vision LayerNorm subclass
        # forces float32, so use the plain nn.LayerNorm forward for this run only.
        m64 = CLIP(**cfg["vision"], **cfg["text"])
        m64.load_state_dict(sd, strict=True)
        m64 = m64.eval().double()
        ln_forward = cn_clip.clip.model.LayerNorm.forward
        cn_clip.clip.model.LayerNorm.forward = torch.nn.LayerNorm.forward
        try:
            img64 = m64.encode_image(batch.double())
            txt64 = m64.encode_text(tok)
        finally:
            cn_clip.clip.model.LayerNorm.forward = ln_forward
        # cn_clip's own loader (create_model / load_from_name): convert_weights(model) makes
        # Conv/Linear/MHA weights+biases, the whole BertModel, visual.proj and text_projection fp16
        # BEFORE load_state_dict, so those checkpoint values are rounded to fp16; then .float().
        m_off = CLIP(**cfg["vision"], **cfg["text"])
        convert_weights(m_off)
        rounded_keys = [k for k, v in m_off.state_dict().items() if v.dtype == torch.float16]
        m_off.load_state_dict(sd, strict=True)
        m_off = m_off.float().eval()
        img_off = m_off.encode_image(batch)
        txt_off = m_off.encode_text(tok)

    n_tok = (tok77 != 0).sum(dim=1)
    fits = n_tok <= CONTEXT
    assert torch.equal(tok[fits], tok77[fits][:, :CONTEXT])
    for t in (img, txt, txt77, img_off, txt_off):
        assert torch.isfinite(t).all(), "non-finite features"
    assert img.dtype == torch.float32 and txt.dtype == torch.float32

    stats = {
        "image_cosines": cosine_summary(img),
        "text_cosines": cosine_summary(txt),
        "fp32_vs_fp64_max_rel_err": {"image": max_rel_err(img, img64), "text": max_rel_err(txt, txt64)},
        "batch_vs_single_max_rel_err": {"image": max_rel_err(img, img_single),
                                        "text": max_rel_err(txt, txt_single)},
        # only texts that fit untruncated in 52 tokens: padding length must not matter for them
        "ctx52_vs_ctx77_max_rel_err_untruncated": max_rel_err(txt77[fits], txt[fits]),
        "texts_truncated_at_52": [i for i in range(len(texts)) if not bool(fits[i])],
        "bug_sensitivity_max_rel_err": bug_sensitivity(model, sd, cfg, images, img, tok, txt),
        "fp16_load_vs_fp32_max_rel_err": {"image": max_rel_err(img_off, img), "text": max_rel_err(txt_off, txt)},
        "feature_norms": {"image": [round(float(x), 4) for x in img.norm(dim=-1)],
                          "text": [round(float(x), 4) for x in txt.norm(dim=-1)]},
    }
    log.info("%s stats: %s", name, json.dumps({k: stats[k] for k in list(stats)[:5]}))

    arrays = {
        "image_features": img.numpy().astype(np.float32),
        "text_features": txt.numpy().astype(np.float32),
        "token_ids": tok.numpy().astype(np.int64),
        "token_ids_77": tok77.numpy().astype(np.int64),
        "text_features_77": txt77.numpy().astype(np.float32),
        "image_features_fp16_load": img_off.numpy().astype(np.float32),
        "text_features_fp16_load": txt_off.numpy().astype(np.float32),
    }
    save_npz_deterministic(d / "golden.npz", arrays)

    meta = {
        "model": name,
        "images": list(IMAGE_NAMES),
        "texts": list(texts),
        "seed": seed,
        "logit_scale": float(model.logit_scale.detach().item()),
        "resolution": RESOLUTION,
        "context_length": CONTEXT,
        "context_length_long": CONTEXT_LONG,
        "embed_dim": int(img.shape[1]),
        "weights_sha256": weights.tensor_digest(sd),
        "bert_pooler_in_state_dict": has_pooler,
        "fp16_load_rounded_keys": rounded_keys,
        "pixel_sha256": {n: pixel_digest(t) for n, t in zip(IMAGE_NAMES, pix)},
        "pixel_stats": {n: pixel_stats(t) for n, t in zip(IMAGE_NAMES, pix)},
        "image_modes": {n: f"{im.mode} {im.size[0]}x{im.size[1]}" for n, im in zip(IMAGE_NAMES, images)},
        "stats": stats,
        "versions": versions(),
        "notes": (
            "Computed with cn_clip.clip.model.CLIP(**vision_model_config, **text_model_config) on CPU "
            "in fp32; state dict = tests/golden/weights.make_state_dict(spec.json, seed), loaded with "
            "strict=True (the official model has no bert.pooler.*; BertPooler is commented out in "
            "cn_clip 1.6.0), then .eval().float(). Pixels: cn_clip.clip.image_transform(224) on "
            "PIL.Image.open(inputs/<file>) (no exif_transpose, no prior convert). Tokens: "
            "cn_clip.clip.tokenize(texts, context_length=52) (and 77). image_features / text_features "
            "are the UNnormalised encode_image / encode_text outputs for the whole batch at once. "
            "pixel_sha256 = sha256 of the C-contiguous float32 [3,224,224] tensor bytes. "
            "stats.*_max_rel_err = max |a-b| / max|b| per row: fp32 vs float64 run of the same model "
            "(noise floor), batch vs one-at-a-time, and context 77 vs 52. "
            "*_fp16_load: the same inputs through cn_clip's own loading path (create_model / "
            "load_from_name: convert_weights() before load_state_dict rounds the keys in "
            "fp16_load_rounded_keys to fp16, then .float()); NOT the primary target."
        ),
    }
    with open(d / "golden.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.write("\n")
    log.info("%s: wrote %s", name, sorted(p.name for p in d.iterdir()))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    log.info("versions: %s", versions())

    make_images(INPUTS)
    write_texts(INPUTS)
    with open(INPUTS / "texts.json", encoding="utf-8") as f:
        texts = json.load(f)
    assert texts == TEXTS

    ids = cn_clip.clip.tokenize("过年喜庆对联")[0]
    ids = ids[ids != 0].tolist()
    assert ids == [101, 6814, 2399, 1599, 2412, 2190, 5468, 102], ids

    images = load_images(INPUTS)
    pix = preprocess(images)
    for name, cfg in MODELS.items():
        run_model(name, cfg, images, pix, texts)


if __name__ == "__main__":
    main()
