"""The block allocator's rules on their own, without torch or a model."""

from __future__ import annotations

import pytest

from splitserve.engine.blocks import BlockAllocator, NoFreeBlocksError, blocks_for, spread_order


@pytest.mark.parametrize(
    ("tokens", "blocks"), [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3), (3000, 188)]
)
def test_blocks_for_rounds_up_to_whole_blocks(tokens: int, blocks: int) -> None:
    assert blocks_for(tokens, 16) == blocks


def test_allocate_and_release_keep_the_counts_adding_up() -> None:
    allocator = BlockAllocator(8)
    first, second = allocator.allocate(3), allocator.allocate(2)
    assert len(set(first + second)) == 5
    assert (allocator.num_free, allocator.num_used) == (3, 5)
    allocator.release(first)
    assert (allocator.num_free, allocator.num_used) == (6, 2)
    allocator.release(second)
    assert allocator.num_free == allocator.num_blocks == 8


def test_all_or_nothing_when_blocks_run_out() -> None:
    allocator = BlockAllocator(4)
    allocator.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        allocator.allocate(2)
    assert allocator.num_free == 1  # nothing was taken by the failed call


def test_the_watermark_is_kept_back() -> None:
    allocator = BlockAllocator(4)
    assert allocator.can_allocate(3, keep_free=1) and not allocator.can_allocate(4, keep_free=1)
    with pytest.raises(NoFreeBlocksError):
        allocator.allocate(4, keep_free=1)
    assert len(allocator.allocate(3, keep_free=1)) == 3


def test_freed_blocks_are_reused_first_freed_first() -> None:
    allocator = BlockAllocator(3)
    a, b, c = (allocator.allocate(1)[0] for _ in range(3))
    allocator.release([b])
    allocator.release([a])
    assert allocator.allocate(2) == [b, a]
    assert c not in (a, b)


@pytest.mark.parametrize("bad", [[0, 0], [7], [99]], ids=["twice-in-one-call", "never-taken", "out-of-range"])
def test_releasing_a_block_not_in_use_raises_and_changes_nothing(bad: list[int]) -> None:
    allocator = BlockAllocator(8)
    assert allocator.allocate(2) == [0, 1]
    with pytest.raises(ValueError, match="not in use"):
        allocator.release(bad)
    assert allocator.num_used == 2


def test_double_free_across_calls_raises() -> None:
    allocator = BlockAllocator(2)
    taken = allocator.allocate(1)
    allocator.release(taken)
    with pytest.raises(ValueError, match="not in use"):
        allocator.release(taken)
    assert allocator.num_free == 2


def test_an_empty_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockAllocator(0)


def test_new_sequences_start_spread_apart() -> None:
    assert spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert sorted(spread_order(13)) == list(range(13))


def test_a_growing_sequence_gets_the_block_after_its_last_when_free() -> None:
    allocator = BlockAllocator(8)
    first = allocator.allocate(2)
    assert first == [0, 1]  # a new sequence: the next block in order, and the ones after it
    assert allocator.allocate(1, after=1) == [2]
    assert allocator.allocate(1) == [4]  # the next new sequence starts in the widest gap
    assert allocator.allocate(1, after=3) == [6]  # 4 is taken: the next block in order instead
    allocator.release([0, 1, 2, 4, 6])
    assert allocator.num_free == 8
