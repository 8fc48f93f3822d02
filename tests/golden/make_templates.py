"""Write the official zero-shot prompt templates and ImageNet class names as data files of the package.

NOT part of the test suite: it needs the official ``cn_clip`` package (the throwaway reference venv described in
``make_golden.py``)::

    /work/refvenv/bin/python tests/golden/make_templates.py        # from the repository root

Writes (deterministic; re-running rewrites byte-identical files):

* ``modelscope_cnclip/resources/zeroshot_templates.json``: every template list of
  ``cn_clip/eval/cvinw_zeroshot_templates.py`` (``openai_templates`` -> set ``openai``, ...), plus
  ``openai_imagenet_template`` of ``imagenet_zeroshot_templates.py`` as set ``openai_imagenet``, each template a
  ``str.format`` string with one ``{}`` for the class name (made by calling the official lambda with ``'{}'``), and
  ``datasets``: the dataset-name -> template-set table of ``zeroshot_evaluation.py`` (other datasets use ``default``);
* ``modelscope_cnclip/resources/imagenet_classnames_zh.txt``: the 1000 Chinese ImageNet class names, one a line, in
  class-index order (``imagenet_classnames``).
"""
from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
from pathlib import Path

import cn_clip.eval.cvinw_zeroshot_templates as cvinw
import cn_clip.eval.imagenet_zeroshot_templates as imagenet

REPO = Path(__file__).resolve().parents[2]
RESOURCES = REPO / 'modelscope_cnclip' / 'resources'
PROBES = ['猫', 'T恤', '{x}', '“引号”', '']

# zeroshot_evaluation.py's template_dict, keyed by dataset name, as the set names used here (read from its source
# below and checked, so a different cn_clip version fails loudly instead of writing a stale table).
DATASETS = {
    'fgvc-aircraft-2013b-variants102': 'aircraft',
    'food-101': 'food',
    'oxford-flower-102': 'flower',
    'eurosat_clip': 'eurosat',
    'resisc45_clip': 'eurosat',
    'country211': 'country211',
    'openai': 'openai',
}


def as_format(fn, where: str) -> str:
    fmt = fn('{}')
    if fmt.count('{}') != 1 or fmt.replace('{}', '').count('{') or fmt.replace('{}', '').count('}'):
        raise SystemExit(f'{where}: {fmt!r} is not a template with exactly one {{}} and no other braces')
    for c in PROBES:
        if fmt.replace('{}', c) != fn(c) or (c != '{x}' and fmt.format(c) != fn(c)):
            raise SystemExit(f'{where}: {fmt!r} does not reproduce the lambda for {c!r}')
    return fmt


def official_dataset_table() -> dict:
    import cn_clip.eval.zeroshot_evaluation as zs
    src = inspect.getsource(zs)
    body = src[src.index('template_dict = {'):]
    body = body[:body.index('}')]
    found = dict(re.findall(r'"([^"]+)":\s*(\w+)_templates', body))
    if found != DATASETS:
        raise SystemExit(f'zeroshot_evaluation.py template_dict changed: {found}')
    return found


def main() -> None:
    sets = {}
    for name, value in sorted(vars(cvinw).items()):
        if name.endswith('_templates') and isinstance(value, list):
            sets[name[:-len('_templates')]] = [as_format(fn, f'{name}[{i}]') for i, fn in enumerate(value)]
    sets['openai_imagenet'] = [as_format(fn, f'openai_imagenet_template[{i}]')
                               for i, fn in enumerate(imagenet.openai_imagenet_template)]
    assert len(sets['openai']) == 183, len(sets['openai'])
    data = {
        'source': f'cn_clip {importlib.metadata.version("cn_clip")}: eval/cvinw_zeroshot_templates.py, '
                  f'eval/imagenet_zeroshot_templates.py (openai_imagenet), eval/zeroshot_evaluation.py (datasets)',
        'default': 'openai',
        'datasets': official_dataset_table(),
        'sets': sets,
    }
    text = json.dumps(data, ensure_ascii=False, indent=1) + '\n'
    (RESOURCES / 'zeroshot_templates.json').write_text(text, encoding='utf-8')
    names = imagenet.imagenet_classnames
    assert len(names) == 1000 and all(n == n.strip() and n and '\n' not in n for n in names)
    (RESOURCES / 'imagenet_classnames_zh.txt').write_text('\n'.join(names) + '\n', encoding='utf-8')
    print({k: len(v) for k, v in sets.items()})


if __name__ == '__main__':
    main()
