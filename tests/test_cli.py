"""cli.py: the CLI as declared: shared options declared once, choices from the library's constants, --version, -v
anywhere, one name for outputs, one-line usage errors. (Each command's behaviour is tested with the module it runs.)"""
from __future__ import annotations

import argparse

import pytest

from modelscope_cnclip import __version__
from modelscope_cnclip.cli import BACKEND, COMMANDS, CONFIG, DEVICE, MODEL, PRECISION, build_parser, main
from modelscope_cnclip.config import (
    BACKENDS,
    ENGINES,
    EXPORT_FORMATS,
    EXPORT_PRECISIONS,
    LAYOUTS,
    MODALITIES,
    PRECISION_NAMES,
    SAMPLING_MODES,
)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every leaf command's parser, by name ('index build' for a grouped one)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = subparsers(sub)
                out.update({f'{name} {k}': v for k, v in nested.items()} if nested else {name: sub})
    return out


def options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in p._actions for opt in (a.option_strings or [a.dest])}


def test_every_registered_command_is_in_the_parser():
    assert set(subparsers(build_parser())) == set(COMMANDS)


def test_model_loading_options_are_one_declaration():
    loads = [c for c in COMMANDS.values() if MODEL in c.args and PRECISION in c.args]
    assert {c.name for c in loads} >= {'similarity', 'eval', 'zeroshot', 'embed'}
    for c in loads:
        assert DEVICE in c.args and CONFIG in c.args and BACKEND in c.args, c.name
    for name, p in subparsers(build_parser()).items():
        if '--precision' in options(p):
            expected = EXPORT_PRECISIONS if name == 'export' else PRECISION_NAMES
            assert tuple(options(p)['--precision'].choices) == expected, name
        if '--backend' in options(p):
            assert tuple(options(p)['--backend'].choices) == BACKENDS, name


def test_choices_come_from_the_library():
    subs = subparsers(build_parser())
    embed = options(subs['embed'])
    assert tuple(embed['--modality'].choices) == ('auto', *MODALITIES)
    assert tuple(embed['--engine'].choices) == ENGINES
    assert tuple(embed['--sampling-mode'].choices) == SAMPLING_MODES
    assert tuple(options(subs['convert'])['--to'].choices) == LAYOUTS
    assert tuple(options(subs['export'])['--format'].choices) == EXPORT_FORMATS


def test_outputs_are_named_out():
    for name, p in subparsers(build_parser()).items():
        assert not [o for o in options(p) if o.endswith('-dir')], name
    for name in ('convert', 'eval', 'zeroshot', 'embed', 'index build', 'train', 'export'):
        assert '--out' in options(subparsers(build_parser())[name]), name


def test_version_and_verbose_before_or_after_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--version'])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f'cnclip {__version__}'
    parser = build_parser()
    assert parser.parse_args(['-v', 'models']).verbose and parser.parse_args(['models', '-v']).verbose
    assert not parser.parse_args(['models']).verbose
    assert parser.parse_args(['index', 'info', 'x', '--verbose']).verbose


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['embed', 'm', 'in', '--out', 'o', '--num-frames', 'zero'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count('\n') == 1
    assert err.startswith("cnclip embed: error: argument --num-frames: expected a whole number >= 1, got 'zero'")
    assert main(['search', 'idx', 'q', '--text', '--image']) == 2
    assert '--text and --image exclude each other' in capsys.readouterr().err
