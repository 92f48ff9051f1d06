"""An output folder claimed by one job at a time and holding the fingerprint of what it computes.

A job that writes a folder over a long time (embed-corpus, train) claims its --output before any work:
it takes the folder's lock, held to its end (a second job is refused at once with FolderBusy naming the
first; the kernel drops the lock of a killed job), and checks what the folder holds. Files the job does
not write are refused, and so is a fingerprint recorded by an earlier job (what it computed: its
settings, its weights) that is not this job's; both with OutputTaken, whose message the job words.
Only then does the job clear the folder (--overwrite) or record its own fingerprint, atomically: every
refusal comes before anything is deleted, and a resumed job finds the fingerprint it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from qwen3_jax.textio import OutputTaken, atomic_output, hold_lock

LOCK = ".lock"                 # the folder's lock, held by the job from start to end


def changed_fields(found: dict, wanted: dict) -> list[str]:
    """The fields, in sorted order, in which two fingerprints differ (one that only one has included)."""
    return sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))


class Claim:
    """A job's hold on its output folder (see the module docstring)."""

    def __init__(self, folder: str | Path, ours: Callable[[Path], bool]):
        """`folder`: the output folder (it may not exist yet); `ours`: whether a path in it is one this
        kind of job writes (its locks included)."""
        self.folder, self.ours = Path(folder), ours
        self.locks: list = []

    def hold(self, holder: str, *, name: str = LOCK, shared: bool = False) -> None:
        """Takes the lock file `name` in the folder, or raises FolderBusy at once. `holder` names this
        job in another job's refusal; `shared`: the lock is shared with the other processes of one job."""
        self.locks.append(hold_lock(self.folder / name, holder, shared=shared))

    def release(self) -> None:
        """Releases every lock held (the job is over: the folder is free)."""
        for handle in self.locks:
            handle.close()
        self.locks = []

    def refuse_strangers(self, refusal: Callable[[list[str]], str]) -> None:
        """OutputTaken with `refusal(names)` if the folder holds files this job does not write (their
        names, sorted); nothing when the folder does not exist."""
        strangers = sorted(p.name for p in self.folder.iterdir() if not self.ours(p)) if self.folder.is_dir() else []
        if strangers:
            raise OutputTaken(refusal(strangers))

    @staticmethod
    def refuse_other(found: dict, wanted: dict, refusal: Callable[[list[str]], str]) -> None:
        """OutputTaken with `refusal(fields)` if the fingerprint `found` in the folder is not `wanted`,
        this job's (`fields`: those that differ, see changed_fields)."""
        if found != wanted:
            raise OutputTaken(refusal(changed_fields(found, wanted)))

    def record(self, name: str, fingerprint: dict, *, indent: int) -> None:
        """Writes `fingerprint` (with what else the job keeps beside it) as the JSON file `name` in the
        folder, atomically; `indent`: JSON's indentation."""
        with atomic_output(self.folder / name) as handle:
            json.dump(fingerprint, handle, indent=indent)
