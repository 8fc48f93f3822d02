"""The import boundary: which heavy modules each entry point imports, no import cycles, layers imported downwards only,
and ModelScope finding the plugin whichever is imported first. (Startup times: benchmarks/bench_startup.py.)"""
from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import modelscope_cnclip

from helpers import REPO

PKG = Path(modelscope_cnclip.__file__).parent
HEAVY = ('torch', 'transformers', 'modelscope', 'PIL', 'numpy', 'faiss', 'ray', 'decord', 'av', 'onnx', 'onnxruntime',
         'openvino', 'nncf', 'tensorrt', 'fastapi', 'starlette', 'uvicorn', 'batched', 'prometheus_client', 'httpx',
         'pydantic', 'gradio')
EXTRAS = {'faiss', 'ray', 'decord', 'av', 'onnx', 'onnxruntime', 'openvino', 'nncf', 'tensorrt', 'fastapi', 'starlette',
          'uvicorn', 'batched', 'prometheus_client', 'httpx', 'gradio'}

# Bottom to top; a module may import its own layer and the layers below, never one above.
LAYERS = [
    {'config', 'pretrained', 'utils'},
    {'model', 'tokenizer', 'transform', 'runtime'},
    {'checkpoints'},
    {'inference'},
    {'data', 'video', 'embeddings'},
    {'jobs'},
    {'index'},
    {'evaluation'},
    {'deploy'},
    {'serve'},
    {'demo'},
    {'train'},
    {'ms'},
    {'cli', '__main__'},
]


def imported_after(code: str) -> dict:
    """The heavy top-level packages imported by ``code`` in a fresh interpreter (and what it printed last)."""
    probe = code + f'\nimport sys, json\nprint(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & ' \
                   f'set({HEAVY!r}))))'
    out = subprocess.run([sys.executable, '-c', probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_package_imports_nothing_heavy():
    assert imported_after('import modelscope_cnclip') == set()
    assert imported_after('import modelscope_cnclip.ms') == set()


def test_cli_models_and_help_import_neither_torch_nor_modelscope():
    assert imported_after('from modelscope_cnclip.cli import main\nmain(["models"])') == set()
    assert imported_after('from modelscope_cnclip.cli import main\n'
                          'try:\n    main(["--help"])\nexcept SystemExit:\n    pass\n'
                          'try:\n    main(["embed", "--help"])\nexcept SystemExit:\n    pass\n'
                          'try:\n    main(["serve", "--help"])\nexcept SystemExit:\n    pass') == set()


def test_inference_imports_torch_and_transformers_but_not_modelscope(plugin_vit_dir):
    got = imported_after(f'import modelscope_cnclip as c\nm = c.load({str(plugin_vit_dir)!r})\n'
                         f'm.encode_text("猫"); m.encode_image(c.load_image(__import__("numpy").zeros((8, 8, 3), '
                         f'"uint8")))')
    assert {'torch', 'transformers'} <= got and 'modelscope' not in got


def _library_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PKG)], 'modelscope_cnclip.')
                  if not m.name.startswith(('modelscope_cnclip.ms', 'modelscope_cnclip.__main__')))


def test_no_library_module_imports_modelscope():
    modules = _library_modules()
    assert {'modelscope_cnclip.jobs.ray_engine', 'modelscope_cnclip.deploy.exporter',
            'modelscope_cnclip.runtime.tensorrt', 'modelscope_cnclip.serve.app', 'modelscope_cnclip.demo.app'
            } <= set(modules)
    got = imported_after('import importlib\n' + '\n'.join(f'importlib.import_module({m!r})' for m in modules))
    assert 'modelscope' not in got and not EXTRAS & got  # extras load on first use


@pytest.mark.parametrize('first', ['plugin', 'modelscope'])
def test_modelscope_finds_the_plugin_whichever_is_imported_first(first):
    plugin, builders = 'import modelscope_cnclip\n', ('from modelscope.pipelines.builder import PIPELINES\n'
                                                      'from modelscope.trainers.builder import TRAINERS\n'
                                                      'from modelscope.models.builder import MODELS\n')
    code = (plugin + builders if first == 'plugin' else builders + plugin) + (
        'assert PIPELINES.get("cnclip-multi-modal-embedding", "multi-modal-embedding") is not None\n'
        'assert MODELS.get("cnclip", "multi-modal-embedding") is not None\n'
        'assert TRAINERS.get("cnclip-trainer") is not None\n')
    assert 'modelscope' in imported_after(code)


# --- the module graph ------------------------------------------------------------------------------------------------

def _module_of(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path) -> set[str]:
    """Package-internal modules imported at module level (imports inside functions are deliberate late imports)."""
    tree = ast.parse(path.read_text(encoding='utf-8'))
    out = set()
    for n in tree.body:  # `if TYPE_CHECKING:` blocks (ast.If) are not run, so not counted
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith('modelscope_cnclip'):
            out.add(n.module[len('modelscope_cnclip.'):] if n.module != 'modelscope_cnclip' else '')
        elif isinstance(n, ast.Import):
            out.update(a.name[len('modelscope_cnclip.'):] for a in n.names if a.name.startswith('modelscope_cnclip.'))
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_of(p): _imports(p) - {''} for p in PKG.rglob('*.py')}


def _layer(module: str) -> int:
    top = module.split('.')[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    assert all(_layer(m) >= 0 for m in _graph() if m)


def test_layers_import_downwards_only():
    wrong = [(m, dep) for m, deps in _graph().items() if m for dep in deps
             if _layer(dep) > _layer(m)]
    assert wrong == [], 'a module imports a layer above it'


def test_no_import_cycles():
    graph = _graph()
    resolved = {m: {d if d in graph else d.rsplit('.', 1)[0] for d in deps} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in resolved.get(m, ()):
            if d == m or d not in resolved:
                continue
            if state.get(d) == 1:
                # a package __init__ importing its own submodules is not a cycle
                if not (m.startswith(d + '.') or d.startswith(m + '.')):
                    pytest.fail(f'import cycle: {" -> ".join(path + [m, d])}')
            elif d not in state:
                visit(d, path + [m])
        state[m] = 2
    for m in resolved:
        if m not in state:
            visit(m, [])
