"""Retrieval metrics with the official Chinese-CLIP scoring, on embeddings (plain torch, no ModelScope).

Official scoring: each query keeps its top-10 candidates; R@k is the share of queries with a correct candidate among
the first k; MR is the mean of R@1, R@5 and R@10. A text's correct images are all of its ``image_ids``; for
image-to-text, an image's correct texts are the texts that list it.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

__all__ = ['retrieval_metrics', 'inbatch_recall', 'topk_hits', 'evaluate_split']

KS = (1, 5, 10)


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
        top = scores[start:start + chunk].topk(kmax, dim=1).indices  # (q, kmax), best first
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


def evaluate_split(model, data_dir: str, split: str = 'valid', batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Embed an official-format split with ``model`` (a :class:`modelscope_cnclip.CNClip`) and score it."""
    from .data import OfficialSplit
    data = OfficialSplit(data_dir, split)
    ids = data.image_ids
    image_emb = model.encode_image([data.image_bytes(i) for i in ids], batch_size=batch_size).cpu()
    text_emb = model.encode_text([t.text for t in data.texts], batch_size=batch_size).cpu()
    return retrieval_metrics(image_emb, ids, text_emb, [t.image_ids for t in data.texts])
