"""State-dict conversions as pure functions, the safe file reader and the strict loader.

The plugin's own parameter names are the official ones (``visual.*``, ``bert.*``, ``text_projection``,
``logit_scale``), so "official" below means the plugin layout too. Layouts are told apart by sentinel keys.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .config import CLIPConfig, TextConfig, VisionConfig, _registry

__all__ = ['StateDict', 'read_checkpoint', 'strip_prefixes', 'detect_layout', 'clean_official', 'hf_to_official',
           'official_to_hf', 'infer_config', 'to_official', 'check_state_dict', 'load_strict']

logger = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]

WRAPPER_PREFIXES = ('module.', 'clip_model.')  # DDP, ModelScope finetune output
HF_SENTINELS = ('vision_model.', 'text_model.', 'visual_projection.weight')
OFFICIAL_SENTINELS = ('visual.', 'bert.', 'text_projection')


def read_checkpoint(path: str | Path) -> StateDict:
    """Read a weights file safely: safetensors, or a torch pickle with ``weights_only=True``.

    Unwraps ``{"state_dict": ...}`` (official ``.pt``; ``optimizer``/``epoch``/``step`` are ignored).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint file {str(path)!r} not found')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f'{path}: refusing to unpickle arbitrary Python objects (torch.load weights_only=True failed: '
            f'{str(e).splitlines()[0]}). Re-save only the state dict (torch.save(ckpt["state_dict"], ...)) in an '
            f'environment you trust, or use safetensors.') from None
    except RuntimeError as e:
        raise ValueError(f'{path}: not a readable torch checkpoint ({e})') from None
    if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
        obj = obj['state_dict']
    if not isinstance(obj, Mapping):
        raise ValueError(f'{path}: expected a state dict (or {{"state_dict": ...}}), got {type(obj).__name__}')
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f'{path}: entries {bad[:5]} are not tensors; expected a state dict of tensors '
                         f'(top-level keys: {list(obj)[:8]})')
    return dict(obj)


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> StateDict:
    """Drop wrapper prefixes (``module.``, ``clip_model.``, in any nesting) from every key."""
    out: StateDict = {}
    for key, value in sd.items():
        new = key
        while new.startswith(prefixes):
            new = new[len(next(p for p in prefixes if new.startswith(p))):]
        if new in out:
            raise ValueError(f'key {key!r} collides with another key after removing prefixes {prefixes}')
        out[new] = value
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``'hf'`` (transformers ChineseCLIPModel) or ``'official'`` (official / hub / plugin), by sentinel keys."""
    keys = list(sd)
    if any(k.startswith(HF_SENTINELS) for k in keys):
        return 'hf'
    if any(k.startswith(OFFICIAL_SENTINELS) for k in keys):
        return 'official'
    raise ValueError(f'not a Chinese CLIP state dict: none of its keys start with {OFFICIAL_SENTINELS + HF_SENTINELS} '
                     f'(first keys: {keys[:6]})')


def clean_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove what the model does not use (the BERT pooler, a persisted ``position_ids`` buffer) and store
    ``logit_scale`` as the 0-dim tensor it is (some checkpoints hold it with shape ``(1,)``, which torch accepts)."""
    out = dict(sd)
    if 'logit_scale' in out and tuple(out['logit_scale'].shape) == (1,):
        out['logit_scale'] = out['logit_scale'].reshape(())
    dropped = [k for k in out if k.startswith(('bert.pooler.', 'text_model.pooler.'))]
    for k in list(out):
        if k.endswith('embeddings.position_ids'):
            ids = out[k]
            if not torch.equal(ids.reshape(-1), torch.arange(ids.numel(), dtype=ids.dtype)):
                raise ValueError(f'{k} is not 0..{ids.numel() - 1}; custom position ids are not supported')
            dropped.append(k)
    for k in dropped:
        del out[k]
    if dropped:
        logger.debug('dropped unused entries %s', dropped)
    return out


# --- Hugging Face ChineseCLIPModel <-> official ----------------------------------------------------------------

# (transformers name, official name); {i} is a layer index, {p} is weight/bias
_VISION_NAMES = [
    ('vision_model.embeddings.class_embedding', 'visual.class_embedding'),
    ('vision_model.embeddings.patch_embedding.weight', 'visual.conv1.weight'),
    ('vision_model.embeddings.position_embedding.weight', 'visual.positional_embedding'),
    ('vision_model.pre_layrnorm.{p}', 'visual.ln_pre.{p}'),
    ('vision_model.post_layernorm.{p}', 'visual.ln_post.{p}'),
    ('vision_model.encoder.layers.{i}.self_attn.out_proj.{p}', 'visual.transformer.resblocks.{i}.attn.out_proj.{p}'),
    ('vision_model.encoder.layers.{i}.layer_norm1.{p}', 'visual.transformer.resblocks.{i}.ln_1.{p}'),
    ('vision_model.encoder.layers.{i}.layer_norm2.{p}', 'visual.transformer.resblocks.{i}.ln_2.{p}'),
    ('vision_model.encoder.layers.{i}.mlp.fc1.{p}', 'visual.transformer.resblocks.{i}.mlp.c_fc.{p}'),
    ('vision_model.encoder.layers.{i}.mlp.fc2.{p}', 'visual.transformer.resblocks.{i}.mlp.c_proj.{p}'),
]


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template)
    for name, group in (('i', r'\d+'), ('p', 'weight|bias'), ('q', '[qkv]')):
        rx = rx.replace(re.escape('{%s}' % name), f'(?P<{name}>{group})')
    return re.compile(rx)


_HF_TO_OFFICIAL = [(_pattern(hf), official) for hf, official in _VISION_NAMES]
_OFFICIAL_TO_HF = [(_pattern(official), hf) for hf, official in _VISION_NAMES]
_HF_QKV = _pattern('vision_model.encoder.layers.{i}.self_attn.{q}_proj.{p}')
_OFFICIAL_QKV = _pattern('visual.transformer.resblocks.{i}.attn.in_proj_{p}')


def _rename(key: str, table: list[tuple[re.Pattern, str]], layout: str) -> str:
    for rx, template in table:
        if m := rx.fullmatch(key):
            return template.format(**m.groupdict())
    raise ValueError(f'unexpected key {key!r} in a {layout} Chinese CLIP state dict')


def hf_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers ``ChineseCLIPModel`` state dict -> official names (q/k/v fused, projections transposed)."""
    sd = clean_official(sd)
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith('text_model.'):
            out['bert.' + key[len('text_model.'):]] = value
        elif key == 'text_projection.weight':
            out['text_projection'] = value.t().contiguous()
        elif key == 'visual_projection.weight':
            out['visual.proj'] = value.t().contiguous()
        elif key == 'logit_scale':
            out[key] = value
        elif m := _HF_QKV.fullmatch(key):
            qkv.setdefault((m['i'], m['p']), {})[m['q']] = value
        else:
            out[_rename(key, _HF_TO_OFFICIAL, 'Hugging Face')] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {'q', 'k', 'v'}:
            raise ValueError(f'vision layer {layer}: {kind} of the q/k/v projections incomplete ({sorted(parts)})')
        out[f'visual.transformer.resblocks.{layer}.attn.in_proj_{kind}'] = torch.cat([parts[q] for q in 'qkv'])
    return out


def official_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Official names -> transformers ``ChineseCLIPModel`` (ViT image towers only)."""
    if any(k.startswith('visual.attnpool.') for k in sd):
        raise ValueError('transformers ChineseCLIPModel has no ResNet image tower: RN50 cannot be written as --to hf; '
                         'use --to plugin or --to hub')
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith('bert.'):
            out['text_model.' + key[len('bert.'):]] = value
        elif key == 'text_projection':
            out['text_projection.weight'] = value.t().contiguous()
        elif key == 'visual.proj':
            out['visual_projection.weight'] = value.t().contiguous()
        elif key == 'logit_scale':
            out[key] = value
        elif m := _OFFICIAL_QKV.fullmatch(key):
            for q, part in zip('qkv', value.chunk(3)):
                out[f'vision_model.encoder.layers.{m["i"]}.self_attn.{q}_proj.{m["p"]}'] = part.contiguous()
        else:
            out[_rename(key, _OFFICIAL_TO_HF, 'official')] = value
    return out


def to_official(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, str]:
    """Any supported state dict -> (official-layout state dict without unused entries, detected layout)."""
    sd = strip_prefixes(sd)
    layout = detect_layout(sd)
    return (hf_to_official(sd) if layout == 'hf' else clean_official(sd)), layout


# --- architecture from shapes ------------------------------------------------------------------------------------

def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in sd if (m := rx.match(k))})


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f'cannot infer the architecture: key {key!r} is missing from the state dict')
    return tuple(sd[key].shape)


def infer_config(sd: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """Read the architecture off an official-layout state dict's shapes.

    A shipped architecture (RN50, ViT-B-16, ...) whose shapes match is returned as is, head counts included.
    For a custom size the head counts cannot be read off shapes: 64-wide heads are assumed (with a warning);
    pass an explicit config for anything else.
    """
    vocab, hidden = _shape(sd, 'bert.embeddings.word_embeddings.weight')
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_shape(sd, 'bert.encoder.layer.0.intermediate.dense.weight')[0],
        num_attention_heads=max(1, hidden // 64), num_hidden_layers=_count(sd, r'bert\.encoder\.layer\.(\d+)\.'),
        max_position_embeddings=_shape(sd, 'bert.embeddings.position_embeddings.weight')[0],
        type_vocab_size=_shape(sd, 'bert.embeddings.token_type_embeddings.weight')[0])
    embed_dim = _shape(sd, 'text_projection')[1]
    if 'visual.attnpool.c_proj.weight' in sd:
        width = _shape(sd, 'visual.conv3.weight')[0]
        n_pos = _shape(sd, 'visual.attnpool.positional_embedding')[0]
        layers = tuple(_count(sd, rf'visual\.layer{i}\.(\d+)\.') for i in range(1, 5))
        vision = VisionConfig(image_size=round(math.sqrt(n_pos - 1)) * 32, layers=layers, width=width)
    else:
        width, _, patch, _ = _shape(sd, 'visual.conv1.weight')
        grid = round(math.sqrt(_shape(sd, 'visual.positional_embedding')[0] - 1))
        vision = VisionConfig(image_size=grid * patch, layers=_count(sd, r'visual\.transformer\.resblocks\.(\d+)\.'),
                              width=width, patch_size=patch, head_width=64 if width % 64 == 0 else width)
    cfg = CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)
    for name, known in _registry().items():
        if _same_shapes(known, cfg):
            logger.info('detected architecture %s from the weights', name)
            return known
    logger.warning('weights match no shipped architecture; assuming 64-wide attention heads (vision %d, text %d '
                   'heads). Pass a config if that is wrong.', vision.heads, text.num_attention_heads)
    return cfg


def _same_shapes(a: CLIPConfig, b: CLIPConfig) -> bool:
    va, vb, ta, tb = a.vision, b.vision, a.text, b.text
    return (a.embed_dim, va.image_size, va.layers, va.width, va.patch_size, ta.vocab_size, ta.hidden_size,
            ta.intermediate_size, ta.num_hidden_layers, ta.max_position_embeddings, ta.type_vocab_size) == \
           (b.embed_dim, vb.image_size, vb.layers, vb.width, vb.patch_size, tb.vocab_size, tb.hidden_size,
            tb.intermediate_size, tb.num_hidden_layers, tb.max_position_embeddings, tb.type_vocab_size)


def check_state_dict(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], arch: str) -> None:
    """Raise a ValueError naming the first missing, unexpected and wrongly shaped keys (if any)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}'
             for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        parts.append(f'{len(wrong)} shape mismatch(es), first: {wrong[:3]}')
    if missing:
        parts.append(f'{len(missing)} missing key(s), first: {missing[:3]}')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected key(s), first: {unexpected[:3]}')
    raise ValueError(f'weights do not fit the architecture {arch}: ' + '; '.join(parts) +
                     '. Check that the config matches the checkpoint (or omit it to detect it from the shapes).')


def load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: str, assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` after :func:`check_state_dict`'s readable check."""
    check_state_dict(model.state_dict(), sd, arch)
    model.load_state_dict(sd, strict=True, assign=assign)
