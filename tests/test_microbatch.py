import random

import pytest

from exgrpo.microbatch import plan_micro_batches


def long_tailed(S, seed):
    rng = random.Random(seed)
    return [min(8192, int(64 * rng.paretovariate(1.2))) for _ in range(S)]


@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", range(3))
def test_every_sequence_once_within_budget_and_balanced(ranks, seed):
    lengths = long_tailed(700, seed) + [0, 0, 1]
    plan = plan_micro_batches(lengths, 16384, num_ranks=ranks)
    seen = sorted(i for r in plan.plan for mb in r for i in mb)
    assert seen == list(range(len(lengths)))  # none lost, none duplicated
    assert all(len(r) == plan.num_micro_batches for r in plan.plan)  # same count on every rank
    assert all(plan.tokens(r, m) <= 16384 for r in range(ranks) for m in range(plan.num_micro_batches))
    longest = max(lengths)
    totals = plan.rank_tokens()
    assert max(totals) - min(totals) <= longest  # LPT bound
    for r in range(ranks):
        loads = [plan.tokens(r, m) for m in range(plan.num_micro_batches)]
        assert max(loads) - min(loads) <= longest  # worst-fit bound (every bin had room here)
    # near the fewest micro-batches possible
    assert plan.num_micro_batches <= -(-max(totals) // 16384) + 1


def test_deterministic_and_order_independent_of_call():
    lengths = long_tailed(300, 7)
    assert plan_micro_batches(lengths, 9000, num_ranks=4).plan == plan_micro_batches(lengths, 9000, num_ranks=4).plan


def test_too_long_sequence_is_an_error_or_truncated():
    with pytest.raises(ValueError, match=r"sequence 2 has 5000 tokens, more than max_tokens=4096"):
        plan_micro_batches([10, 20, 5000], 4096)
    plan = plan_micro_batches([10, 20, 5000], 4096, truncate=True)
    assert plan.lengths == [10, 20, 4096]
    with pytest.raises(ValueError, match=r"sequence 0 has negative length -1"):
        plan_micro_batches([-1], 10)
    with pytest.raises(ValueError, match=r"num_ranks must be >= 1, got 0"):
        plan_micro_batches([1], 10, num_ranks=0)


def test_fewer_sequences_than_ranks_gives_empty_micro_batches_not_a_crash():
    plan = plan_micro_batches([5, 6], 100, num_ranks=4)
    assert plan.num_micro_batches == 1 and sorted(plan.rank_tokens()) == [0, 0, 5, 6]
