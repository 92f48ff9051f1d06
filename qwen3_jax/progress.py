"""The one progress bar of every long job: tqdm on stderr (count, rate, time left)."""

from __future__ import annotations

from typing import Iterable

import jax
from tqdm import tqdm


def progress_bar(total: int, unit: str, *, enabled: bool, initial: int = 0, iterable: Iterable | None = None) -> tqdm:
    """A bar over `total` units, drawn when `enabled` (the caller decides: a terminal, not --quiet) and
    only by the first process of a multi-process job. It starts when made, so make it before the work
    (compiling included) begins."""
    return tqdm(iterable, total=total, initial=initial, unit=unit, dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0)
