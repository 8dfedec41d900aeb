"""Id sets as sorted digests: membership, repeats, first lines, against Python sets on random ids."""

import numpy as np

from synthalign_ray.ids import FirstSeen, IdCollector, IdSet, digests


def random_ids(rng, n, pool=50):
    return [f"id-{i}" for i in rng.integers(0, pool, n)]


def test_idset_membership_is_set_membership():
    rng = np.random.default_rng(0)
    for _ in range(50):
        held, asked = random_ids(rng, rng.integers(0, 30)), random_ids(rng, 20)
        ids = IdSet.of(held)
        assert len(ids) == len(set(held))
        assert ids.contains(digests(asked)).tolist() == [i in set(held) for i in asked]
        assert ids.missing(IdSet.of(asked)) == len(set(asked) - set(held))
    assert IdSet().contains(digests(["a"])).tolist() == [False]
    assert IdSet.of(["a", "b"]) == IdSet.of(["b", "a", "a"]) != IdSet.of(["a"])


def test_collector_finds_ids_added_more_than_once_across_chunks():
    collector = IdCollector()
    for chunk in (["a", "b"], ["c", "a"], [], ["d", "d"]):
        collector.add(chunk)
    ids, repeated = collector.result()
    assert ids == IdSet.of("abcd")
    assert sorted(repeated.tolist()) == sorted(digests(["a", "d"]).tolist())
    assert len(IdCollector().result()[0]) == 0


def test_first_seen_gives_the_first_line_of_a_repeated_id_in_and_across_chunks():
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 300, pool=80)
    expected, first = [], {}
    for line, i in enumerate(ids, start=1):
        expected.append(first.get(i, 0))
        first.setdefault(i, line)
    seen, got = FirstSeen(), []
    for start in range(0, len(ids), 37):  # chunks that do not divide the file
        chunk = ids[start : start + 37]
        values, lines = digests(chunk), np.arange(start + 1, start + 1 + len(chunk))
        got += seen.first_lines(values, lines).tolist()
        seen.add(values, lines)
    assert got == expected
    assert IdSet(seen.digests) == IdSet.of(ids)
