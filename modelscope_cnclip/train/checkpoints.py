"""Finding where to resume: the newest epoch checkpoint that was written completely.

ModelScope's checkpoint hook writes ``epoch_N.pth`` and ``epoch_N_trainer_state.pth`` with ``torch.save``, in place:
a run killed while saving leaves a truncated file. torch's zip format carries a CRC per record, so a complete pair
is recognised without unpickling anything.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)
_EPOCH = re.compile(r'epoch_(\d+)\.pth')


def _complete(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def latest_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    """The newest ``epoch_N.pth`` in ``work_dir`` that is complete together with its ``epoch_N_trainer_state.pth``
    (when the run writes trainer states), for ``trainer.train(checkpoint_path=...)``; ``None`` if there is none.
    Incomplete ones (a kill while saving) are skipped with a warning."""
    d = Path(work_dir)
    if not d.is_dir():
        return None
    epochs = sorted(((int(m[1]), p) for p in d.iterdir() if (m := _EPOCH.fullmatch(p.name))), reverse=True)
    states = any(d.glob('epoch_*_trainer_state.pth'))
    for n, path in epochs:
        state = d / f'epoch_{n}_trainer_state.pth'
        if _complete(path) and (not states or _complete(state)):
            return path
        logger.warning('%s: incomplete (the run was stopped while saving it); looking further back', path)
    return None
