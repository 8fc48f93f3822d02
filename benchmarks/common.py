"""What the benchmark scripts share: how a fresh worker process reads its peak memory, and how a report is emitted."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

# Python expression for a worker's peak resident memory in GB (VmHWM is reset at exec, unlike ru_maxrss).
PEAK_RSS_GB = "next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')) / 2**20"


def emit(lines: list[str], out: Path | None) -> str:
    """Print the markdown report and, with ``out``, write it there too."""
    text = '\n'.join(lines) + '\n'
    print(text)
    if out:
        out.write_text(text, encoding='utf-8')
    return text


def header(title: str, argv: list[str] | None) -> list[str]:
    """The first lines of a report: title, the command that made it, the machine and the software."""
    import torch
    cpuinfo = Path('/proc/cpuinfo')
    cpu = next((line.split(':', 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith('model name')), '') if cpuinfo.exists() else ''
    command = ' '.join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    return [f'# {title}\n', f'`python {command}`\n\n{cpu or platform.processor()}, {os.cpu_count()} CPUs; '
            f'torch {torch.__version__}, Python {platform.python_version()}; {time.strftime("%Y-%m-%d")}.\n']
