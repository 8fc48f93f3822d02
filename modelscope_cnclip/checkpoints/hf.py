"""The Hugging Face ``ChineseCLIPModel`` layout: config translation and directory writing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from modelscope_cnclip.config import CLIPConfig, TextConfig, VisionConfig

__all__ = ['config_from_hf', 'config_to_hf', 'write_hf_files']

_TEXT_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_attention_heads', 'num_hidden_layers',
                'max_position_embeddings', 'type_vocab_size', 'hidden_act', 'hidden_dropout_prob',
                'attention_probs_dropout_prob', 'initializer_range', 'layer_norm_eps')


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
    """A transformers ``ChineseCLIPConfig`` dict (``config.json``) -> :class:`CLIPConfig`."""
    v, t = hf.get('vision_config') or {}, hf.get('text_config') or {}
    width = v.get('hidden_size', 768)
    if v.get('intermediate_size', 4 * width) != 4 * width or v.get('hidden_act', 'quick_gelu') != 'quick_gelu':
        raise ValueError(f'vision_config: Chinese CLIP needs intermediate_size = 4 x hidden_size and quick_gelu, got '
                         f'{v.get("intermediate_size")} and {v.get("hidden_act")!r}')
    heads = v.get('num_attention_heads', 12)
    vision = VisionConfig(image_size=v.get('image_size', 224), layers=v.get('num_hidden_layers', 12), width=width,
                          patch_size=v.get('patch_size', 32), head_width=width // heads)
    defaults = TextConfig()
    text = TextConfig(**{f: t.get(f, getattr(defaults, f)) for f in _TEXT_FIELDS})
    return CLIPConfig(embed_dim=hf.get('projection_dim', 512), vision=vision, text=text)


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """:class:`CLIPConfig` -> the keyword arguments of ``transformers.ChineseCLIPConfig``."""
    v = cfg.vision
    if v.is_resnet:
        raise ValueError('transformers ChineseCLIPModel has no ResNet image tower; RN50 cannot be written as --to hf')
    vision = {'hidden_size': v.width, 'intermediate_size': 4 * v.width, 'num_hidden_layers': v.layers,
              'num_attention_heads': v.heads, 'image_size': v.image_size, 'patch_size': v.patch_size,
              'projection_dim': cfg.embed_dim, 'hidden_act': 'quick_gelu', 'layer_norm_eps': 1e-5}
    text = {f: getattr(cfg.text, f) for f in _TEXT_FIELDS}
    return {'text_config': text, 'vision_config': vision, 'projection_dim': cfg.embed_dim}


def _image_processor_config(cfg: CLIPConfig) -> dict[str, Any]:
    p = cfg.preprocess
    size = {'height': p.image_size, 'width': p.image_size}
    # Squash-resize without a centre crop, as Chinese CLIP was trained (transformers' default crops).
    return {'image_processor_type': 'ChineseCLIPImageProcessor', 'processor_class': 'ChineseCLIPProcessor',
            'do_resize': True, 'size': size, 'resample': 3, 'do_center_crop': False, 'crop_size': size,
            'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True, 'image_mean': list(p.mean),
            'image_std': list(p.std), 'do_convert_rgb': True}


def write_hf_files(hf_sd: Mapping[str, torch.Tensor], cfg: CLIPConfig, vocab_file: Path, d: Path,
                   max_shard_size: int | str | None = None) -> None:
    """Write ``config.json``, the weights, tokenizer files and ``preprocessor_config.json`` into ``d``.

    The weights are one ``model.safetensors``, or with ``max_shard_size`` (``'2GB'``, bytes) safetensors shards
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``, as ``save_pretrained`` writes them.
    """
    from transformers import BertTokenizer, ChineseCLIPConfig

    from modelscope_cnclip.checkpoints.convert import save_weights

    # architectures: what model.save_pretrained records, and what tools that serve HF dirs (infinity-emb) dispatch on
    ChineseCLIPConfig(**config_to_hf(cfg), architectures=['ChineseCLIPModel']).save_pretrained(str(d))
    save_weights(hf_sd, d, max_shard_size)
    BertTokenizer(vocab=str(vocab_file), do_lower_case=True,
                  model_max_length=cfg.context_length).save_pretrained(str(d))
    shutil.copyfile(vocab_file, d / 'vocab.txt')
    (d / 'preprocessor_config.json').write_text(json.dumps(_image_processor_config(cfg), indent=2) + '\n')
