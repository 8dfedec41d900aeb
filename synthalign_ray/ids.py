"""Row ids at scale: sets of 16-byte digests in sorted numpy arrays instead of Python sets of strings.

The driver checks ids over whole runs (duplicates in the prompt file, what a resume skips, that every
input row has exactly one outcome). A Python set of 1M id strings takes ~100 MB; their blake2b-128
digests take 16 MB, and stand for the ids exactly in practice: two distinct ids share a digest with
probability about n^2 / 2^129, 1e-27 for a million ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

DIGEST = np.dtype("S16")


def digests(ids: Iterable[str]) -> np.ndarray:
    """The digest of each id, in order."""
    return np.array([hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids], dtype=DIGEST)


def contains(sorted_unique: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each of `values`, whether it is in `sorted_unique` (a sorted array without repeats)."""
    if not len(sorted_unique):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return sorted_unique[at] == values


class IdSet:
    """A set of ids, held as their sorted digests."""

    def __init__(self, sorted_unique: np.ndarray | None = None):
        self.digests = np.empty(0, DIGEST) if sorted_unique is None else sorted_unique

    @classmethod
    def of(cls, ids: Iterable[str]) -> IdSet:
        return cls(np.unique(digests(ids)))

    def __len__(self) -> int:
        return len(self.digests)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdSet) and np.array_equal(self.digests, other.digests)

    def contains(self, values: np.ndarray) -> np.ndarray:
        """For each digest of `values`, whether its id is in the set."""
        return contains(self.digests, values)

    def missing(self, other: IdSet) -> int:
        """How many ids of `other` are not in this set."""
        return int((~self.contains(other.digests)).sum())


class IdCollector:
    """Gathers the digests of ids in chunks (e.g. one per shard) into an IdSet, finding repeats."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def add(self, ids: Iterable[str]) -> None:
        self.chunks.append(digests(ids))

    def result(self) -> tuple[IdSet, np.ndarray]:
        """The set of ids added, and the digests added more than once (sorted, each once)."""
        every = np.sort(np.concatenate(self.chunks)) if self.chunks else np.empty(0, DIGEST)
        self.chunks = []
        repeated = every[1:] == every[:-1]
        return IdSet(every[np.concatenate([[True], ~repeated])] if len(every) else every), np.unique(every[1:][repeated])


class FirstSeen:
    """The ids of a file read so far, with the line each was first seen on, a chunk of lines at a time."""

    def __init__(self):
        self.digests = np.empty(0, DIGEST)  # sorted
        self.lines = np.empty(0, np.int64)  # of `digests`

    def first_lines(self, values: np.ndarray, lines: np.ndarray) -> np.ndarray:
        """For each id of the next chunk (digests and lines, in file order), the line it was first seen
        on if an earlier line has it (before the chunk or in it), else 0."""
        first = np.zeros(len(values), np.int64)
        if not len(values):
            return first
        _, first_in_chunk, inverse = np.unique(values, return_index=True, return_inverse=True)
        earlier_in_chunk = first_in_chunk[inverse] != np.arange(len(values))
        first[earlier_in_chunk] = lines[first_in_chunk[inverse]][earlier_in_chunk]
        before = contains(self.digests, values)
        first[before] = self.lines[np.searchsorted(self.digests, values[before])]
        return first

    def add(self, values: np.ndarray, lines: np.ndarray) -> None:
        """Adds a chunk's ids (as given to `first_lines`); the first line of each new one is kept."""
        unique, first_in_chunk = np.unique(values, return_index=True)
        new = ~contains(self.digests, unique)
        merged = np.concatenate([self.digests, unique[new]])
        order = np.argsort(merged, kind="stable")
        self.digests = merged[order]
        self.lines = np.concatenate([self.lines, lines[first_in_chunk[new]]])[order]
