"""Evaluation with the official Chinese-CLIP semantics.

* :mod:`.retrieval` — text-to-image and image-to-text R@1/5/10 and MR, the official top-10 prediction files and
  scorer (``eval/evaluation.py``, ``evaluation_tr.py``), streaming and chunked so memory stays bounded;
* :mod:`.zeroshot` — zero-shot classification as ``eval/zeroshot_evaluation.py`` (official templates and class
  names as data, ImageFolder order, ELEVATER output).
"""
from modelscope_cnclip.evaluation.retrieval import (
    embed_image_stream,
    evaluate_pairs,
    evaluate_split,
    inbatch_recall,
    rank_both,
    retrieval_metrics,
    score_predictions,
    t2i_to_i2t,
    topk_hits,
    topk_predictions,
    write_predictions,
)
from modelscope_cnclip.evaluation.zeroshot import (
    IMG_EXTENSIONS,
    ImageFolder,
    classify,
    elevater_output,
    evaluate_zeroshot,
    preprocess_text,
    read_classnames,
    template_sets,
    templates,
    templates_for_dataset,
    zeroshot_classifier,
)

__all__ = ['retrieval_metrics', 'inbatch_recall', 'topk_hits', 'rank_both', 'evaluate_split', 'evaluate_pairs',
           'embed_image_stream', 'topk_predictions', 'write_predictions', 't2i_to_i2t', 'score_predictions',
           'IMG_EXTENSIONS', 'template_sets', 'templates', 'templates_for_dataset', 'read_classnames',
           'preprocess_text', 'ImageFolder', 'zeroshot_classifier', 'classify', 'evaluate_zeroshot',
           'elevater_output']
