"""Zero-shot image classification as the official Chinese-CLIP ``eval/zeroshot_evaluation.py`` does it.

A class is the mean of the L2-normalised embeddings of its name in every prompt template ("{}的照片", ...: 183
Chinese templates in the official ``openai`` set), renormalised; an image's class probabilities are
``softmax(100 * img @ W)``. Images come from a folder with torchvision ``ImageFolder`` semantics (one sub-folder per
class, sorted by name), read without torchvision. The templates and the 1000 Chinese ImageNet class names are the
official ones, stored as data (``resources/``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from modelscope_cnclip.config import DEFAULT_BATCH, RESOURCES
from modelscope_cnclip.transform import load_image
from modelscope_cnclip.utils import atomic_write_bytes, default_threads

__all__ = ['IMG_EXTENSIONS', 'template_sets', 'templates', 'templates_for_dataset', 'read_classnames',
           'preprocess_text', 'ImageFolder', 'zeroshot_classifier', 'classify', 'evaluate_zeroshot',
           'elevater_output']

logger = logging.getLogger(__name__)

#: torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively, as torchvision does).
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
#: The official classifier scales cosine similarities by a fixed 100, not by the model's logit scale.
LOGIT_SCALE = 100.0


# --- templates and class names ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _template_data() -> dict:
    return json.loads((RESOURCES / 'zeroshot_templates.json').read_text(encoding='utf-8'))


def template_sets() -> dict[str, int]:
    """The shipped template sets and their sizes (``{'openai': 183, 'flower': 32, ...}``)."""
    return {name: len(t) for name, t in _template_data()['sets'].items()}


def templates_for_dataset(dataset: str) -> tuple[str, list[str]]:
    """The official template set of a dataset (``zeroshot_evaluation.py``'s table: ``food-101`` -> ``food``, ...);
    any other dataset gets ``openai``. Returns ``(set name, templates)``."""
    data = _template_data()
    name = data['datasets'].get(dataset, data['default'])
    return name, list(data['sets'][name])


def _read_template_file(path: Path) -> list[str]:
    out = []
    for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if '{}' not in line:
            raise ValueError(f'{path}:{n}: template {line!r} has no {{}} for the class name; '
                             f'write one template a line, e.g. "一张{{}}的照片"')
        out.append(line)
    if not out:
        raise ValueError(f'{path}: no templates (expected one template with {{}} a line)')
    return out


def templates(name_or_path: str | os.PathLike) -> list[str]:
    """Prompt templates, each with ``{}`` for the class name.

    Args:
        name_or_path: a shipped set (``'openai'``, ``'flower'``, ... see :func:`template_sets`), a dataset name of
            the official table (``'food-101'``, ``'resisc45_clip'``, ...), or a UTF-8 text file with one template
            a line.
    """
    path = Path(name_or_path)
    if path.is_file():
        return _read_template_file(path)
    data, name = _template_data(), str(name_or_path)
    if name in data['sets']:
        return list(data['sets'][name])
    if name in data['datasets']:
        return list(data['sets'][data['datasets'][name]])
    raise ValueError(f'templates {name!r}: not a file, a template set {sorted(data["sets"])} or a dataset of the '
                     f'official table {sorted(data["datasets"])}')


def read_classnames(source: str | os.PathLike) -> list[str]:
    """Class names, one a line in class-index order, from a UTF-8 file; ``'imagenet'``: the official 1000 Chinese
    ImageNet names. Trailing empty lines are ignored; an empty line before a name is an error."""
    path = RESOURCES / 'imagenet_classnames_zh.txt' if str(source) == 'imagenet' else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f'labels file {str(source)!r} not found; give a text file with one class name a '
                                f'line, or "imagenet"')
    lines = [line.strip() for line in path.read_text(encoding='utf-8-sig').splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    empty = [n for n, line in enumerate(lines, 1) if not line]
    if empty:
        raise ValueError(f'{path}:{empty[0]}: empty class name (one name a line, in the order of the class folders)')
    if not lines:
        raise ValueError(f'{path}: no class names')
    return lines


def preprocess_text(text: str) -> str:
    """The official eval text normalisation: lower case, curly double quotes as ``"``."""
    return text.lower().replace('\u201c', '"').replace('\u201d', '"')


# --- images ----------------------------------------------------------------------------------------------------------

class ImageFolder:
    """An image classification folder read like torchvision's ``ImageFolder`` (which the official evaluation uses):
    classes are the sub-folders sorted by name, samples are each class's files with an image extension
    (:data:`IMG_EXTENSIONS`, any case), walked recursively with links followed, in sorted order.

    Attributes:
        classes: folder names; their order is the class index.
        samples: ``(path, class index)`` pairs.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f'image folder {str(root)!r} not found (expected one sub-folder per class)')
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f'{self.root}: no class folders (expected {self.root}/<class>/<image>)')
        self.samples: list[tuple[str, int]] = []
        empty = []
        for index, name in enumerate(self.classes):
            n = len(self.samples)
            for top, _, files in sorted(os.walk(self.root / name, followlinks=True)):
                self.samples += [(os.path.join(top, f), index) for f in sorted(files)
                                 if f.lower().endswith(IMG_EXTENSIONS)]
            if len(self.samples) == n:
                empty.append(name)
        if empty:
            raise FileNotFoundError(f'{self.root}: no image in the class folders {empty} '
                                    f'(image extensions: {", ".join(IMG_EXTENSIONS)})')
        if all(c.isdigit() for c in self.classes) and len({len(c) for c in self.classes}) > 1:
            logger.warning('%s: numeric class folders of different widths sort as text (%s, %s, ...): class i is '
                           'the i-th name in that order, as in torchvision', self.root, *self.classes[:2])

    def __len__(self) -> int:
        return len(self.samples)


def _open_rgb(path: str) -> Image.Image:
    # torchvision's pil_loader converts to RGB before the resize (unlike the retrieval pipeline): RGBA, P and CMYK
    # images resize differently otherwise.
    return load_image(path).convert('RGB')


def _load_batch(paths: Sequence[str], pool: ThreadPoolExecutor) -> list[Image.Image | str]:
    def one(path: str) -> Image.Image | str:
        try:
            return _open_rgb(path)
        except (OSError, ValueError) as e:
            return str(e)
    return list(pool.map(one, paths))


# --- classifier ------------------------------------------------------------------------------------------------------

def _format(template: str, classname: str) -> str:
    return template.replace('{}', classname)


@torch.inference_mode()
def zeroshot_classifier(model: Any, classnames: Sequence[str], templates: Sequence[str], *,
                        batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """Class embeddings as the official ``zero_shot_classifier``: for each class, every template filled with the
    (preprocessed) name is embedded and L2-normalised; their mean, renormalised, is the class's column.

    Args:
        model: a :class:`modelscope_cnclip.CNClip` (anything with ``encode_text(texts, batch_size)`` returning
            L2-normalised ``(N, D)`` embeddings).
        classnames: one name per class, in class-index order.
        templates: format strings with ``{}`` (see :func:`templates`).
    Returns:
        ``(D, C)`` float32 on the model's output device.
    """
    if isinstance(templates, str):
        raise TypeError(f'templates={templates!r}: pass a list of templates with {{}}, e.g. '
                        f'modelscope_cnclip.evaluation.zeroshot.templates({templates!r})')
    if not classnames or not templates:
        raise ValueError(f'zero-shot classifier needs class names and templates, got {len(classnames)} names and '
                         f'{len(templates)} templates')
    bad = [t for t in templates if '{}' not in t]
    if bad:
        raise ValueError(f'templates {bad[:3]} have no {{}} for the class name')
    per_chunk = max(1, batch_size * 4 // len(templates))  # classes embedded together, ~4 text batches at a time
    columns = []
    for start in range(0, len(classnames), per_chunk):
        names = classnames[start:start + per_chunk]
        texts = [preprocess_text(_format(t, c)) for c in names for t in templates]
        emb = F.normalize(model.encode_text(texts, batch_size=batch_size).float(), dim=-1)  # (n * T, D)
        columns.append(F.normalize(emb.view(len(names), len(templates), -1).mean(dim=1), dim=-1))  # (n, D)
    return torch.cat(columns).T.contiguous()  # (D, C)


def classify(model: Any, images: Any, classifier: torch.Tensor, *, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """Class probabilities ``softmax(100 * img @ W)``, ``(N, C)``, of image inputs (anything
    ``model.encode_image`` takes) against a :func:`zeroshot_classifier` ``W``."""
    img = model.encode_image(images, batch_size=batch_size).float()
    return _probs(img, classifier)


def _probs(img: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    img = F.normalize(img.float(), dim=-1)  # the official normalises again: a no-op on CNClip embeddings
    return (LOGIT_SCALE * img @ classifier.to(img.device, torch.float32)).softmax(dim=-1)


def _hits(probs: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """``(N,)`` bool: the target is among the ``k`` most probable classes."""
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return (top == targets[:, None]).any(dim=1)


def _percent(hits: torch.Tensor) -> float:
    return 100.0 * int(hits.sum()) / len(hits)


def evaluate_zeroshot(model: Any, images_dir: str | os.PathLike, classnames: Sequence[str],
                      templates: Sequence[str], *, batch_size: int = DEFAULT_BATCH, skip_errors: bool = False,
                      per_class: bool = False) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy on an ImageFolder, as the official ``zeroshot_evaluation.py``.

    Args:
        model: a :class:`modelscope_cnclip.CNClip` (or anything with its ``encode_image`` / ``encode_text``).
        images_dir: ``images_dir/<class folder>/<image>``; class ``i`` is the ``i``-th folder by sorted name.
        classnames: the text name of each class, in that order (see :func:`read_classnames`).
        templates: format strings with ``{}`` (see :func:`templates`).
        skip_errors: skip unreadable images (each is logged and listed in ``skipped``) instead of failing.
        per_class: also report each class's top-1 accuracy.
    Returns:
        ``top1`` and ``top5`` (percent), ``n_images`` (scored), ``n_classes``, ``classes`` (folder names),
        ``logits`` (``(N, C)`` softmax probabilities, which the official script calls logits), ``targets``
        (``(N,)``), ``paths``, ``skipped`` (``[(path, reason)]``) and, with ``per_class``, ``per_class``
        (percent per class; ``None`` for a class with no scored image).
    """
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size}: must be >= 1')
    folder = ImageFolder(images_dir)
    if len(classnames) != len(folder.classes):
        shown = ', '.join(folder.classes[:5]) + (', ...' if len(folder.classes) > 5 else '')
        raise ValueError(f'{len(classnames)} class names for {len(folder.classes)} class folders in {images_dir} '
                         f'({shown}): give one name a line, in the order of the sorted folder names')
    classifier = zeroshot_classifier(model, classnames, templates, batch_size=batch_size)
    probs, targets, paths, skipped = [], [], [], []
    with ThreadPoolExecutor(default_threads(), thread_name_prefix='cnclip-zeroshot') as pool:
        for start in range(0, len(folder), batch_size):
            chunk = folder.samples[start:start + batch_size]
            loaded = _load_batch([p for p, _ in chunk], pool)
            good = []
            for (path, target), img in zip(chunk, loaded):
                if isinstance(img, str):
                    if not skip_errors:
                        raise ValueError(f'{path}: unreadable image ({img}); remove it, or skip unreadable images '
                                         f'(skip_errors=True, CLI --skip-errors)')
                    logger.warning('skipping unreadable image %s: %s', path, img)
                    skipped.append((path, img))
                    continue
                good.append(img)
                targets.append(target)
                paths.append(path)
            if good:
                probs.append(classify(model, good, classifier, batch_size=batch_size).cpu())
    if not probs:
        raise ValueError(f'{images_dir}: none of the {len(folder)} images could be read')
    logits, target = torch.cat(probs), torch.tensor(targets)
    out: dict[str, Any] = {
        'top1': _percent(_hits(logits, target, 1)), 'top5': _percent(_hits(logits, target, 5)),
        'n_images': len(target), 'n_classes': len(folder.classes), 'classes': folder.classes,
        'logits': logits, 'targets': target, 'paths': paths, 'skipped': skipped}
    if per_class:
        hit = _hits(logits, target, 1)
        out['per_class'] = [_percent(hit[target == c]) if (target == c).any() else None
                            for c in range(len(folder.classes))]
    return out


def elevater_output(model: Any, dataset: str, logits: torch.Tensor, save_dir: str | os.PathLike | None = None,
                    arch: str | None = None, index: Sequence[int] | None = None) -> str:
    """The ELEVATER JSON that the official ``zeroshot_evaluation.py`` writes to ``<save_dir>/<dataset>.json``.

    Args:
        model: a :class:`modelscope_cnclip.CNClip` (parameter counts come from ``model.model``).
        dataset: the dataset name (``dataset_name`` and the file name).
        logits: ``(N, C)`` probabilities from :func:`evaluate_zeroshot`.
        save_dir: write ``<save_dir>/<dataset>.json`` there too (the folder is created).
        arch: architecture for ``model_name`` (``CN-CLIP-<arch>``); default: the shipped architecture that the
            model's shapes match, else ``custom``.
        index: reorder the rows like the official ``--index`` (a JSON list of row indices).
    Returns:
        The JSON text, floats rounded to 6 digits (the official ``json_prec_dump``).
    """
    from modelscope_cnclip.config import match_architecture
    net = model.model
    if index is not None:
        logits = logits[torch.as_tensor(list(index), dtype=torch.long)]
    n_params = sum(p.numel() for p in net.parameters())
    output = {
        'model_name': 'CN-CLIP-' + (arch or match_architecture(model.config) or 'custom'),
        'dataset_name': dataset,
        'num_trainable_params': 0,
        'num_params': n_params,
        'num_visual_params': sum(p.numel() for p in net.visual.parameters()),
        'num_backbone_params': n_params,
        'n_shot': 0,
        'rnd_seeds': [123],
        'predictions': [logits.float().cpu().numpy().tolist()],
    }
    # the official json_prec_dump: dump, re-read with every float rounded to 6 digits, dump again
    text = json.dumps(json.loads(json.dumps(output), parse_float=lambda x: round(float(x), 6)))
    if save_dir is not None:
        path = Path(save_dir) / f'{dataset}.json'
        atomic_write_bytes(path, text.encode('utf-8'))
        logger.info('wrote %s', path)
    return text
