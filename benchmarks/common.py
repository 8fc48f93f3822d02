"""What the benchmark scripts share: how a fresh worker process reads its peak memory, and how a report is emitted."""
from __future__ import annotations

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
