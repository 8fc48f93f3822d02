"""Checkpoint layouts and conversion: where weights come from and where they go.

* :mod:`.convert` — pure state-dict functions: the safe reader (single files, shards, trainer checkpoints), prefix
  stripping, Hugging Face <-> official names, architecture from shapes, the strict loader;
* :mod:`.layouts` — the :class:`Checkpoint` and every directory layout users have (plugin, ModelScope hub, official
  ``.pt``, Hugging Face), read and written, and :func:`convert`;
* :mod:`.hf` — the transformers ``ChineseCLIPModel`` config and files.
"""
from modelscope_cnclip.checkpoints.layouts import (
    LAYOUTS,
    Checkpoint,
    check_fits,
    convert,
    default_configuration,
    read_config,
    read_source,
    write_dir,
)

__all__ = ['Checkpoint', 'read_source', 'read_config', 'write_dir', 'convert', 'check_fits', 'default_configuration',
           'LAYOUTS']
