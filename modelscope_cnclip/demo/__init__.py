"""Seeing results: pictures for notebooks (:mod:`.render`: a grid of search hits, an images x texts heat map) and
the retrieval app (:mod:`.app`: ``cnclip demo``, the ModelScope studio app; needs the ``demo`` extra)."""
from modelscope_cnclip.demo.render import heatmap, hits_grid, show_hits

__all__ = ['show_hits', 'hits_grid', 'heatmap']
