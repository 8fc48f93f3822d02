"""Start-up cost: `cnclip --help`, `cnclip models`, `import modelscope_cnclip` and getting to a loaded model, against
the imports they cannot avoid (torch, transformers) measured in the same run, before and after a change.

    python benchmarks/bench_startup.py --before REV --after REV --out benchmarks/RESULTS_startup.md

Each revision's package is extracted with ``git archive`` and run from there (``PYTHONPATH``); each command is a
fresh interpreter, timed ``--repeats`` times, and the fastest run is reported (start-up varies with what else the
machine does; the minimum is the cost itself). The model is a tiny random-weight plugin dir, so the "load" rows
measure imports and setup, not reading weights.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
sys.path.insert(0, str(REPO / 'tests'))

from common import emit, header  # noqa: E402

COMMANDS = {  # row -> python code run in a fresh interpreter
    '`cnclip --help`': 'import sys; sys.argv = ["cnclip", "--help"]\nfrom modelscope_cnclip.cli import main\n'
                       'try:\n    main()\nexcept SystemExit:\n    pass',
    '`cnclip models`': 'from modelscope_cnclip.cli import main; main(["models"])',
    '`import modelscope_cnclip`': 'import modelscope_cnclip',
    '`load(dir)` + embed one text': 'import modelscope_cnclip as c; c.load({model!r}).encode_text("猫")',
}
FLOORS = {  # what loading a model cannot avoid importing
    '`import torch`': 'import torch',
    '`import torch, transformers` (BertModel)': 'import torch; from transformers import BertModel',
}


def fastest(code: str, pythonpath: str | None, repeats: int) -> float:
    env = {**os.environ, 'PYTHONPATH': pythonpath} if pythonpath else dict(os.environ)
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        # cwd: not the repository, whose package would shadow PYTHONPATH's ('' comes first on sys.path)
        subprocess.run([sys.executable, '-c', code], env=env, check=True, capture_output=True,
                       cwd=tempfile.gettempdir())
        best = min(best, time.perf_counter() - start)
    return best


def extract(rev: str, into: Path) -> str:
    """The package of ``rev`` under ``into`` (for PYTHONPATH)."""
    archive = into / f'{rev}.tar'
    subprocess.run(['git', 'archive', '--format=tar', '-o', str(archive), rev, 'modelscope_cnclip'], cwd=REPO,
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / rev, filter='data')
    return str(into / rev)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--before', required=True, help='git revision before the change')
    parser.add_argument('--after', default='HEAD', help='git revision after the change (default HEAD)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--out', type=Path)
    args = parser.parse_args(argv)

    from modelscope_cnclip.checkpoints import Checkpoint, write_dir

    from helpers import TINY_VIT, random_state_dict
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_dir(Checkpoint(random_state_dict(TINY_VIT), TINY_VIT), tmp / 'model')
        paths = {rev: extract(rev, tmp) for rev in (args.before, args.after)}
        floors = {name: fastest(code, None, args.repeats) for name, code in FLOORS.items()}
        rows = {name: {rev: fastest(code.format(model=str(model)), path, args.repeats) for rev, path in paths.items()}
                for name, code in COMMANDS.items()}
    floor = floors['`import torch, transformers` (BertModel)']
    lines = header('Start-up time: CLI, import, first model', argv)
    lines += [f'Fastest of {args.repeats} fresh interpreters per row; before = `{args.before}`, after = '
              f'`{args.after}`. The floor is what any model load must import: '
              + ', '.join(f'{name} {t:.2f} s' for name, t in floors.items()) + '.\n',
              '| command | before | after | after / floor (torch + transformers) |', '|---|---|---|---|']
    for name, times in rows.items():
        lines.append(f'| {name} | {times[args.before]:.2f} s | {times[args.after]:.2f} s | '
                     f'{times[args.after] / floor:.2f} |')
    emit(lines, args.out)


if __name__ == '__main__':
    main()
