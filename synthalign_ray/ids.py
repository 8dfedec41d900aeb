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


def row_keys(ids: Iterable[str], categories: Iterable[str], prompts: Iterable[str]) -> np.ndarray:
    """A prompt row's key in the stage checkpoints: the digest of its id with the inputs every stage sees
    (category, text-to-image prompt), so an entry never outlives a change to its prompt."""
    return digests("\x1f".join(parts) for parts in zip(ids, categories, prompts))


def locate(sorted_unique: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `values`: its index in `sorted_unique` (a sorted array without repeats), and whether
    it is there (where not, the index means nothing)."""
    if not len(sorted_unique):
        return np.zeros(len(values), dtype=np.intp), np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return at, sorted_unique[at] == values


def contains(sorted_unique: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each of `values`, whether it is in `sorted_unique` (a sorted array without repeats)."""
    return locate(sorted_unique, values)[1]


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


class IdCollector:
    """Gathers the digests of ids in chunks (e.g. one per shard) into an IdSet, finding repeats.

    One buffer, doubled when full, sorted in place at the end: the peak is the digests themselves, not a
    list of chunks plus their concatenation."""

    def __init__(self):
        self.buffer = np.empty(0, DIGEST)
        self.size = 0

    def add(self, ids: Iterable[str]) -> None:
        self.add_digests(digests(ids))

    def add_digests(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.buffer):
            grown = np.empty(max(end, 2 * len(self.buffer)), DIGEST)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : end] = values
        self.size = end

    def result(self) -> tuple[IdSet, np.ndarray]:
        """The set of ids added, and the digests added more than once (sorted, each once)."""
        every = self.buffer[: self.size] if self.size == len(self.buffer) else self.buffer[: self.size].copy()
        self.buffer, self.size = np.empty(0, DIGEST), 0
        every.sort()
        repeated = every[1:] == every[:-1]
        if not repeated.any():
            return IdSet(every), np.empty(0, DIGEST)
        return IdSet(every[np.concatenate([[True], ~repeated])]), np.unique(every[1:][repeated])


class SeenIds:
    """The ids of a file read so far, a chunk of lines at a time (one sorted array, merged into)."""

    def __init__(self):
        self.digests = np.empty(0, DIGEST)

    def seen(self, values: np.ndarray) -> np.ndarray:
        """For each id of the next chunk (digests in file order), whether an earlier line has it (before
        the chunk or in it)."""
        _, first_in_chunk, inverse = np.unique(values, return_index=True, return_inverse=True)
        return (first_in_chunk[inverse] != np.arange(len(values))) | contains(self.digests, values)

    def add(self, values: np.ndarray) -> None:
        new = np.unique(values)
        new = new[~contains(self.digests, new)]
        # A merge of two sorted arrays: no sort of all, one copy.
        self.digests = np.insert(self.digests, np.searchsorted(self.digests, new), new)
