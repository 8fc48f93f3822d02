"""Retrieval metrics with the official Chinese-CLIP scoring, on embeddings (plain torch, no ModelScope).

Official scoring: each query keeps its top-10 candidates; R@k is the share of queries with a correct candidate among
the first k; MR is the mean of R@1, R@5 and R@10. A text's correct images are all of its ``image_ids``; for
image-to-text, an image's correct texts are the texts that list it. Ties rank the earlier candidate first, as the
official ``make_topk_predictions*.py`` (a stable sort) do.

Memory stays bounded on any split size: images are decoded, resized and embedded a batch at a time (the streaming
decode of ``cnclip embed``), and both directions are ranked a chunk of queries at a time, keeping only each
query's top 10 (``O(chunk x N)``, never the ``N_text x N_image`` matrix). The same top-10 lists give the metrics
and the prediction files.

The official files: prediction jsonl (t2i ``{"text_id", "image_ids"}``, i2t ``{"image_id", "text_ids"}``, 10
ids a line), ground truth jsonl (t2i: the split's ``{"text_id", "image_ids"}`` texts file; i2t: its transform
``{"image_id", "text_ids"}``), scored by :func:`score_predictions` as ``eval/evaluation.py`` and
``eval/evaluation_tr.py`` do, validation included.

Unlabelled texts (``"image_ids": []``, MUGE's test set form) are predicted but not scored: :func:`evaluate_split`
writes the submission files for a wholly unlabelled split and scores the labelled texts of a partly labelled one.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch

from modelscope_cnclip.config import DEFAULT_BATCH, Direction
from modelscope_cnclip.data import LmdbSplit, id_key, open_split, parse_id, read_jsonl
from modelscope_cnclip.inference import CNClip
from modelscope_cnclip.jobs.collection import Collection, Item
from modelscope_cnclip.jobs.shards import embed_items
from modelscope_cnclip.utils import atomic_write_bytes, default_threads

__all__ = ['retrieval_metrics', 'inbatch_recall', 'topk_hits', 'rank_both', 'evaluate_split', 'evaluate_pairs',
           'embed_image_stream', 'topk_predictions', 'write_predictions', 't2i_to_i2t', 'score_predictions']

logger = logging.getLogger(__name__)

KS = (1, 5, 10)
NUM_K = 10  # predictions per query that the official scorer requires
#: (query key, candidates key) of each direction's prediction and ground-truth lines.
KEYS = {'t2i': ('text_id', 'image_ids'), 'i2t': ('image_id', 'text_ids')}
#: Scores computed at once while ranking (64 MB of float32): a chunk is this many elements // candidates rows.
CHUNK_ELEMENTS = 1 << 24


# --- ranking in query chunks ----------------------------------------------------------------------------------------

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


def _row_chunks(n: int, rows: int) -> list[slice]:
    """``n`` rows cut into near-equal slices of at most ``rows`` rows (no tiny last slice)."""
    parts = max(1, -(-n // max(1, rows)))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _rank(scores_of: Callable[[slice], torch.Tensor], n_queries: int, n_candidates: int, k: int,
          chunk: int | None = None) -> torch.Tensor:
    """``(n_queries, k)`` int64: each query's ``k`` best candidates, best first (ties: earlier first).

    ``scores_of(rows)`` gives the ``(len(rows), n_candidates)`` scores of a slice of queries; at most ``chunk``
    rows (default: :data:`CHUNK_ELEMENTS` // ``n_candidates``) exist at a time.
    """
    rows = chunk or max(1, CHUNK_ELEMENTS // max(1, n_candidates))
    out = torch.empty(n_queries, k, dtype=torch.long)
    for s in _row_chunks(n_queries, rows):
        out[s] = _topk_indices(scores_of(s).float(), k).cpu()
    return out


def _num_predictions(n_candidates: int, k: int = NUM_K) -> int:
    if k < 1:
        raise ValueError(f'k={k}: need at least one prediction per query')
    if k > n_candidates:
        logger.warning('only %d candidates: each query gets %d predictions (the official scorer requires %d)',
                       n_candidates, n_candidates, k)
    return min(k, n_candidates)


def rank_both(text_emb: torch.Tensor, image_emb: torch.Tensor, k: int = NUM_K, *,
              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's ``k`` best images and each image's ``k`` best texts, a chunk of queries at a time.

    Both directions take their scores from the product ``text @ image.T`` (image-to-text: a block of its
    columns), so they see the same float values as the full matrix and its transpose.

    Args:
        text_emb: ``(N_txt, D)`` L2-normalised; image_emb: ``(N_img, D)`` L2-normalised.
        k: best candidates kept per query (fewer when there are fewer candidates).
        chunk: queries scored at once (default: :data:`CHUNK_ELEMENTS` // candidates); memory ``O(chunk x N)``.
    Returns:
        ``(t2i, i2t)``: ``(N_txt, k)`` image rows and ``(N_img, k)`` text rows, int64, best first; equal scores
        keep the earlier candidate first.
    """
    txt, img = text_emb.float(), image_emb.float()
    t2i = _rank(lambda s: txt[s] @ img.T, len(txt), len(img), min(k, len(img)), chunk)  # (chunk, N_img)
    i2t = _rank(lambda s: (txt @ img[s].T).T, len(img), len(txt), min(k, len(txt)), chunk)  # (chunk, N_txt)
    return t2i, i2t


def _hits(top: torch.Tensor, correct: Sequence[set[int]], ks: Sequence[int] = KS) -> dict[int, float]:
    """Percent of the queries with a non-empty ``correct`` set whose first k ranked candidates hold one of it.

    Args:
        top: ``(Q, k)`` ranked candidate indices; correct: for each query, the indices that are correct.
    Raises:
        ValueError: no query has a correct candidate.
    """
    scored = [(row, ok) for row, ok in zip(top.tolist(), correct) if ok]
    if not scored:
        raise ValueError('no queries to score: none has a correct candidate')
    hits = dict.fromkeys(ks, 0)
    for row, ok in scored:
        first = next((rank for rank, c in enumerate(row) if c in ok), len(row))
        for k in ks:
            hits[k] += first < k
    return {k: 100.0 * hits[k] / len(scored) for k in ks}


def topk_hits(scores: torch.Tensor, correct: torch.Tensor, ks: Sequence[int] = KS,
              chunk: int | None = None) -> dict[int, float]:
    """Share of rows (queries) whose top-k columns contain a correct one, for each k, in percent.

    Args:
        scores: ``(Q, C)`` similarities (higher is better).
        correct: ``(Q, C)`` bool, True where candidate c is a correct answer to query q.
        chunk: rows ranked at once.
    """
    if scores.shape != correct.shape:
        raise ValueError(f'scores {tuple(scores.shape)} and correct {tuple(correct.shape)} differ in shape')
    if scores.shape[0] == 0:
        raise ValueError('no queries to score')
    top = _rank(lambda s: scores[s], scores.shape[0], scores.shape[1], min(max(ks), scores.shape[1]), chunk)
    ok = torch.gather(correct, 1, top)  # (Q, k)
    return {k: 100.0 * int(ok[:, :k].any(dim=1).sum()) / scores.shape[0] for k in ks}


def _summary(hits: dict[int, float]) -> dict[str, float]:
    out = {f'r{k}': round(v, 4) for k, v in hits.items()}
    out['mr'] = round(sum(hits.values()) / len(hits), 4)
    return out


def _correct_sets(image_ids: Sequence[Hashable],
                  text_image_ids: Sequence[Sequence[Hashable]]) -> tuple[list[set[int]], list[set[int]]]:
    """For each text the image rows it lists, and for each image the text rows that list it."""
    column = {img_id: i for i, img_id in enumerate(image_ids)}
    if len(column) != len(image_ids):
        raise ValueError('image_ids contain duplicates')
    t2i: list[set[int]] = []
    i2t: list[set[int]] = [set() for _ in image_ids]
    for t, ids in enumerate(text_image_ids):
        missing = [i for i in ids if i not in column]
        if missing:
            raise ValueError(f'text {t}: image ids {missing} are not among the evaluated images')
        t2i.append({column[i] for i in ids})
        for c in t2i[-1]:
            i2t[c].add(t)
    return t2i, i2t


def _metrics(t2i_top: torch.Tensor, i2t_top: torch.Tensor, t2i_correct: Sequence[set[int]],
             i2t_correct: Sequence[set[int]]) -> dict[str, dict[str, float]]:
    """Official R@1/5/10 and MR of both directions from the ranked top-k; queries without a correct answer are
    left out (unlabelled texts; images no text describes)."""
    return {'t2i': _summary(_hits(t2i_top, t2i_correct)), 'i2t': _summary(_hits(i2t_top, i2t_correct))}


def retrieval_metrics(image_emb: torch.Tensor, image_ids: Sequence[Hashable], text_emb: torch.Tensor,
                      text_image_ids: Sequence[Sequence[Hashable]], *,
                      chunk: int | None = None) -> dict[str, dict[str, float]]:
    """Global text-to-image and image-to-text R@1/5/10 and MR (percent) over the whole evaluation set.

    Args:
        image_emb: ``(N_img, D)`` L2-normalised image embeddings, in the order of ``image_ids``.
        image_ids: the id of each image row.
        text_emb: ``(N_txt, D)`` L2-normalised text embeddings.
        text_image_ids: for each text, the ids of all its correct images. A text with none is a candidate for
            image-to-text but not a query (an unlabelled text).
        chunk: queries ranked at once (memory ``O(chunk x N)``; the numbers do not depend on it).
    Returns:
        ``{"t2i": {"r1", "r5", "r10", "mr"}, "i2t": {...}}``.
    Raises:
        ValueError: mismatched lengths, duplicate image ids, unknown image ids, or no text with a correct image.
    """
    if len(image_ids) != image_emb.shape[0] or len(text_image_ids) != text_emb.shape[0]:
        raise ValueError(f'{image_emb.shape[0]} image embeddings for {len(image_ids)} ids, '
                         f'{text_emb.shape[0]} text embeddings for {len(text_image_ids)} texts')
    t2i_correct, i2t_correct = _correct_sets(image_ids, text_image_ids)
    t2i, i2t = rank_both(text_emb, image_emb, max(KS), chunk=chunk)
    return _metrics(t2i, i2t, t2i_correct, i2t_correct)


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


# --- streaming image embeddings -------------------------------------------------------------------------------------

class _ImagesByPosition(Collection):
    """Images read by position through ``read(n)``, as a collection for
    :func:`~modelscope_cnclip.jobs.shards.embed_items` (items are named by the image ids, so its warnings name them).
    """

    def __init__(self, read: Callable[[int], Any], ids: Sequence[Hashable], where: str) -> None:
        super().__init__([Item(id_key(i), f'{where}[{n}]') for n, i in enumerate(ids)], 'image', 'memory', where)
        self.read_at = read
        self.position = {item: n for n, item in enumerate(self.items)}

    def read(self, item: Item) -> Any:
        return self.read_at(self.position[item])


def embed_image_stream(model: CNClip, read: Callable[[int], Any], ids: Sequence[Hashable], batch_size: int = 64,
                       skip_errors: bool = False, where: str = 'images',
                       num_threads: int = 0) -> tuple[list[int], torch.Tensor]:
    """Embed the images ``read(0)``, ..., ``read(len(ids) - 1)`` streaming, as ``cnclip embed`` does: each is read
    and decoded in ``num_threads`` threads (0: one per CPU, at most 8) a few batches ahead of the model, and only
    the embeddings are kept (memory: ``batch_size`` decoded images, not every encoded image).

    Args:
        model: the model; read: position -> any image input (bytes, path, PIL image, ...).
        ids: the image ids, named in warnings and errors; where: what the images are, for messages.
        skip_errors: leave out unreadable images (each logged) instead of raising.
    Returns:
        ``(positions embedded, (n, D) float32 L2-normalised embeddings on the CPU)``, in input order.
    Raises:
        ValueError: an unreadable image (named by id, with the reason), unless ``skip_errors``.
    """
    coll = _ImagesByPosition(read, ids, where)
    threads = num_threads or default_threads()
    pool = ThreadPoolExecutor(threads, thread_name_prefix='cnclip-eval') if threads > 1 else None
    try:
        done, vectors, failed = embed_items(model, coll, coll.items, batch_size, pool=pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if failed and not skip_errors:
        shown = '; '.join(f'image {f["id"]}: {f["error"]}' for f in failed[:3])
        raise ValueError(f'{where}: {len(failed)} of {len(ids)} images cannot be read ({shown}'
                         f'{"; ..." if len(failed) > 3 else ""}); fix or remove them, or skip them (trainer: '
                         f'skip_errors=True)')
    return [coll.position[i] for i in done], torch.from_numpy(vectors)


# --- evaluating a split and a trainer's pairs ---------------------------------------------------------------------

def _check_texts(data: Any, data_dir: str | os.PathLike, split: str, labelled: int,
                 predictions_dir: str | os.PathLike | None) -> None:
    """Refuse, before any embedding, a split with nothing to do."""
    if not data.texts:
        lmdb = (' The LMDB form stores (image, text) pairs only, so texts without image_ids (an unlabelled test '
                f'split) are not in it: evaluate the tsv + jsonl form ({split}_imgs.tsv + {split}_texts.jsonl) '
                'with --out DIR (CLI) to predict them.') if isinstance(data, LmdbSplit) else ''
        raise ValueError(f'{data_dir}: split {split!r} has no texts to evaluate.{lmdb}')
    if not labelled and predictions_dir is None:
        raise ValueError(f'{data_dir}: none of the {len(data.texts)} texts of split {split!r} has image_ids (an '
                         f'unlabelled split, like MUGE\'s test set): there is no ground truth to score. Pass '
                         f'predictions_dir (CLI: --out DIR) to write the official top-{NUM_K} submission '
                         f'files {split}_predictions.jsonl and {split}_tr_predictions.jsonl')


def _unlabelled_note(split: str, unlabelled: int, total: int) -> str:
    if unlabelled == total:
        return (f'no ground truth to score: none of the {total} texts of {split} has image_ids (an unlabelled '
                f'split); only the top-{NUM_K} predictions were written')
    return (f'{unlabelled} of {total} texts of {split} have no image_ids: they are predicted but not scored (R@k '
            f'over the {total - unlabelled} labelled texts; the official scorer would count them as misses)')


def evaluate_split(model: CNClip, data_dir: str | os.PathLike, split: str = 'valid', *, batch_size: int = DEFAULT_BATCH,
                   predictions_dir: str | os.PathLike | None = None, chunk: int | None = None) -> dict[str, Any]:
    """Embed an official-format split (tsv + jsonl, or its LMDB form) with ``model`` and score it.

    Images stream through the threaded decode a batch at a time; both directions are ranked in query chunks.

    With ``predictions_dir``, also write the official files there: ``{split}_predictions.jsonl`` (text-to-image
    top 10, every text), ``{split}_tr_predictions.jsonl`` (image-to-text top 10, every image) and, when some text
    is labelled, ``{split}_texts.tr.jsonl`` (the image-to-text ground truth), ready for :func:`score_predictions`
    or the official scorers.

    Args:
        chunk: queries ranked at once (memory ``O(chunk x N)``; the numbers do not depend on it).
    Returns:
        ``{"t2i": {"r1", "r5", "r10", "mr"}, "i2t": {...}}``. When texts lack ``image_ids``, also
        ``"unlabelled_texts"`` (their count) and ``"note"``; a wholly unlabelled split (MUGE's test form) has
        ``"t2i"`` and ``"i2t"`` None (nothing to score; only the predictions are written).
    Raises:
        ValueError: a split without texts, an unlabelled split without ``predictions_dir``, or an unreadable image.
    """
    data = open_split(data_dir, split)
    texts = data.texts
    labelled = sum(1 for t in texts if t.image_ids)
    _check_texts(data, data_dir, split, labelled, predictions_dir)
    ids = data.image_ids
    positions, image_emb = embed_image_stream(model, lambda n: data.image_bytes(ids[n]), ids, batch_size,
                                              where=f'{data_dir} ({split})')
    assert len(positions) == len(ids)  # without skip_errors every image is embedded
    text_emb = model.encode_text([t.text for t in texts], batch_size=batch_size).cpu()
    if predictions_dir is not None:
        for n_candidates in (len(ids), len(texts)):  # warns when a direction has fewer than 10 candidates
            _num_predictions(n_candidates)
    t2i, i2t = rank_both(text_emb, image_emb, NUM_K, chunk=chunk)
    result: dict[str, Any] = {'t2i': None, 'i2t': None}
    if labelled:
        result.update(_metrics(t2i, i2t, *_correct_sets(ids, [t.image_ids for t in texts])))
    if labelled < len(texts):
        result['unlabelled_texts'] = len(texts) - labelled
        result['note'] = _unlabelled_note(split, len(texts) - labelled, len(texts))
        logger.warning('%s: %s', data_dir, result['note'])
    if predictions_dir is not None:
        _write_split_predictions(Path(predictions_dir), split, texts, ids, t2i, i2t, labelled > 0)
    return result


def _write_split_predictions(out: Path, split: str, texts: Sequence[Any], ids: Sequence[Hashable],
                             t2i: torch.Tensor, i2t: torch.Tensor, labelled: bool) -> None:
    text_ids = [t.text_id for t in texts]
    write_predictions(out / f'{split}_predictions.jsonl', _as_predictions(t2i, text_ids, ids), 't2i')
    write_predictions(out / f'{split}_tr_predictions.jsonl', _as_predictions(i2t, ids, text_ids), 'i2t')
    if labelled:
        truth = t2i_to_i2t({'text_id': t.text_id, 'image_ids': list(t.image_ids)} for t in texts)
        _write_jsonl(out / f'{split}_texts.tr.jsonl', truth)
    logger.info('wrote the official prediction files of %s to %s', split, out)


def evaluate_pairs(model: CNClip, pairs: Sequence[tuple[Any, str, Hashable]], batch_size: int = 64,
                   skip_errors: bool = False, chunk: int | None = None) -> dict[str, Any]:
    """Score ``(image, text, image_id)`` pairs (a trainer's evaluation set): every distinct image (by id) and text
    is embedded once, in order, whatever order or subset a data loader would draw.

    Args:
        pairs: ``image`` is any image input or a zero-argument callable returning one.
        batch_size: the embedding batch and the in-batch recall's batch (consecutive chunks of pairs).
        skip_errors: leave out unreadable images (logged) and their pairs, instead of raising.
    Returns:
        ``{"t2i": {...}, "i2t": {...}}`` (official scoring over the distinct images and texts; a text's correct
        images are all it is paired with), ``"inbatch"``: the tutorial's ``inbatch_*_recall_at_1`` averaged over
        the chunks (weighted by size), and ``"skipped"``: ids of unreadable images left out.
    Raises:
        ValueError: an unreadable image (named by id) unless ``skip_errors``; no pair left.
    """
    first_row: dict[Hashable, int] = {}
    for row, (_, _, image_id) in enumerate(pairs):
        first_row.setdefault(image_id, row)
    ids = list(first_row)

    def read(n: int) -> Any:
        image = pairs[first_row[ids[n]]][0]
        return image() if callable(image) else image

    positions, image_emb = embed_image_stream(model, read, ids, batch_size, skip_errors, 'evaluation images')
    image_row = {ids[n]: r for r, n in enumerate(positions)}
    skipped = [i for i in ids if i not in image_row]
    kept = [(text, image_id) for _, text, image_id in pairs if image_id in image_row]
    if not kept:
        raise ValueError(f'no evaluation pair has a readable image ({len(skipped)} unreadable)')
    text_row = {t: r for r, t in enumerate(dict.fromkeys(t for t, _ in kept))}
    text_images: dict[str, list] = {}
    for text, image_id in kept:
        text_images.setdefault(text, []).append(image_id)
    text_emb = model.encode_text(list(text_row), batch_size=batch_size).cpu()
    metrics: dict[str, Any] = retrieval_metrics(image_emb, list(image_row), text_emb, list(text_images.values()),
                                                chunk=chunk)
    metrics['inbatch'] = _inbatch_over_chunks(image_emb[[image_row[i] for _, i in kept]],
                                              text_emb[[text_row[t] for t, _ in kept]], batch_size)
    metrics['skipped'] = skipped
    return metrics


def _inbatch_over_chunks(image_emb: torch.Tensor, text_emb: torch.Tensor, batch_size: int) -> dict[str, float]:
    """:func:`inbatch_recall` of consecutive chunks of ``batch_size`` aligned ``(N, D)`` pairs, averaged with each
    chunk weighted by its size (as batches of an evaluation loader that keeps its last, short batch)."""
    chunks = []
    for start in range(0, len(image_emb), batch_size):
        img, txt = image_emb[start:start + batch_size], text_emb[start:start + batch_size]
        chunks.append((len(img), inbatch_recall(img, txt)))
    return {key: sum(n * r[key] for n, r in chunks) / len(image_emb) for key in chunks[0][1]}


# --- the official prediction files and scorer -------------------------------------------------------------------------

def _as_predictions(top: torch.Tensor, query_ids: Sequence[Hashable],
                    candidate_ids: Sequence[Hashable]) -> list[tuple[Hashable, list]]:
    """Ranked ``(Q, k)`` candidate indices -> ``[(query_id, [candidate_id, ...]), ...]``."""
    return [(q, [candidate_ids[c] for c in row]) for q, row in zip(query_ids, top.tolist())]


def topk_predictions(scores: torch.Tensor, query_ids: Sequence[Hashable], candidate_ids: Sequence[Hashable],
                     *, k: int = NUM_K, chunk: int | None = None) -> list[tuple[Hashable, list]]:
    """Each query's ``k`` best candidates, best first (ties: earlier candidate first, as the official scripts).

    Args:
        scores: ``(Q, C)`` similarities, rows in the order of ``query_ids``, columns of ``candidate_ids``.
        k: predictions per query (the official scorer requires 10); fewer if there are fewer candidates.
        chunk: rows ranked at once.
    Returns:
        ``[(query_id, [candidate_id, ...]), ...]`` in query order.
    """
    if scores.dim() != 2 or scores.shape != (len(query_ids), len(candidate_ids)):
        raise ValueError(f'scores {tuple(scores.shape)} must be (len(query_ids), len(candidate_ids)) = '
                         f'({len(query_ids)}, {len(candidate_ids)})')
    k = _num_predictions(len(candidate_ids), k)
    return _as_predictions(_rank(lambda s: scores[s], len(query_ids), len(candidate_ids), k, chunk), query_ids,
                           candidate_ids)


def _write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Written atomically: a reader (or a crash) never sees half a prediction file."""
    text = ''.join(json.dumps(rec) + '\n' for rec in records)  # the official scripts' json.dumps defaults
    atomic_write_bytes(path, text.encode('utf-8'))
    return path


def write_predictions(path: str | os.PathLike, predictions: Iterable[tuple[Hashable, Sequence[Hashable]]],
                      direction: Direction = 't2i') -> Path:
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


def _score_key(value: Any) -> Any:
    """A ground-truth id as the scorer compares it with predicted (integer) ids: the official ``==``, except that
    a string holding an integer (``"1000"``) is that integer, as the official data tools treat it."""
    return parse_id(value) if isinstance(value, str) else value


def _read_ground_truth(path: str | os.PathLike, direction: str = 't2i') -> dict[Hashable, tuple[set, int]]:
    """Read a ground-truth jsonl as the official scorers do: ``{query id: (correct ids, line number)}`` (a repeated
    query keeps its last line; ids as :func:`_score_key` makes them). For ``'i2t'`` a text-to-image file (the
    split's texts jsonl) is transformed with :func:`t2i_to_i2t`, so the split's own texts file serves both
    directions."""
    path = Path(path)
    query_key, cand_key = _keys(direction)
    lines = read_jsonl(path)
    if not lines:
        raise ValueError(f'{path}: empty ground truth')
    if direction == 'i2t' and isinstance(lines[0][1], dict) and 'text_id' in lines[0][1]:
        first_line: dict = {}
        records = []
        for n, obj in lines:
            text_id, image_ids = _check_record(obj, path, n, *KEYS['t2i'])
            records.append({'text_id': text_id, 'image_ids': image_ids})
            for image_id in image_ids:
                first_line.setdefault(image_id, n)
        return {r[query_key]: (set(r[cand_key]), first_line[r[query_key]]) for r in t2i_to_i2t(records)}
    out = {}
    for n, obj in lines:
        query, correct = _check_record(obj, path, n, query_key, cand_key)
        out[query] = (set(correct), n)
    return out


def _check_record(obj: Any, path: Path, n: int, query_key: str, cand_key: str) -> tuple[Hashable, list]:
    """``(query id, correct ids)`` of a ground-truth line, ids as :func:`_score_key` makes them."""
    if not isinstance(obj, dict) or query_key not in obj or not isinstance(obj.get(cand_key), list):
        raise ValueError(f'{path}:{n}: expected a {{"{query_key}", "{cand_key}": [...]}} object')
    ids = [obj[query_key], *obj[cand_key]]
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, str, float))]
    if bad:
        raise ValueError(f'{path}:{n}: id {bad[0]!r} must be an integer (or a string of one)')
    return _score_key(obj[query_key]), [_score_key(i) for i in obj[cand_key]]


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


def _shown(items: Sequence[tuple[Hashable, int]]) -> str:
    return ', '.join(f'{q} (line {n})' for q, n in items[:5]) + (', ...' if len(items) > 5 else '')


def _check_labelled(reference: Mapping[Hashable, tuple[set, int]], path: Any, direction: str) -> None:
    """Refuse a ground truth where no query has a correct id; warn about the queries without one (they count as
    misses, as in the official scorer) and about ids no integer prediction can match."""
    query_key, cand_key = KEYS[direction]
    empty = [(q, n) for q, (correct, n) in reference.items() if not correct]
    if not reference:  # an i2t ground truth made from a texts file that lists no image
        raise ValueError(f'{path}: no text lists an image: an unlabelled ground truth, like a test split, has '
                         f'nothing to score; score against labelled data')
    if len(empty) == len(reference):
        raise ValueError(f'{path}: none of the {len(reference)} {query_key}s has a correct {cand_key[:-1]} '
                         f'("{cand_key}": [] on every line): an unlabelled ground truth, like a test split, has '
                         f'nothing to score (every R@k would be 0 by construction); score against labelled data')
    if empty:
        logger.warning('%s: %d of %d %ss have no correct %s; they count as misses, as in the official scorer '
                       '(R@k is at most %.2f): %s', path, len(empty), len(reference), query_key, cand_key[:-1],
                       100.0 * (len(reference) - len(empty)) / len(reference), _shown(empty))
    odd = sorted({repr(c) for correct, _ in reference.values() for c in correct
                  if not (_is_int(c) or isinstance(c, float) and c.is_integer())})
    if odd:
        logger.warning('%s: %d correct %s are not integers (%s); predictions hold integers, so they never match',
                       path, len(odd), cand_key, ', '.join(odd[:5]))


def score_predictions(predictions_path: str | os.PathLike, ground_truth_path: str | os.PathLike,
                      direction: Direction = 't2i') -> dict[str, float]:
    """Score an official prediction file against a ground truth exactly as ``eval/evaluation.py`` (t2i) and
    ``eval/evaluation_tr.py`` (i2t) do: the same checks (integer ids, 10 distinct predictions a line, every
    ground-truth query predicted) and the same numbers. Stricter in one way: a query predicted on two lines is an
    error (the official silently keeps the last). More lenient in one: ground-truth ids written as strings
    (``"1000"``) match the integer predictions, as the official data tools compare ids as strings.

    Ground-truth queries without a correct id count as misses, as in the official scorer, with a warning that
    counts them; a ground truth where no query has one (an unlabelled test split) is refused.

    Args:
        predictions_path: jsonl of ``{"text_id", "image_ids"}`` (t2i) or ``{"image_id", "text_ids"}`` (i2t).
        ground_truth_path: the split's texts jsonl (either direction), or an i2t ``{"image_id", "text_ids"}`` file.
        direction: ``'t2i'`` or ``'i2t'``.
    Returns:
        ``{"r1", "r5", "r10", "mr"}`` in percent, unrounded: the official ``r1``, ``r5``, ``r10`` and
        ``mean_recall``.
    Raises:
        ValueError: a malformed line (named by file and line), ground-truth queries without a prediction, or an
            unlabelled ground truth.
    """
    _keys(direction)
    predictions_path = Path(predictions_path)
    reference = _read_ground_truth(ground_truth_path, direction)
    _check_labelled(reference, ground_truth_path, direction)
    predictions = _read_predictions(predictions_path, direction, NUM_K)
    missing = [(q, n) for q, (_, n) in reference.items() if q not in predictions]
    if missing:
        raise ValueError(f'{predictions_path}: {len(missing)} {KEYS[direction][0]}s of {ground_truth_path} have no '
                         f'prediction: {_shown(missing)}; predict every query of the ground truth')
    stats = [0, 0, 0]
    for qid, (correct, _) in reference.items():
        ranked = predictions[qid]
        for i, cut in enumerate((1, 5, 10)):
            stats[i] += any(c in ranked[:cut] for c in correct)
    r1, r5, r10 = (s * 1.0 / len(reference) for s in stats)  # the official arithmetic, for identical floats
    return {'r1': r1 * 100, 'r5': r5 * 100, 'r10': r10 * 100, 'mr': (r1 + r5 + r10) / 3.0 * 100}
