"""State-dict conversions as pure functions, the safe file reader and the strict loader.

The plugin's own parameter names are the official ones (``visual.*``, ``bert.*``, ``text_projection``,
``logit_scale``), so "official" below means the plugin layout too. Layouts are told apart by sentinel keys.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from modelscope_cnclip.config import CLIPConfig, TextConfig, VisionConfig, _registry

__all__ = ['StateDict', 'read_checkpoint', 'read_sharded', 'shard_plan', 'save_weights', 'parse_shard_size',
           'strip_prefixes', 'find_prefix', 'strip_model_prefix', 'detect_layout', 'clean_official', 'hf_to_official',
           'official_to_hf', 'infer_config', 'guess_config', 'to_official', 'check_state_dict', 'load_strict',
           'GUESSED_FIELDS', 'numpy_safe_globals']

logger = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]

WRAPPER_PREFIXES = ('module.', 'clip_model.')  # DDP, ModelScope finetune output
HF_SENTINELS = ('vision_model.', 'text_model.', 'visual_projection.weight')
OFFICIAL_SENTINELS = ('visual.', 'bert.', 'text_projection')
# What the shapes of a custom-size checkpoint cannot tell (vision.head_width also sets a ResNet's attention-pool heads).
GUESSED_FIELDS = ('vision.head_width', 'text.num_attention_heads')
# ModelScope's CheckpointHook writes X.pth (weights) and X_trainer_state.pth (optimizer, lr scheduler, RNG state).
TRAINER_STATE_SUFFIX = '_trainer_state'
TRAINER_STATE_KEYS = {'meta', 'optimizer', 'lr_scheduler'}
INDEX_SUFFIX = '.index.json'
SHARD_RE = re.compile(r'-(\d{5})-of-(\d{5})\.(?:safetensors|bin)$')


def read_checkpoint(path: str | Path) -> StateDict:
    """Read weights safely: a safetensors file, a torch pickle (``weights_only=True``), or sharded weights.

    Unwraps ``{"state_dict": ...}`` (official ``.pt``, ModelScope checkpoints with ``meta``; ``optimizer``/
    ``epoch``/``step``/``meta`` are ignored). An ``*.index.json`` (Hugging Face sharded weights) reads its shards
    (:func:`read_sharded`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is one shard of several, a ModelScope ``*_trainer_state.pth`` (no weights), a pickle
            with arbitrary Python objects, or not a state dict of tensors; the message names the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint file {str(path)!r} not found')
    if path.name.endswith(INDEX_SUFFIX):
        return read_sharded(path)
    if (m := SHARD_RE.search(path.name)) and int(m[2]) > 1:
        raise ValueError(f'{path} is shard {int(m[1])} of {int(m[2])} of sharded weights; give the directory that '
                         f'holds all shards and their *{INDEX_SUFFIX} (or the index file itself)')
    if path.stem.endswith(TRAINER_STATE_SUFFIX):
        raise ValueError(_trainer_state_message(path))
    return _read_weights_file(path)


def _trainer_state_message(path: Path) -> str:
    weights = path.with_name(path.stem[:-len(TRAINER_STATE_SUFFIX)] + path.suffix)
    where = 'beside it' if weights.is_file() else 'beside it, which is missing there'
    return (f"{path} is a ModelScope trainer state (optimizer, lr scheduler and RNG state for resuming), not model "
            f"weights. The checkpoint's weights are in {weights.name} ({where}): load {weights}")


def _is_trainer_state(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and 'meta' in obj and set(obj) <= TRAINER_STATE_KEYS
            and not any(isinstance(v, torch.Tensor) for v in obj.values()))


_REDOWNLOAD = 'the file is truncated or corrupt (an interrupted download or copy?): download or copy it again'


def _weights_format(path: Path) -> str:
    """``'safetensors'`` or ``'torch'`` by the file's first bytes (not its name).

    Raises:
        ValueError: neither (an image, a text file, a truncated or empty file, ...).
    """
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b'{':  # 8-byte header length, then the JSON header
        return 'safetensors'
    if head[:2] == b'PK' or head[:1] == b'\x80':  # torch.save's zip format, or its legacy pickle
        return 'torch'
    raise ValueError(f'{path}: not a weights file (it starts with {head[:8]!r}; safetensors and torch.save files '
                     f'start otherwise); give a .safetensors, .pt/.pth/.bin checkpoint or a model dir, or else '
                     f'{_REDOWNLOAD}')


def _read_weights_file(path: Path) -> StateDict:
    """One weights file -> a state dict of tensors (no shard or trainer-state name checks)."""
    if _weights_format(path) == 'safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f'{path}: not a readable safetensors file ({e}); {_REDOWNLOAD}') from None
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if _is_trainer_state(_load_numpy_only(path)):
            raise ValueError(_renamed_trainer_state_message(path)) from None
        raise ValueError(
            f'{path}: refusing to unpickle arbitrary Python objects (torch.load weights_only=True failed: '
            f'{str(e).splitlines()[0]}). Re-save only the state dict (torch.save(ckpt["state_dict"], ...)) in an '
            f'environment you trust, or use safetensors.') from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f'{path}: not a readable torch checkpoint ({str(e).splitlines()[0]}); {_REDOWNLOAD}') from None
    if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
        obj = obj['state_dict']
    if _is_trainer_state(obj):
        raise ValueError(_renamed_trainer_state_message(path))
    if not isinstance(obj, Mapping):
        raise ValueError(f'{path}: expected a state dict (or {{"state_dict": ...}}), got {type(obj).__name__}')
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f'{path}: entries {bad[:5]} are not tensors; expected a state dict of tensors '
                         f'(top-level keys: {list(obj)[:8]})')
    return dict(obj)


def _renamed_trainer_state_message(path: Path) -> str:
    return (f'{path} holds a ModelScope trainer state (keys {sorted(TRAINER_STATE_KEYS)}: optimizer, lr scheduler '
            f'and RNG state) and no model weights. Load the weights file saved with it: ModelScope writes the pair '
            f'X.pth (weights) and X_trainer_state.pth, e.g. epoch_2.pth beside epoch_2_trainer_state.pth')


def numpy_safe_globals() -> list[Any]:
    """numpy's array reconstruction and its dtype classes, for ``torch.serialization.safe_globals``: plain data,
    nothing that runs code (ModelScope's trainer state keeps numpy RNG state)."""
    import numpy as np
    core = getattr(np, '_core', None) or np.core
    dtypes = getattr(np, 'dtypes', None)
    classes = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')] if dtypes else []
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, *classes]


def _load_numpy_only(path: Path) -> Any:
    """Unpickle ``path`` allowing numpy arrays as the only non-tensor globals (ModelScope's trainer state keeps
    numpy RNG state), to recognise a trainer state; ``None`` if it needs anything else or cannot be read."""
    serialization = torch.serialization
    if not hasattr(serialization, 'get_unsafe_globals_in_checkpoint'):  # torch < 2.5
        return None
    try:
        names = serialization.get_unsafe_globals_in_checkpoint(str(path))
        if not names or not all(n.startswith('numpy.') for n in names):
            return None
        with serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, ValueError, OSError, AttributeError, ImportError, pickle.UnpicklingError):
        return None  # only a probe for a better message: the caller raises its own error


# --- sharded weights (Hugging Face's *.index.json + shards) -----------------------------------------------------

def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded-weights index."""
    fix = 'copy or download the index again, from the same save as its shards'
    try:
        data = json.loads(index.read_text(encoding='utf-8-sig'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{index}: not valid JSON ({e}); {fix}') from None
    weight_map = data.get('weight_map') if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f'{index}: no "weight_map" object mapping tensor names to shard files; {fix}')
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ('.', '..'):
            raise ValueError(f'{index}: shard {shard!r} is not a file name; shards must lie beside the index')
    return weight_map


def read_sharded(index: str | Path) -> StateDict:
    """Read exactly the shards a ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` lists.

    Each shard is read like a single weights file (safetensors, or ``torch.load(weights_only=True)``) and must
    hold exactly the tensors the index assigns to it.

    Raises:
        FileNotFoundError: a listed shard is missing.
        ValueError: the index is not valid JSON or has no ``weight_map``; a shard holds tensors the index does not
            list for it, or lacks tensors it lists.
    """
    index = Path(index)
    weight_map = _read_index(index)
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    sd: StateDict = {}
    for shard, keys in sorted(by_shard.items()):
        path = index.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f'{index}: lists shard {shard!r}, which is missing from {index.parent}; copy or '
                                    f'download all {len(by_shard)} shards ({sorted(by_shard)}) beside the index')
        part = _read_weights_file(path)
        _check_shard(path, index, set(part), keys)
        sd.update(part)
    return sd


def _check_shard(path: Path, index: Path, found: set[str], listed: set[str]) -> None:
    fix = 'the index and the shards come from different saves: copy or download them together again'
    if extra := sorted(found - listed):
        raise ValueError(f'{path}: holds {len(extra)} tensor(s) that {index.name} does not list for it (first: '
                         f'{extra[:3]}); {fix}')
    if missing := sorted(listed - found):
        raise ValueError(f'{path}: lacks {len(missing)} tensor(s) that {index.name} lists for it (first: '
                         f'{missing[:3]}); {fix}')


_SIZE_RE = re.compile(r'\s*(\d+(?:\.\d*)?)\s*(?:([kmgt])(i?)b)?\s*', re.IGNORECASE)


def parse_shard_size(max_shard_size: int | str) -> int:
    """``2000000000``, ``'2GB'``, ``'500MB'``, ``'1GiB'`` -> bytes (as transformers reads them: KB = 1000 bytes,
    KiB = 1024 bytes).

    Raises:
        ValueError: not a positive size.
    """
    m = _SIZE_RE.fullmatch(str(max_shard_size))
    size = 0
    if m and not isinstance(max_shard_size, bool):
        unit = 'kmgt'.index(m[2].lower()) + 1 if m[2] else 0
        size = int(float(m[1]) * (1024 if m[3] else 1000) ** unit)
    if size <= 0:
        raise ValueError(f'max_shard_size={max_shard_size!r}: give a size like "2GB", "500MB" or a number of bytes')
    return size


def shard_plan(sd: Mapping[str, torch.Tensor], max_shard_size: int | str,
               pattern: str = 'model{suffix}.safetensors') -> Any:
    """How :func:`save_weights` splits ``sd`` (huggingface_hub's ``StateDictSplit``: ``is_sharded``,
    ``filename_to_tensors``, ``tensor_to_filename``, ``metadata``). Meta tensors work: no memory is touched."""
    from huggingface_hub import split_torch_state_dict_into_shards
    return split_torch_state_dict_into_shards(dict(sd), filename_pattern=pattern,
                                              max_shard_size=parse_shard_size(max_shard_size))


def save_weights(sd: Mapping[str, torch.Tensor], d: Path, max_shard_size: int | str | None = None,
                 pattern: str = 'model{suffix}.safetensors') -> list[str]:
    """Write ``sd`` as safetensors into ``d``: one ``model.safetensors``, or (when it exceeds ``max_shard_size``)
    ``model-0000k-of-0000n.safetensors`` shards and ``model.safetensors.index.json``, as transformers does.
    Returns the file names written."""
    from safetensors.torch import save_file
    if max_shard_size is None:
        name = pattern.format(suffix='')
        save_file(dict(sd), str(d / name), metadata={'format': 'pt'})
        return [name]
    plan = shard_plan(sd, max_shard_size, pattern)
    for name, keys in plan.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(d / name), metadata={'format': 'pt'})
    names = list(plan.filename_to_tensors)
    if plan.is_sharded:
        index = pattern.format(suffix='') + INDEX_SUFFIX
        (d / index).write_text(json.dumps({'metadata': plan.metadata, 'weight_map': dict(sorted(
            plan.tensor_to_filename.items()))}, indent=2) + '\n', encoding='utf-8')
        names.append(index)
    return names


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


def _sentinel_prefix(key: str, sentinels: tuple[str, ...]) -> str | None:
    """The shortest dotted prefix P with ``key == P + <sentinel>...`` (``''`` for none), or ``None``."""
    start = 0
    while True:
        if key.startswith(sentinels, start):
            return key[:start]
        dot = key.find('.', start)
        if dot < 0:
            return None
        start = dot + 1


def find_prefix(keys: Iterable[str], sentinels: tuple[str, ...] = OFFICIAL_SENTINELS + HF_SENTINELS) -> str:
    """The one key prefix (any depth: ``clip.``, ``model.clip.``, ``student.``) under which the Chinese CLIP
    sentinel keys sit; ``''`` when they sit at the top or there are none.

    Raises:
        ValueError: sentinel keys sit under two or more different prefixes (e.g. a student and a teacher model).
    """
    examples: dict[str, str] = {}
    for key in keys:
        prefix = _sentinel_prefix(key, sentinels)
        if prefix is not None:
            examples.setdefault(prefix, key)
    if len(examples) > 1:
        named = ', '.join(f'{p!r} (e.g. {k!r})' if p else f"'' (no prefix, e.g. {k!r})" for p, k in examples.items())
        some = next(p for p in examples if p)
        raise ValueError(f'Chinese CLIP weights sit under {len(examples)} different key prefixes: {named}; the '
                         f'checkpoint holds more than one model. Keep one model\'s entries and save them, e.g. '
                         f'{{k[len({some!r}):]: v for k, v in sd.items() if k.startswith({some!r})}}')
    return next(iter(examples), '')


def strip_model_prefix(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop wrapper prefixes (:func:`strip_prefixes`), then the common prefix of :func:`find_prefix` (e.g. the
    ``clip.`` of a ModelScope trainer checkpoint). Keys outside that prefix are kept, for the strict load to name."""
    sd = strip_prefixes(sd)
    prefix = find_prefix(sd)
    if not prefix:
        return sd
    logger.info('removing the key prefix %r', prefix)
    out: StateDict = {}
    for key, value in sd.items():
        new = key[len(prefix):] if key.startswith(prefix) else key
        if new in out:
            raise ValueError(f'key {key!r} collides with another key after removing the prefix {prefix!r}')
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
    """Any supported state dict -> (official-layout state dict without unused entries, detected layout).

    Wrapper prefixes (``module.``, ``clip_model.``) and one common model prefix (``clip.``, ``model.clip.``, ...)
    are removed first (:func:`strip_model_prefix`).
    """
    sd = strip_model_prefix(sd)
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


def _config_from_shapes(sd: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """The architecture the shapes pin down, with 64-wide heads assumed (:data:`GUESSED_FIELDS`)."""
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
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)


def guess_config(sd: Mapping[str, torch.Tensor]) -> tuple[CLIPConfig, tuple[str, ...]]:
    """Read the architecture off an official-layout state dict's shapes; also say which fields were guessed.

    A shipped architecture (RN50, ViT-B-16, ...) whose shapes match is returned as is, head counts included, with
    nothing guessed. For a custom size the head counts cannot be read off shapes: 64-wide heads are assumed
    (logged as a warning) and :data:`GUESSED_FIELDS` is returned; pass an explicit config for anything else.

    Raises:
        ValueError: a key the architecture is read from is missing.
    """
    cfg = _config_from_shapes(sd)
    for name, known in _registry().items():
        if _same_shapes(known, cfg):
            logger.info('detected architecture %s from the weights', name)
            return known, ()
    logger.warning('weights match no shipped architecture; assuming 64-wide attention heads (guessed %s: vision %d, '
                   'text %d heads). If that is wrong, pass the architecture: --config my_arch.json (config= in '
                   'Python).', ', '.join(GUESSED_FIELDS), cfg.vision.heads, cfg.text.num_attention_heads)
    return cfg, GUESSED_FIELDS


def infer_config(sd: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """:func:`guess_config` without the list of guessed fields."""
    return guess_config(sd)[0]


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
