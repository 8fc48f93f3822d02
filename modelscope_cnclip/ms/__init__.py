"""The ModelScope adapters: thin classes over the ModelScope-free library.

* :mod:`.model` — ``CNClipForMultiModalEmbedding`` (model type ``cnclip``);
* :mod:`.preprocessor` — ``CNClipPreprocessor`` (``cnclip-preprocessor``);
* :mod:`.pipeline` — ``CNClipPipeline`` (``cnclip-multi-modal-embedding``);
* :mod:`.trainer` — ``CNClipTrainer`` (``cnclip-trainer``), the finetune tutorial's configuration on CPU or GPU(s).

Importing this package costs nothing: its names load on first use (PEP 562), and it never imports ModelScope.
ModelScope finds the classes through :func:`install_registration` (``import modelscope_cnclip`` calls it): when
ModelScope looks one of this plugin's type names up in a registry, the adapter module that registers it is imported
first. So registration happens when ModelScope builds a model, pipeline, preprocessor or trainer of this plugin, in
whichever order ModelScope and this package were imported, and a program that builds none never imports the
adapters or ModelScope's pipeline and trainer stacks.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ['CNClipForMultiModalEmbedding', 'CNClipPreprocessor', 'CNClipPipeline', 'CNClipTrainer', 'MODEL_TYPE',
           'PIPELINE_TYPE', 'PREPROCESSOR_TYPE', 'TRAINER_TYPE', 'CLAMP_HOOK_TYPE', 'install_registration']

# The names under which ModelScope's registries know this plugin's classes (configuration.json refers to them).
MODEL_TYPE = 'cnclip'
PIPELINE_TYPE = 'cnclip-multi-modal-embedding'
PREPROCESSOR_TYPE = 'cnclip-preprocessor'
TRAINER_TYPE = 'cnclip-trainer'
CLAMP_HOOK_TYPE = 'CNClipClampLogitScaleHook'

#: registered type name -> the adapter module whose import registers it
ADAPTERS = {MODEL_TYPE: 'model', PREPROCESSOR_TYPE: 'preprocessor', PIPELINE_TYPE: 'pipeline',
            TRAINER_TYPE: 'trainer', CLAMP_HOOK_TYPE: 'trainer'}
_EXPORTS = {'CNClipForMultiModalEmbedding': 'model', 'CNClipPreprocessor': 'preprocessor',
            'CNClipPipeline': 'pipeline', 'CNClipTrainer': 'trainer'}
_installed = False


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'{__name__}.{module}'), name)


def _registry_get(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``Registry.get`` that first imports the adapter registering a type name of this plugin."""
    adapter = ADAPTERS.get(args[0] if args else kwargs.get('module_key'))
    if adapter is not None:
        importlib.import_module(f'{__name__}.{adapter}')  # its @register_module decorators run on import
    return wrapped(*args, **kwargs)


def install_registration() -> None:
    """Make ModelScope's registries find this plugin's classes on lookup (see the module docstring). Hooks
    ``modelscope.utils.registry.Registry.get`` once ModelScope imports it (at once if it already has); idempotent."""
    global _installed
    if _installed:
        return
    import wrapt
    wrapt.register_post_import_hook(
        lambda module: wrapt.wrap_function_wrapper(module, 'Registry.get', _registry_get), 'modelscope.utils.registry')
    _installed = True
