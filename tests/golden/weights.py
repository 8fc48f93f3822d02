"""Deterministic, well-spread random weights for official-layout Chinese-CLIP state dicts.

The golden outputs in ``tests/data/golden/`` were computed with the official ``cn_clip`` code from
weights made by :func:`make_state_dict`; the project's tests regenerate exactly the same weights
from ``spec.json`` + seed, so no weight file is stored in the repository.

Depends on numpy and torch only.  Bit-for-bit reproducibility across numpy/torch versions and
machines rests on three things:

* ``np.random.RandomState`` (the legacy generator, whose stream is frozen) and only its
  ``random_sample`` draws, which are exact 53-bit integer-to-double conversions (no libm call,
  unlike ``standard_normal``);
* only IEEE-exact arithmetic afterwards (``*``, ``+``, ``-``, ``/``, ``sqrt``; no exp/log/sin);
* one final float64 -> float32 cast (round to nearest even).

Every draw is uniform on ``[-sqrt(3), sqrt(3))`` (zero mean, unit variance) times a per-tensor
scale.  Plain random init makes all texts (and most images) embed almost identically (pairwise
cosines > 0.99), so a wrong implementation could still look "close"; the gains below were tuned
on the golden inputs (none of their pairwise cosines is above 0.99; texts and ViT images mostly
0.3 .. 0.9, ModifiedResNet images 0.64 .. 0.98) while keeping attention soft and the fp32 noise
floor (vs float64) at about 2e-6 relative.
"""

from __future__ import annotations

import json
import math
import re
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch

__all__ = ["make_state_dict", "load_spec", "save_spec", "spec_from_state_dict", "tensor_digest",
           "LOGIT_SCALE"]

SpecEntry = Tuple[str, List[int], str]

#: ``logit_scale`` of every generated state dict: float32(ln 100), i.e. temperature 0.01.
LOGIT_SCALE = float(np.float32(math.log(100.0)))

_SQRT3 = math.sqrt(3.0)

# ---- gains (the std of a weight matrix is gain / sqrt(fan_in)) ---------------------------------
# vision, ViT
VIT_PATCH_GAIN = 3.0          # visual.conv1.weight (patch embedding, fan_in 3*P*P)
VIT_CLASS_EMB_STD = 0.5       # visual.class_embedding
VIT_POS_EMB_STD = 0.3         # visual.positional_embedding
VIT_QK_GAIN = 1.8             # rows [0, 2W) of attn.in_proj_weight
VIT_V_GAIN = 3.0              # rows [2W, 3W) of attn.in_proj_weight
VIT_OUT_GAIN = 3.0            # attn.out_proj.weight
VIT_MLP_GAIN = 1.5            # mlp.c_fc.weight, mlp.c_proj.weight
# vision, ModifiedResNet
RN_CONV_GAIN = math.sqrt(2.0)  # every conv (He gain for ReLU)
RN_POS_EMB_STD = 3.0          # visual.attnpool.positional_embedding
RN_QK_GAIN = 0.3              # attnpool q_proj / k_proj (soft, content-dependent attention)
RN_V_GAIN = 2.0               # attnpool v_proj / c_proj
# text (BERT)
BERT_WORD_EMB_STD = 1.0
BERT_POS_EMB_STD = 0.3
BERT_TYPE_EMB_STD = 0.3
BERT_QK_GAIN = 1.8            # attention.self.query / key
BERT_VO_GAIN = 4.0            # attention.self.value / attention.output.dense
BERT_FFN_GAIN = 1.5           # intermediate.dense / output.dense
# shared
PROJ_GAIN = 1.0               # visual.proj, text_projection (used as x @ P, fan_in = rows)
NORM_WEIGHT_SPREAD = 0.2      # LayerNorm weight = 1 + 0.2 * u
BN_WEIGHT_SPREAD = 0.2        # BatchNorm weight = 1 + BN_WEIGHT_SPREAD * u
BIAS_STD = 0.3                # every bias = 0.3 * u (BatchNorm: BN_BIAS_OFFSET + 0.3 * u)
BN_BIAS_OFFSET = -0.2         # sparser ReLU codes: less common-mode in ResNet features
BN_MEAN_STD = 0.2             # BatchNorm running_mean
BN_VAR_MIN = 0.5              # BatchNorm running_var = 0.5 + u**2 / 3 (in [0.5, 1.5))


def _uniform(rs: np.random.RandomState, shape: Sequence[int]) -> np.ndarray:
    """Zero-mean, unit-variance uniform draws in float64 (exact arithmetic except the sqrt(3) scale)."""
    u = rs.random_sample(tuple(int(s) for s in shape))
    return (u * 2.0 - 1.0) * _SQRT3


def _fan_in(key: str, shape: Sequence[int]) -> int:
    if key.endswith("visual.proj") or key == "text_projection":
        return int(shape[0])  # used as x @ P
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def _kind(key: str) -> str:
    """Classify a state-dict key into one of the generation rules."""
    name = key.split(".")[-1]
    if key == "logit_scale":
        return "logit_scale"
    if name == "num_batches_tracked":
        return "zeros"
    if name == "running_mean":
        return "bn_mean"
    if name == "running_var":
        return "bn_var"
    is_bn = re.search(r"(^|\.)(bn\d+|downsample\.1)\.", key) is not None
    is_ln = "LayerNorm" in key or re.search(r"(^|\.)ln_\w+\.", key) is not None
    if is_bn and name == "weight":
        return "bn_weight"
    if is_bn and name == "bias":
        return "bn_bias"
    if is_ln and name == "weight":
        return "norm_weight"
    if name == "bias" or name.endswith("_bias"):
        return "bias"
    return "weight"


def _weight_scale(key: str, shape: Sequence[int]):
    """Std (scalar, or per-row array for in_proj_weight) of a weight-like tensor."""
    if key == "visual.class_embedding":
        return VIT_CLASS_EMB_STD
    if key == "visual.positional_embedding":
        return VIT_POS_EMB_STD
    if key == "visual.attnpool.positional_embedding":
        return RN_POS_EMB_STD
    if key.endswith("embeddings.word_embeddings.weight"):
        return BERT_WORD_EMB_STD
    if key.endswith("embeddings.position_embeddings.weight"):
        return BERT_POS_EMB_STD
    if key.endswith("embeddings.token_type_embeddings.weight"):
        return BERT_TYPE_EMB_STD

    inv = 1.0 / math.sqrt(_fan_in(key, shape))
    if key.endswith("attn.in_proj_weight"):
        rows = int(shape[0])
        w = rows // 3
        scale = np.empty((rows, 1), dtype=np.float64)
        scale[: 2 * w] = VIT_QK_GAIN * inv
        scale[2 * w:] = VIT_V_GAIN * inv
        return scale
    if key.endswith("attn.out_proj.weight"):
        return VIT_OUT_GAIN * inv
    if ".mlp.c_fc." in key or ".mlp.c_proj." in key:
        return VIT_MLP_GAIN * inv
    if key == "visual.conv1.weight" and len(shape) == 4 and shape[1] == 3 and shape[2] > 3:
        return VIT_PATCH_GAIN * inv  # ViT patch embedding (kernel = patch size)
    if key.startswith("visual.attnpool."):
        if ".q_proj." in key or ".k_proj." in key:
            return RN_QK_GAIN * inv
        return RN_V_GAIN * inv  # v_proj, c_proj
    if key.startswith("visual.") and len(shape) == 4:
        return RN_CONV_GAIN * inv  # ResNet convs (stem, bottlenecks, downsample.0)
    if ".attention.self.query." in key or ".attention.self.key." in key:
        return BERT_QK_GAIN * inv
    if ".attention.self.value." in key or ".attention.output.dense." in key:
        return BERT_VO_GAIN * inv
    if ".intermediate.dense." in key or (".output.dense." in key and ".attention." not in key):
        return BERT_FFN_GAIN * inv
    if key.endswith("visual.proj") or key == "text_projection":
        return PROJ_GAIN * inv
    return inv  # anything else (e.g. bert.pooler.dense.weight)


def _generate(rs: np.random.RandomState, key: str, shape: Sequence[int]) -> np.ndarray:
    kind = _kind(key)
    if kind == "logit_scale":
        return np.full(tuple(shape), LOGIT_SCALE, dtype=np.float64)  # no draw
    if kind == "zeros":
        return np.zeros(tuple(shape), dtype=np.float64)  # no draw
    u = _uniform(rs, shape)
    if kind == "bn_mean":
        return u * BN_MEAN_STD
    if kind == "bn_var":
        return BN_VAR_MIN + (u * u) / 3.0  # in [0.5, 1.5)
    if kind == "norm_weight":
        return 1.0 + NORM_WEIGHT_SPREAD * u
    if kind == "bn_weight":
        return 1.0 + BN_WEIGHT_SPREAD * u
    if kind == "bn_bias":
        return BN_BIAS_OFFSET + BIAS_STD * u
    if kind == "bias":
        return BIAS_STD * u
    return u * _weight_scale(key, shape)


def make_state_dict(spec: Iterable[Sequence], seed: int) -> Dict[str, torch.Tensor]:
    """Generate an official-layout state dict from ``[(key, shape, dtype_name), ...]``.

    Keys are drawn in spec order from one ``np.random.RandomState(seed)``; ``num_batches_tracked``
    and ``logit_scale`` consume no draws.  Float tensors come out as float32 (``dtype_name`` of
    ``float16``/``bfloat16``/``float64`` is honoured by a final cast from the float32 values);
    integer tensors are zeros.
    """
    rs = np.random.RandomState(int(seed))
    out: Dict[str, torch.Tensor] = {}
    for entry in spec:
        key, shape, dtype_name = entry[0], [int(s) for s in entry[1]], str(entry[2])
        dtype_name = dtype_name.replace("torch.", "")
        if dtype_name.startswith("int") or dtype_name == "bool":
            arr = np.zeros(tuple(shape), dtype=np.int64)
            t = torch.from_numpy(arr).to(getattr(torch, dtype_name))
        else:
            arr = _generate(rs, key, shape).astype(np.float32)
            t = torch.from_numpy(np.ascontiguousarray(arr))
            if dtype_name != "float32":
                t = t.to(getattr(torch, dtype_name))
        out[key] = t
    return out


def spec_from_state_dict(state_dict) -> List[SpecEntry]:
    return [(k, [int(s) for s in v.shape], str(v.dtype).replace("torch.", ""))
            for k, v in state_dict.items()]


def save_spec(path, spec: Iterable[Sequence]) -> None:
    rows = [[str(k), [int(s) for s in shape], str(dt)] for k, shape, dt in spec]
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        f.write(",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows))
        f.write("\n]\n")


def load_spec(path) -> List[SpecEntry]:
    with open(path, "r", encoding="utf-8") as f:
        rows = json.load(f)
    return [(str(k), [int(s) for s in shape], str(dt)) for k, shape, dt in rows]


def tensor_digest(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 over all keys, dtypes, shapes and raw bytes, in dict order."""
    import hashlib

    h = hashlib.sha256()
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        h.update(k.encode("utf-8"))
        h.update(str(v.dtype).encode())
        h.update(str(list(v.shape)).encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.dim() else v.reshape(1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
