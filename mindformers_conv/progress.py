"""The byte progress bar on stderr; tqdm is imported only when a bar is shown (it costs start-up time)."""

from __future__ import annotations

import sys


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def byte_bar(total: int, desc: str, show: bool):
    """A tqdm bar counting `total` bytes, or one that shows nothing."""
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc=desc, leave=False)
