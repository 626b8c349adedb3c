"""The split-row kernel's barrier and slot reuse (``loss/split.py``), checked on a model of its protocol under random
interleavings of the programs: Triton's interpreter runs programs one after another, so it cannot exercise them.

Each program ``(group, k)`` goes through its group's rows ``group, group + groups, ...``; on a live row it stores its
partial into the group's slot ``turn % 2`` (entry ``k``), adds 1 to the group's counter, waits until the counter
reaches ``K (turn + 1)``, then reads the ``K`` entries of that slot, one shared access at a time. Masked rows are
skipped by every program of the group. The scheduler picks a random runnable program at every shared access. The model
passes when every read sees the partials of the row being combined and every program finishes; two broken variants
(one slot a group, or waiting for one arrival too few) must fail, so the check has teeth."""

import random

import pytest

from papo_kernels.loss.split import split_groups


def program(group, k, K, n_rows, groups, masked, slots, counters, seen, n_slots, lag):
    turn = 0
    for row in range(group, n_rows, groups):
        if masked[row]:
            continue
        slot = slots[group][turn % n_slots]
        slot[k] = row  # the partial, tagged with its row
        yield
        counters[group] += 1  # release add
        yield
        while counters[group] < K * (turn + 1) - lag:  # acquire polls
            yield "wait"
        for j in range(K):  # the combine reads every entry
            seen.append((row, slot[j]))
            yield
        turn += 1


def simulate(n_rows, groups, K, masked, seed, n_slots=2, lag=0):
    """Run the programs to completion under a random schedule; the (row, entry's row) pairs read, or None on a
    deadlock."""
    rng = random.Random(seed)
    slots = [[[None] * K for _ in range(n_slots)] for _ in range(groups)]
    counters = [0] * groups
    seen = []
    live = [program(g, k, K, n_rows, groups, masked, slots, counters, seen, n_slots, lag)
            for g in range(groups) for k in range(K)]  # fmt: skip
    spins = 0
    while live:
        i = rng.randrange(len(live))
        try:
            spins = spins + 1 if next(live[i]) == "wait" else 0
        except StopIteration:
            live.pop(i)
            spins = 0
        if spins > 10_000:
            return None
    return seen


CASES = [(n_rows, groups, K, seed) for n_rows, groups, K in ((7, 2, 3), (12, 3, 4), (5, 1, 5), (9, 4, 2))
         for seed in range(40)]  # fmt: skip


@pytest.mark.parametrize("n_rows,groups,K,seed", CASES)
def test_every_combine_reads_its_own_rows_partials(n_rows, groups, K, seed):
    masked = [random.Random(seed).random() < 0.3 for _ in range(n_rows)]
    seen = simulate(n_rows, groups, K, masked, seed)
    assert seen is not None, "deadlock"
    assert all(row == entry for row, entry in seen), [p for p in seen if p[0] != p[1]][:3]
    live = sum(not m for m in masked)
    assert len(seen) == live * K * K  # every program of every live row read all K entries


@pytest.mark.parametrize("variant", [dict(n_slots=1), dict(lag=1)])
def test_broken_protocols_are_caught(variant):
    """One slot a group (no double buffer) or one arrival too few: some interleaving reads another row's partial."""
    bad = 0
    for seed in range(200):
        seen = simulate(8, 2, 3, [False] * 8, seed, **variant)
        bad += seen is None or any(row != entry for row, entry in seen)
    assert bad > 0


def test_launcher_gives_every_group_a_row():
    """The prefetch before the first barrier reads the group's first row: the launcher never makes a group without
    one."""
    for n_rows in range(1, 50):
        for K in (1, 3, 38, 75):
            for capacity in (K, 2 * K + 1, 660, 1056):
                assert split_groups(n_rows, K, capacity) <= n_rows
