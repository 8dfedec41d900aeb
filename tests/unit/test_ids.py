"""Id sets as sorted digests: membership, repeats, first lines, against Python sets on random ids."""

import numpy as np

from synthalign_ray.ids import IdCollector, IdSet, SeenIds, digests


def random_ids(rng, n, pool=50):
    return [f"id-{i}" for i in rng.integers(0, pool, n)]


def test_idset_membership_is_set_membership():
    rng = np.random.default_rng(0)
    for _ in range(50):
        held, asked = random_ids(rng, rng.integers(0, 30)), random_ids(rng, 20)
        ids = IdSet.of(held)
        assert len(ids) == len(set(held))
        assert ids.contains(digests(asked)).tolist() == [i in set(held) for i in asked]
    assert IdSet().contains(digests(["a"])).tolist() == [False]
    assert IdSet.of(["a", "b"]) == IdSet.of(["b", "a", "a"]) != IdSet.of(["a"])


def test_collector_finds_ids_added_more_than_once_across_chunks():
    collector = IdCollector()  # its buffer grows with every chunk here
    for chunk in (["a", "b"], ["c", "a"], [], ["d", "d", "e"]):
        collector.add(chunk)
    ids, repeated = collector.result()
    assert ids == IdSet.of("abcde")
    assert sorted(repeated.tolist()) == sorted(digests(["a", "d"]).tolist())
    collector.add(["x", "y"])
    assert collector.result()[0] == IdSet.of("xy") and len(collector.result()[1]) == 0
    assert len(IdCollector().result()[0]) == 0


def test_seen_ids_are_those_an_earlier_line_has_in_and_across_chunks():
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 300, pool=80)
    expected = [i in set(ids[:line]) for line, i in enumerate(ids)]
    seen, got = SeenIds(), []
    for start in range(0, len(ids), 37):  # chunks that do not divide the file
        values = digests(ids[start : start + 37])
        got += seen.seen(values).tolist()
        seen.add(values)
    assert got == expected
    assert IdSet(seen.digests) == IdSet.of(ids)
    assert seen.seen(digests([])).tolist() == []
