"""ShardedBatches: every rank the same number of batches, and a resume at another world size
neither repeats nor skips an example of the epoch (plain and pinned-to-rank layouts)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from gist_dist.data.batches import ShardedBatches


def take(world: int, n_batches: int, make, state=None) -> tuple[list[int], dict]:
    """Run `n_batches` per rank on `world` ranks (restored from `state`); examples seen, new state."""
    ranks = [make(r, world) for r in range(world)]
    for b in ranks:
        if state is not None:
            b.load_state_dict(state)
    seen = [i for _ in range(n_batches) for b in ranks for i in next(b)]
    return seen, ranks[0].state_dict()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(8, 80),
    bs=st.integers(1, 4),
    w1=st.integers(1, 4),
    w2=st.integers(1, 4),
    pinned=st.booleans(),
    seed=st.integers(0, 5),
    frac=st.floats(0, 1),
)
def test_resume_at_another_world_size_sees_each_example_once(n, bs, w1, w2, pinned, seed, frac):
    examples = list(range(n))
    if n < bs * max(w1, w2):
        return

    def make(rank, world):
        return ShardedBatches(examples, bs, rank, world, seed, pinned=pinned)

    first = make(0, w1)
    before = int(frac * first.per_epoch)
    seen, state = take(w1, before, make)
    rest = make(0, w2)
    rest.load_state_dict(state)
    seen2, state2 = take(w2, rest.per_epoch - rest.index, make, state)  # the rest of the epoch
    epoch = seen + seen2
    assert len(epoch) == len(set(epoch)), "an example was repeated within the epoch"
    # what was left out is less than one round of batches of either layout (the dropped tail)
    assert n - len(epoch) < bs * max(w1, w2) * (2 if pinned else 1) + (w1 if pinned else 0)
    assert state2["epoch"] == 0 and take(w2, 1, make, state2)[1]["epoch"] == 1  # next batch starts epoch 1


def test_pinned_examples_stay_on_their_rank_across_epochs():
    examples = list(range(24))
    ranks = [ShardedBatches(examples, 2, r, 2, 0, pinned=True) for r in range(2)]
    per_rank = [set(), set()]
    for _ in range(3):
        for r, b in enumerate(ranks):
            got = {i for _ in range(b.per_epoch) for i in next(b)}
            per_rank[r] |= got
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == set(examples)


def test_same_world_resume_continues_exactly():
    examples = list(range(30))

    def make(rank, world):
        return ShardedBatches(examples, 3, rank, world, 7)

    straight, _ = take(2, 4, make)
    head, state = take(2, 2, make)
    tail, _ = take(2, 2, make, state)
    assert head + tail == straight
