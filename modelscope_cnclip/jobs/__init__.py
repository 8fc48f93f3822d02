"""Embedding jobs: a whole collection -> an embeddings dir (:mod:`modelscope_cnclip.embeddings`), resumable.

* :mod:`.collection` — every input form as ``(id, source)`` items: folders, URIs, jsonl/csv/tsv, official splits;
* :mod:`.shards` — one shard: decode ahead in threads, embed in batches, write atomically with its failures;
* :mod:`.run` — :func:`embed_collection`: options, resume, the local engine, the report;
* :mod:`.ray_engine` — the same shards on a Ray cluster.
"""
from modelscope_cnclip.jobs.collection import Collection, Item, open_collection
from modelscope_cnclip.jobs.ray_engine import RayOptions
from modelscope_cnclip.jobs.run import EmbedReport, embed_collection
from modelscope_cnclip.jobs.shards import ShardSettings

__all__ = ['embed_collection', 'EmbedReport', 'ShardSettings', 'RayOptions', 'open_collection', 'Collection', 'Item']
