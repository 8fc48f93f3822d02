"""Where weights come from and where they go: every checkpoint layout users have, read and written.

Readers return a :class:`Checkpoint` (official-layout state dict + config + vocab); writers take one. Layouts:

* ``plugin``   — this package's model dir: ``configuration.json``, ``cnclip_config.json``, ``model.safetensors``
  (or its shards with ``model.safetensors.index.json``), ``vocab.txt``.
* ``hub``      — the stock ModelScope dir: ``configuration.json`` (``clip-multi-modal-embedding``),
  ``vision_model_config.json``, ``text_model_config.json``, ``vocab.txt``, ``pytorch_model.bin``.
* ``official`` — a Chinese-CLIP ``.pt`` (``{"state_dict": {"module.visual...": ...}, ...}``).
* ``hf``       — a transformers ``ChineseCLIPModel`` dir (single or sharded weights).

Weights files may also be ModelScope trainer checkpoints (``work/epoch_N.pth``, ``iter_N.pth``, ``best_*.pth``:
keys under the model's ``clip.`` submodule) or any state dict whose keys share one prefix.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from modelscope_cnclip.checkpoints.convert import (
    INDEX_SUFFIX,
    SHARD_RE,
    StateDict,
    check_state_dict,
    guess_config,
    official_to_hf,
    parse_shard_size,
    read_checkpoint,
    save_weights,
    to_official,
)
from modelscope_cnclip.config import (
    LAYOUTS,
    RESOURCES,
    CLIPConfig,
    Layout,
    available_models,
    config_from_hub,
    config_to_hub,
    get_config,
    match_architecture,
)
from modelscope_cnclip.model import CLIP
from modelscope_cnclip.pretrained import get_pretrained
from modelscope_cnclip.runtime import MANIFEST, is_export_dir, read_manifest
from modelscope_cnclip.tokenizer import DEFAULT_VOCAB
from modelscope_cnclip.utils import atomic_dir

__all__ = ['Checkpoint', 'read_source', 'read_config', 'write_dir', 'convert', 'check_fits', 'default_configuration',
           'LAYOUTS']

logger = logging.getLogger(__name__)

PLUGIN_CONFIG = 'cnclip_config.json'
PLUGIN_WEIGHTS = 'model.safetensors'
HUB_FILES = ('vision_model_config.json', 'text_model_config.json')
WEIGHT_SUFFIXES = ('.safetensors', '.pt', '.pth', '.bin', '.ckpt')
HUB_MODEL_TYPE = 'clip-multi-modal-embedding'


@dataclass
class Checkpoint:
    """Weights in the official layout, with what is needed to rebuild and describe the model."""

    state_dict: StateDict
    config: CLIPConfig
    vocab_file: Path = DEFAULT_VOCAB
    layout: str = 'official'
    source: str = ''
    #: config fields read neither from the source nor from a shipped architecture, but assumed (see
    #: :func:`modelscope_cnclip.checkpoints.convert.guess_config`); a plugin dir written from it keeps the list.
    guessed: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The architecture name, or ``'custom'``."""
        return match_architecture(self.config) or 'custom'


def default_configuration() -> dict[str, Any]:
    """The ``configuration.json`` a plugin model dir carries (task, types, train/evaluation defaults)."""
    return json.loads((RESOURCES / 'configuration.json').read_text(encoding='utf-8'))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding='utf-8-sig'))  # -sig: as Windows editors save it
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: invalid JSON ({e})') from None


def _resolve_config(config: CLIPConfig | str | os.PathLike | None) -> CLIPConfig | None:
    if config is None or isinstance(config, CLIPConfig):
        return config
    if isinstance(config, str) and not config.endswith('.json'):
        return get_config(config)  # an architecture name
    return CLIPConfig.from_file(config)


def _find_weights(d: Path, preferred: tuple[str, ...]) -> Path:
    """The weights file (or sharded-weights index) of dir ``d``: the first of ``preferred`` present, else its
    only weights file."""
    for name in preferred:
        if (d / name).is_file():
            return d / name
    found = sorted(p.name for p in d.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return d / found[0]
    trained = [name for name in found if re.fullmatch(r'(epoch|iter)_\d+\.pth|best_.*\.pth', name)]
    if trained:
        raise FileNotFoundError(f'{d} is a cnclip-trainer work dir: load {d / "output"} (the final model, a plugin '
                                f'dir), {d / "output_best"}, or one checkpoint such as {d / trained[-1]}')
    if any(SHARD_RE.search(name) for name in found):
        raise FileNotFoundError(f'{d}: holds weight shards {found[:4]} but not their index (e.g. '
                                f'model.safetensors.index.json or pytorch_model.bin.index.json), which says which '
                                f'tensor is in which shard; copy it from where the shards came from')
    raise FileNotFoundError(f'{d}: expected weights in one of {list(preferred)}, found {found or "none"}')


def _vocab_in(d: Path) -> Path:
    return d / 'vocab.txt' if (d / 'vocab.txt').is_file() else DEFAULT_VOCAB


def _dir_layout(d: Path) -> str:
    if (d / PLUGIN_CONFIG).is_file():
        return 'plugin'
    if all((d / f).is_file() for f in HUB_FILES):
        return 'hub'
    if (d / 'config.json').is_file() and _read_json(d / 'config.json').get('model_type') == 'chinese_clip':
        return 'hf'
    return 'weights-only'


def _hf_config(d: Path) -> CLIPConfig:
    from modelscope_cnclip.checkpoints.hf import config_from_hf
    return config_from_hf(_read_json(d / 'config.json'))


def read_config(source: str | os.PathLike | None) -> tuple[CLIPConfig | None, Path]:
    """The architecture and vocab a model dir declares, without reading its weights (``None`` if it declares none).
    """
    d = Path(source) if source is not None else None
    if d is None or not d.is_dir():
        return None, DEFAULT_VOCAB
    if is_export_dir(d):
        return read_manifest(d).config, d / 'vocab.txt'
    return _declared_config(d, _dir_layout(d))[0], _vocab_in(d)


def _plugin_config(path: Path) -> tuple[CLIPConfig, tuple[str, ...]]:
    """A ``cnclip_config.json`` and the fields it records as guessed (its informational ``"guessed"`` list)."""
    data = _read_json(path)
    guessed = data.get('guessed', []) if isinstance(data, dict) else []
    if not isinstance(guessed, list) or not all(isinstance(f, str) for f in guessed):
        raise ValueError(f'{path}: "guessed" must be a list of config field names, got {guessed!r}')
    return CLIPConfig.from_dict(data, where=str(path)), tuple(guessed)


def _declared_config(d: Path, layout: str) -> tuple[CLIPConfig | None, tuple[str, ...]]:
    """The config a dir of ``layout`` declares (``None`` for none) and the fields it records as guessed."""
    if layout == 'plugin':
        return _plugin_config(d / PLUGIN_CONFIG)
    if layout == 'hub':
        return config_from_hub(_read_json(d / HUB_FILES[0]), _read_json(d / HUB_FILES[1]), where=str(d)), ()
    return (_hf_config(d) if layout == 'hf' else None), ()


_SAFE_INDEX = PLUGIN_WEIGHTS + INDEX_SUFFIX  # model.safetensors.index.json
_BIN_INDEX = 'pytorch_model.bin' + INDEX_SUFFIX
_WEIGHT_FILES = {  # per dir layout, the weights file (or sharded-weights index) names in order of preference
    'plugin': (PLUGIN_WEIGHTS, _SAFE_INDEX),
    'hub': ('pytorch_model.bin', _BIN_INDEX, 'model.safetensors', _SAFE_INDEX, 'pytorch_model.pt'),
    'hf': ('model.safetensors', _SAFE_INDEX, 'pytorch_model.bin', _BIN_INDEX),
    'weights-only': ('pytorch_model.bin', 'model.safetensors', _BIN_INDEX, _SAFE_INDEX),
}


def _read_dir(d: Path, config: CLIPConfig | None) -> Checkpoint:
    layout = _dir_layout(d)
    try:
        weights = _find_weights(d, _WEIGHT_FILES[layout])
    except FileNotFoundError as e:
        if layout != 'weights-only':
            raise
        raise FileNotFoundError(
            f'{d} is not a Chinese CLIP model dir: expected {PLUGIN_CONFIG} (plugin), {list(HUB_FILES)} '
            f'(ModelScope hub), a config.json of model_type chinese_clip (Hugging Face), or a single weights '
            f'file ({e})') from None
    (declared, guessed), vocab = _declared_config(d, layout), _vocab_in(d)
    sd, detected = to_official(read_checkpoint(weights))
    ckpt_layout = layout if layout != 'weights-only' else ('hf' if detected == 'hf' else 'official')
    if config is None and declared is None:
        declared, guessed = guess_config(sd)
    return Checkpoint(sd, config or declared, vocab, ckpt_layout, str(d), () if config else guessed)


def _export_dir_message(d: Path) -> str:
    try:
        source = json.loads((d / MANIFEST).read_text(encoding='utf-8')).get('source') or 'its checkpoint'
    except (OSError, ValueError, AttributeError):
        source = 'its checkpoint'
    return (f'{d} is an exported model (graphs for a runtime, not torch weights): embed with it through '
            f'modelscope_cnclip.load({str(d)!r}) or the pipeline; to convert, finetune or export again, start from '
            f'the checkpoint it was exported from ({source})')


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split('/')
    return len(parts) == 2 and all(parts) and not source.startswith(('.', '/', '~')) and '\\' not in source


def _snapshot(hub_id: str, revision: str | None) -> Path:
    from modelscope.hub.snapshot_download import snapshot_download  # late: the library never imports ModelScope
    logger.info('downloading %s%s from the ModelScope hub', hub_id, f' (revision {revision})' if revision else '')
    path = Path(snapshot_download(hub_id, revision=revision) if revision else snapshot_download(hub_id))
    verify_hub_files(path, _hub_listing(hub_id, revision))
    return path


def _hub_listing(hub_id: str, revision: str | None) -> list[dict[str, Any]] | None:
    """The hub's file list (``Path``, ``Sha256``, ...) of a model, or ``None`` when this ModelScope cannot give it."""
    try:
        from modelscope.hub.api import HubApi
        kwargs = {'revision': revision} if revision else {}
        return list(HubApi().get_model_files(hub_id, recursive=True, **kwargs))
    except Exception as e:  # noqa: BLE001 - an API that moved or a network error: the check is skipped, said so
        logger.warning('%s: the hub file list is unavailable (%s: %s); downloaded files not checked against its '
                       'hashes', hub_id, type(e).__name__, e)
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    return h.hexdigest()


def verify_hub_files(root: str | os.PathLike, listing: Sequence[Mapping[str, Any]] | None) -> int:
    """Check the downloaded files under ``root`` against the SHA-256 the hub records for them (``listing``: the
    hub's ``[{"Path", "Sha256", ...}]``; files without a hash, or not downloaded, are skipped). A file checked
    before with the same size and mtime is not hashed again (``.cnclip_verified.json`` in ``root`` records them
    when the folder is writable).

    Returns:
        The number of files whose hash was compared.
    Raises:
        ValueError: a file whose content differs from the hub's record, named with both hashes and the fix.
    """
    if not listing:
        return 0
    root = Path(root)
    record_path = root / '.cnclip_verified.json'
    try:
        record = json.loads(record_path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        record = {}
    checked, changed = 0, False
    for entry in listing:
        name, expected = entry.get('Path') or entry.get('path'), entry.get('Sha256') or entry.get('sha256')
        path = root / str(name) if name else None
        if not expected or path is None or not path.is_file():
            continue
        stat = path.stat()
        key = [stat.st_size, stat.st_mtime_ns, str(expected).lower()]
        if record.get(str(name)) == key:
            checked += 1
            continue
        actual = _sha256(path)
        if actual != str(expected).lower():
            raise ValueError(f'{path}: its SHA-256 {actual} differs from the hub\'s record {expected} (a corrupt or '
                             f'tampered download); delete {root} and download again')
        record[str(name)], changed, checked = key, True, checked + 1
    if changed:
        try:
            record_path.write_text(json.dumps(record), encoding='utf-8')
        except OSError:
            pass
    return checked


def read_source(source: str | os.PathLike, config: CLIPConfig | str | os.PathLike | None = None, *,
                revision: str | None = None) -> Checkpoint:
    """Read weights from any supported source.

    Args:
        source: a model dir (plugin, ModelScope hub or Hugging Face layout; single or sharded weights), a weights
            file (official ``.pt``, a ModelScope trainer's ``epoch_N.pth`` / ``iter_N.pth`` / ``best_*.pth``,
            ``.bin``, ``.safetensors``, a sharded-weights ``*.index.json``), a ModelScope hub id, or an architecture
            name (``'ViT-B-16'``: its published weights, see :func:`modelscope_cnclip.pretrained.list_pretrained`).
            Hub ids and names are downloaded with ModelScope's hub client; a local path wins over a name.
        config: override the architecture: a :class:`CLIPConfig`, an architecture name or a config JSON path.
            By default it comes from the source's own config files, else from the weights' shapes.
        revision: hub revision for a hub id or an architecture name (default for a name: the registry's).

    Raises:
        FileNotFoundError: no such path, and not a hub id or an architecture name.
        OSError: the hub download failed (offline, unknown id); the message says what to pass instead.
        ValueError: an architecture name without published weights; unreadable or mismatching weights.
    """
    cfg = _resolve_config(config)
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        if is_export_dir(path):
            raise ValueError(_export_dir_message(path))
        return _read_dir(path, cfg)
    if path.is_file():
        sd, detected = to_official(read_checkpoint(path))
        config, guessed = (cfg, ()) if cfg else guess_config(sd)
        return Checkpoint(sd, config, DEFAULT_VOCAB, detected, str(path), guessed)
    name = str(source)
    if name in available_models():  # an architecture name (a local path of that name was read above)
        weights = get_pretrained(name)
        try:
            local = _snapshot(weights.hub_id, revision or weights.revision)
        except Exception as e:  # the hub client raises its own types; keep the cause, say what to pass instead
            raise OSError(f'{name!r} names the published weights {weights.describe()}, and downloading them from '
                          f'the ModelScope hub failed ({e}). Without the hub, {weights.instead()}') from e
        return replace(_read_dir(local, cfg), source=name)
    if _looks_like_hub_id(name):
        try:
            local = _snapshot(name, revision)
        except Exception as e:  # the hub client raises its own types; keep the cause, name the input
            raise OSError(f'{name!r} is not a local path, and downloading it as a ModelScope hub id failed: '
                          f'{e}') from e
        return replace(_read_dir(local, cfg), source=name)
    raise FileNotFoundError(f'model source {name!r} not found: give a model dir, a weights file '
                            f'(.pt/.bin/.safetensors), a ModelScope hub id like '
                            f'"damo/multi-modal_clip-vit-base-patch16_zh" or an architecture name '
                            f'({", ".join(available_models())})')


# --- writers -------------------------------------------------------------------------------------------------------

def _check_writable(dst: Path, overwrite: bool) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f'{dst} exists and is not empty; choose a new directory or pass overwrite=True')


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + '\n', encoding='utf-8')


def _contiguous(sd: StateDict) -> StateDict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _plugin_config_dict(ckpt: Checkpoint) -> dict[str, Any]:
    """``cnclip_config.json``: the config, plus the informational ``name`` and (if any) ``guessed`` fields."""
    info: dict[str, Any] = {'name': ckpt.name}
    if ckpt.guessed:
        info['guessed'] = list(ckpt.guessed)
    return {**info, **ckpt.config.to_dict()}


def _write_plugin(ckpt: Checkpoint, d: Path, configuration: dict[str, Any] | None,
                  max_shard_size: int | str | None = None) -> None:
    _write_json(d / 'configuration.json', configuration or default_configuration())
    _write_json(d / PLUGIN_CONFIG, _plugin_config_dict(ckpt))
    save_weights(_contiguous(ckpt.state_dict), d, max_shard_size)
    shutil.copyfile(ckpt.vocab_file, d / 'vocab.txt')


def _check_shardable(to: str, max_shard_size: int | str | None) -> None:
    if max_shard_size is None:
        return
    if to == 'hub':
        raise ValueError("the hub layout cannot be sharded: ModelScope's built-in CLIP class reads exactly one "
                         "pytorch_model.bin. Drop --max-shard-size (max_shard_size=), or write --to plugin or --to hf")
    parse_shard_size(max_shard_size)


def _write_hub(ckpt: Checkpoint, d: Path) -> None:
    vision, text = config_to_hub(ckpt.config)
    _write_json(d / 'configuration.json', {'framework': 'pytorch', 'task': 'multi-modal-embedding',
                                           'model': {'type': HUB_MODEL_TYPE},
                                           'pipeline': {'type': 'multi-modal-embedding'}})
    _write_json(d / HUB_FILES[0], vision)
    _write_json(d / HUB_FILES[1], text)
    shutil.copyfile(ckpt.vocab_file, d / 'vocab.txt')
    sd = _contiguous(ckpt.state_dict)
    # ModelScope's built-in class loads strictly and its BERT has a pooler that CLIP never uses: write zeros.
    h = ckpt.config.text.hidden_size
    sd['bert.pooler.dense.weight'] = torch.zeros(h, h)
    sd['bert.pooler.dense.bias'] = torch.zeros(h)
    torch.save({'state_dict': sd}, d / 'pytorch_model.bin')


def _write_hf(ckpt: Checkpoint, d: Path, max_shard_size: int | str | None = None) -> None:
    from modelscope_cnclip.checkpoints.hf import write_hf_files
    write_hf_files(official_to_hf(_contiguous(ckpt.state_dict)), ckpt.config, ckpt.vocab_file, d, max_shard_size)


def write_dir(ckpt: Checkpoint, dst: str | os.PathLike, *, to: Layout = 'plugin', overwrite: bool = False,
              configuration: dict[str, Any] | None = None, max_shard_size: int | str | None = None) -> Path:
    """Write ``ckpt`` as a model dir of layout ``to`` (``plugin``, ``hub`` or ``hf``), atomically.

    ``max_shard_size`` (``'2GB'``, bytes; ``plugin`` and ``hf`` only) splits the weights into safetensors shards
    of at most that size plus a ``model.safetensors.index.json``, as transformers' ``save_pretrained`` does.
    """
    if to not in LAYOUTS:
        raise ValueError(f'unknown target layout {to!r}; choose one of {list(LAYOUTS)}')
    _check_shardable(to, max_shard_size)
    dst = Path(dst)
    _check_writable(dst, overwrite)
    with atomic_dir(dst) as tmp:
        if to == 'plugin':
            _write_plugin(ckpt, tmp, configuration, max_shard_size)
        elif to == 'hub':
            _write_hub(ckpt, tmp)
        else:
            _write_hf(ckpt, tmp, max_shard_size)
    logger.info('wrote %s (%s layout, %s)', dst, to, ckpt.name)
    return dst


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: Layout = 'plugin',
            config: CLIPConfig | str | os.PathLike | None = None, overwrite: bool = False,
            max_shard_size: int | str | None = None) -> Path:
    """Convert any readable checkpoint (see :func:`read_source`) into a ``plugin``, ``hub`` or ``hf`` model dir.

    The architecture is detected from the weights' shapes unless the source describes itself or ``config``
    is given (fields it had to guess are recorded in a plugin dir's ``cnclip_config.json``). ``max_shard_size``
    (e.g. ``'2GB'``) shards the ``plugin`` and ``hf`` layouts' weights. Returns the written directory.
    """
    if to not in LAYOUTS:
        raise ValueError(f'unknown target layout {to!r}; choose one of {list(LAYOUTS)}')
    _check_shardable(to, max_shard_size)
    ckpt = read_source(src, config)
    check_fits(ckpt)
    return write_dir(ckpt, dst, to=to, overwrite=overwrite, max_shard_size=max_shard_size)


def check_fits(ckpt: Checkpoint) -> None:
    """Raise the strict loader's ValueError if the weights do not fit the config (shapes only, on the meta device:
    no memory), before anything is written or reported."""
    with torch.device('meta'):
        model = CLIP(ckpt.config)
    check_state_dict(model.state_dict(), ckpt.state_dict, ckpt.name)
