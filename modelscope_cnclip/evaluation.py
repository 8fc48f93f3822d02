"""Retrieval metrics with the official Chinese-CLIP scoring, on embeddings (plain torch, no ModelScope).

Official scoring: each query keeps its top-10 candidates; R@k is the share of queries with a correct candidate among
the first k; MR is the mean of R@1, R@5 and R@10. A text's correct images are all of its ``image_ids``; for
image-to-text, an image's correct texts are the texts that list it. Ties rank the earlier candidate first, as the
official ``make_topk_predictions*.py`` (a stable sort) do.

The official files: prediction jsonl (t2i ``{"text_id", "image_ids"}``, i2t ``{"image_id", "text_ids"}``, 10
ids a line), ground truth jsonl (t2i: the split's ``{"text_id", "image_ids"}`` texts file; i2t: its transform
``{"image_id", "text_ids"}``), scored by :func:`score_predictions` as ``eval/evaluation.py`` and
``eval/evaluation_tr.py`` do, validation included.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Sequence

import torch

from .data import open_split, read_jsonl

__all__ = ['retrieval_metrics', 'inbatch_recall', 'topk_hits', 'evaluate_split', 'topk_predictions',
           'write_predictions', 't2i_to_i2t', 'score_predictions']

logger = logging.getLogger(__name__)

KS = (1, 5, 10)
NUM_K = 10  # predictions per query that the official scorer requires
#: (query key, candidates key) of each direction's prediction and ground-truth lines.
KEYS = {'t2i': ('text_id', 'image_ids'), 'i2t': ('image_id', 'text_ids')}


def _topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(Q, k)`` column indices of each row's ``k`` highest scores, best first; equal scores keep column order
    (what the official ``sorted(..., reverse=True)`` gives), which plain ``topk`` does not promise."""
    values, idx = scores.topk(k, dim=1)
    # Only rows with a tie inside the top k or at its edge need the (slower) stable sort.
    tied = (scores >= values[:, -1:]).sum(dim=1) > k
    if k > 1:
        tied |= (values[:, 1:] == values[:, :-1]).any(dim=1)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        idx[rows] = scores[rows].sort(dim=1, descending=True, stable=True).indices[:, :k]
    return idx


def topk_hits(scores: torch.Tensor, correct: torch.Tensor, ks: Sequence[int] = KS,
              chunk: int = 4096) -> dict[int, float]:
    """Share of rows (queries) whose top-k columns contain a correct one, for each k, in percent.

    Args:
        scores: ``(Q, C)`` similarities (higher is better).
        correct: ``(Q, C)`` bool, True where candidate c is a correct answer to query q.
    """
    if scores.shape != correct.shape:
        raise ValueError(f'scores {tuple(scores.shape)} and correct {tuple(correct.shape)} differ in shape')
    if scores.shape[0] == 0:
        raise ValueError('no queries to score')
    kmax = min(max(ks), scores.shape[1])
    hits = {k: 0 for k in ks}
    for start in range(0, scores.shape[0], chunk):  # bounded memory for large query sets
        top = _topk_indices(scores[start:start + chunk], kmax)  # (q, kmax), best first
        ok = torch.gather(correct[start:start + chunk], 1, top)
        for k in ks:
            hits[k] += int(ok[:, :k].any(dim=1).sum())
    return {k: 100.0 * hits[k] / scores.shape[0] for k in ks}


def _summary(hits: dict[int, float]) -> dict[str, float]:
    out = {f'r{k}': round(v, 4) for k, v in hits.items()}
    out['mr'] = round(sum(hits.values()) / len(hits), 4)
    return out


def retrieval_metrics(image_emb: torch.Tensor, image_ids: Sequence[Hashable], text_emb: torch.Tensor,
                      text_image_ids: Sequence[Sequence[Hashable]]) -> dict[str, dict[str, float]]:
    """Global text-to-image and image-to-text R@1/5/10 and MR (percent) over the whole evaluation set.

    Args:
        image_emb: ``(N_img, D)`` L2-normalised image embeddings, in the order of ``image_ids``.
        image_ids: the id of each image row.
        text_emb: ``(N_txt, D)`` L2-normalised text embeddings.
        text_image_ids: for each text, the ids of all its correct images.
    Returns:
        ``{"t2i": {"r1", "r5", "r10", "mr"}, "i2t": {...}}``.
    """
    if len(image_ids) != image_emb.shape[0] or len(text_image_ids) != text_emb.shape[0]:
        raise ValueError(f'{image_emb.shape[0]} image embeddings for {len(image_ids)} ids, '
                         f'{text_emb.shape[0]} text embeddings for {len(text_image_ids)} texts')
    column = {img_id: i for i, img_id in enumerate(image_ids)}
    if len(column) != len(image_ids):
        raise ValueError('image_ids contain duplicates')
    correct = torch.zeros(text_emb.shape[0], image_emb.shape[0], dtype=torch.bool)
    for t, ids in enumerate(text_image_ids):
        missing = [i for i in ids if i not in column]
        if missing or not ids:
            raise ValueError(f'text {t}: image ids {missing or "[]"} are not among the evaluated images')
        correct[t, [column[i] for i in ids]] = True
    scores = text_emb.float() @ image_emb.float().T  # (N_txt, N_img)
    t2i = topk_hits(scores, correct)
    has_text = correct.any(dim=0)  # images that some text describes
    i2t = topk_hits(scores.T[has_text], correct.T[has_text])
    return {'t2i': _summary(t2i), 'i2t': _summary(i2t)}


def inbatch_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1,)) -> dict[str, float]:
    """The recall that the ModelScope finetune tutorial logs: pair i is correct, within one batch (percent).

    Keys ``inbatch_t2i_recall_at_{k}`` and ``inbatch_i2t_recall_at_{k}``.
    """
    n = image_emb.shape[0]
    if text_emb.shape[0] != n:
        raise ValueError(f'{n} images but {text_emb.shape[0]} texts: in-batch recall needs aligned pairs')
    scores = text_emb.float() @ image_emb.float().T
    eye = torch.eye(n, dtype=torch.bool)
    t2i, i2t = topk_hits(scores, eye, ks), topk_hits(scores.T, eye, ks)
    out = {f'inbatch_t2i_recall_at_{k}': v for k, v in t2i.items()}
    out.update({f'inbatch_i2t_recall_at_{k}': v for k, v in i2t.items()})
    return out


def evaluate_split(model, data_dir: str, split: str = 'valid', batch_size: int = 64,
                   predictions_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Embed an official-format split (tsv + jsonl, or its LMDB form) with ``model`` (a
    :class:`modelscope_cnclip.CNClip`) and score it.

    With ``predictions_dir``, also write the official files there: ``{split}_predictions.jsonl`` (text-to-image
    top 10), ``{split}_tr_predictions.jsonl`` (image-to-text top 10, every image) and ``{split}_texts.tr.jsonl``
    (the image-to-text ground truth), ready for :func:`score_predictions` or the official scorers.
    """
    data = open_split(data_dir, split)
    ids = data.image_ids
    image_emb = model.encode_image([data.image_bytes(i) for i in ids], batch_size=batch_size).cpu()
    text_emb = model.encode_text([t.text for t in data.texts], batch_size=batch_size).cpu()
    metrics = retrieval_metrics(image_emb, ids, text_emb, [t.image_ids for t in data.texts])
    if predictions_dir is not None:
        out, text_ids = Path(predictions_dir), [t.text_id for t in data.texts]
        scores = text_emb.float() @ image_emb.float().T  # (N_txt, N_img)
        write_predictions(out / f'{split}_predictions.jsonl', topk_predictions(scores, text_ids, ids), 't2i')
        write_predictions(out / f'{split}_tr_predictions.jsonl', topk_predictions(scores.T, ids, text_ids), 'i2t')
        truth = t2i_to_i2t({'text_id': t.text_id, 'image_ids': list(t.image_ids)} for t in data.texts)
        _write_jsonl(out / f'{split}_texts.tr.jsonl', truth)
        logger.info('wrote the official prediction files of %s to %s', split, out)
    return metrics


# --- the official prediction files and scorer -------------------------------------------------------------------------

def topk_predictions(scores: torch.Tensor, query_ids: Sequence[Hashable], candidate_ids: Sequence[Hashable],
                     k: int = NUM_K, chunk: int = 4096) -> list[tuple[Hashable, list]]:
    """Each query's ``k`` best candidates, best first (ties: earlier candidate first, as the official scripts).

    Args:
        scores: ``(Q, C)`` similarities, rows in the order of ``query_ids``, columns of ``candidate_ids``.
        k: predictions per query (the official scorer requires 10); fewer if there are fewer candidates.
    Returns:
        ``[(query_id, [candidate_id, ...]), ...]`` in query order.
    """
    if scores.dim() != 2 or scores.shape != (len(query_ids), len(candidate_ids)):
        raise ValueError(f'scores {tuple(scores.shape)} must be (len(query_ids), len(candidate_ids)) = '
                         f'({len(query_ids)}, {len(candidate_ids)})')
    if k < 1:
        raise ValueError(f'k={k}: need at least one prediction per query')
    if k > len(candidate_ids):
        logger.warning('only %d candidates: each query gets %d predictions (the official scorer requires %d)',
                       len(candidate_ids), len(candidate_ids), k)
        k = len(candidate_ids)
    out = []
    for start in range(0, len(query_ids), chunk):
        top = _topk_indices(scores[start:start + chunk].float(), k).tolist()
        out += [(q, [candidate_ids[c] for c in row]) for q, row in zip(query_ids[start:start + chunk], top)]
    return out


def _write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        for rec in records:
            f.write(json.dumps(rec) + '\n')  # the official scripts' json.dumps defaults
    return path


def write_predictions(path: str | os.PathLike, predictions: Iterable[tuple[Hashable, Sequence[Hashable]]],
                      direction: str = 't2i') -> Path:
    """Write :func:`topk_predictions` as the official jsonl: t2i ``{"text_id", "image_ids"}`` lines, i2t
    ``{"image_id", "text_ids"}`` lines. The official scorer needs integer ids."""
    query_key, cand_key = _keys(direction)
    records = [{query_key: q, cand_key: list(c)} for q, c in predictions]
    if any(not isinstance(i, int) for r in records for i in (r[query_key], *r[cand_key])):
        logger.warning('%s: ids are not all integers; the official scorer rejects such files', path)
    return _write_jsonl(Path(path), records)


def _keys(direction: str) -> tuple[str, str]:
    if direction not in KEYS:
        raise ValueError(f'direction={direction!r}: choose one of {list(KEYS)}')
    return KEYS[direction]


def t2i_to_i2t(ground_truth: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The image-to-text ground truth of a text-to-image one, as the official ``transform_ir_annotation_to_tr.py``:
    ``{"text_id", "image_ids"}`` records -> ``{"image_id", "text_ids"}`` records, images in order of first
    mention, each with the texts that list it in input order."""
    by_image: dict[Hashable, list] = {}
    for rec in ground_truth:
        for image_id in rec['image_ids']:
            by_image.setdefault(image_id, []).append(rec['text_id'])
    return [{'image_id': i, 'text_ids': t} for i, t in by_image.items()]


def _read_ground_truth(path: str | os.PathLike, direction: str = 't2i') -> dict[Hashable, tuple[list, int]]:
    """Read a ground-truth jsonl as the official scorers do: ``{query id: (correct ids, line number)}`` (a repeated
    query keeps its last line). For ``'i2t'`` a text-to-image file (the split's texts jsonl) is transformed with
    :func:`t2i_to_i2t`, so the split's own texts file serves both directions."""
    path = Path(path)
    query_key, cand_key = _keys(direction)
    lines = read_jsonl(path)
    if not lines:
        raise ValueError(f'{path}: empty ground truth')
    if direction == 'i2t' and isinstance(lines[0][1], dict) and 'text_id' in lines[0][1]:
        first_line: dict = {}
        records = []
        for n, obj in lines:
            records.append(_check_record(obj, path, n, *KEYS['t2i']))
            for image_id in obj['image_ids']:
                first_line.setdefault(image_id, n)
        return {r[query_key]: (r[cand_key], first_line[r[query_key]]) for r in t2i_to_i2t(records)}
    return {_check_record(obj, path, n, query_key, cand_key)[query_key]: (obj[cand_key], n) for n, obj in lines}


def _check_record(obj: Any, path: Path, n: int, query_key: str, cand_key: str) -> dict:
    if not isinstance(obj, dict) or query_key not in obj or not isinstance(obj.get(cand_key), list):
        raise ValueError(f'{path}:{n}: expected a {{"{query_key}", "{cand_key}": [...]}} object')
    return obj


def _read_predictions(path: Path, direction: str, k: int) -> dict[Hashable, list]:
    """The official ``read_submission`` checks, with errors naming the file and line."""
    query_key, cand_key = KEYS[direction]
    out: dict[Hashable, list] = {}
    where: dict[Hashable, int] = {}
    for n, obj in read_jsonl(path):
        at = f'{path}:{n}'
        if not isinstance(obj, dict) or query_key not in obj:
            raise ValueError(f'{at}: no "{query_key}" (each line is {{"{query_key}": int, "{cand_key}": [...]}})')
        qid = obj[query_key]
        if not _is_int(qid):
            raise ValueError(f'{at}: {query_key} {qid!r} must be an integer (not a string)')
        ranked = obj.get(cand_key)
        if not isinstance(ranked, list):
            raise ValueError(f'{at}: "{cand_key}" of {query_key} {qid} must be a list')
        if len(ranked) != k:
            raise ValueError(f'{at}: {query_key} {qid} has {len(ranked)} predicted {cand_key}; {k} are required')
        bad = next((r for r, c in enumerate(ranked, 1) if not _is_int(c)), None)
        if bad is not None:
            raise ValueError(f'{at}: {query_key} {qid} has an invalid {cand_key[:-1]} {ranked[bad - 1]!r} at rank '
                             f'{bad}; ids must be integers')
        if len(set(ranked)) != k:
            raise ValueError(f'{at}: {query_key} {qid} has duplicate {cand_key}')
        if qid in where:
            raise ValueError(f'{at}: {query_key} {qid} again (first on line {where[qid]}); one line per query')
        out[qid], where[qid] = ranked, n
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def score_predictions(predictions_path: str | os.PathLike, ground_truth_path: str | os.PathLike,
                      direction: str = 't2i') -> dict[str, float]:
    """Score an official prediction file against a ground truth exactly as ``eval/evaluation.py`` (t2i) and
    ``eval/evaluation_tr.py`` (i2t) do: the same checks (integer ids, 10 distinct predictions a line, every
    ground-truth query predicted) and the same numbers. Stricter in one way: a query predicted on two lines is an
    error (the official silently keeps the last).

    Args:
        predictions_path: jsonl of ``{"text_id", "image_ids"}`` (t2i) or ``{"image_id", "text_ids"}`` (i2t).
        ground_truth_path: the split's texts jsonl (either direction), or an i2t ``{"image_id", "text_ids"}`` file.
        direction: ``'t2i'`` or ``'i2t'``.
    Returns:
        ``{"r1", "r5", "r10", "mr"}`` in percent, unrounded: the official ``r1``, ``r5``, ``r10`` and
        ``mean_recall``.
    Raises:
        ValueError: a malformed line (named by file and line), or ground-truth queries without a prediction.
    """
    _keys(direction)
    predictions_path = Path(predictions_path)
    reference = _read_ground_truth(ground_truth_path, direction)
    predictions = _read_predictions(predictions_path, direction, NUM_K)
    missing = [(q, n) for q, (_, n) in reference.items() if q not in predictions]
    if missing:
        query_key = KEYS[direction][0]
        shown = ', '.join(f'{q} (line {n})' for q, n in missing[:5]) + (', ...' if len(missing) > 5 else '')
        raise ValueError(f'{predictions_path}: {len(missing)} {query_key}s of {ground_truth_path} have no prediction: '
                         f'{shown}; predict every query of the ground truth')
    stats = [0, 0, 0]
    for qid, (correct, _) in reference.items():
        ranked = predictions[qid]
        for i, cut in enumerate((1, 5, 10)):
            stats[i] += any(c in ranked[:cut] for c in set(correct))
    r1, r5, r10 = (s * 1.0 / len(reference) for s in stats)  # the official arithmetic, for identical floats
    return {'r1': r1 * 100, 'r5': r5 * 100, 'r10': r10 * 100, 'mr': (r1 + r5 + r10) / 3.0 * 100}
