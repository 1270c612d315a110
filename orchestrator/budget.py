"""Splitting a request's visual-token budget across its images and video frames.

Pure and transport-free: the orchestrator asks each compressor which token counts an item can
be compressed to (its *ladder*), calls :func:`allocate`, then asks for the chosen counts.

The rule, stated step by step (docs/methods.md §1.4):

1. Temporal de-duplication, when ``dedup_threshold`` is set. Each video's frames are walked in
   request order; a frame whose ``similarity_to_previous`` is ``>= dedup_threshold`` is dropped
   (0 tokens, ``duplicate_of`` = the video's most recent kept frame). The similarity is to the
   *immediately previous* frame, kept or not, because that is what the field measures; a slow
   pan can therefore drop a run of frames whose drift adds up. A caller that wants "similar to
   the last kept frame" computes the similarity against that frame instead. A video's first
   frame, a frame without a similarity and every image are always kept.
2. Every kept item starts at its natural count ``levels[0]``. If the total fits the budget, that
   is the allocation. Otherwise, per policy:

   - ``uniform``: while the total exceeds the budget, the item holding the most tokens steps
     down one rung of its ladder; ties go to the later item, so earlier items keep more. Items
     with the same ladder end at most one rung apart (until the rounding pass below).
   - ``complexity``: every item first gets a *floor*: its smallest rung at or above
     ``floor_share x budget / items`` (a share of its fair part) when that rung is within the
     fair part, else its largest rung at or below that share; the last rungs when even those do
     not fit together. Then the rest of the budget goes where it buys the most: repeatedly, the
     item whose next rung up has the highest value per token, ``complexity / tokens held``
     (richer items and items holding few tokens first; ties: the item with a complexity, the one
     holding fewer tokens, then the earlier item), steps up to it if the step fits what is left,
     and otherwise steps no more. Tokens end roughly in proportion to complexity, and no item is
     left with less than its floor. An item without a complexity weighs 0: it steps up after
     every item that has one (all weigh the same when none has one).

   Both policies then spend what rounding left: while some item's next rung up fits what is
   left, the item holding the fewest tokens among those (ties: the earlier item) steps up.
   If every kept item is at its last rung and the total still exceeds the budget, the request
   cannot fit: :class:`~squint.errors.BudgetExceeded`.

Stepping down one rung at a time costs O(items x rungs) heap operations (36,864 for 64 items of
576 rungs, tens of milliseconds in Python). The same result comes in closed form: under the
uniform rule, steps happen in decreasing order of (tokens held, index), so the final state is
"every item at its largest rung <= v" for a threshold v found by bisection, plus a partial pass
over the items sitting exactly at v + 1. The unit tests check it against a literal step-by-step
implementation.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from squint.errors import BudgetExceeded

POLICIES = ("uniform", "complexity")
# The floor of the complexity policy, as a share of an item's fair part (budget / items).
DEFAULT_FLOOR_SHARE = 0.5
# Note on "complexity": docs/methods.md §1.4 steps the image with the lowest sigma_bar *at its next
# factor* until the budget holds, which starves the poorer images (two of complexity 0.2 and 0.4
# under 600 tokens got 16 and 576). Here each item carries one complexity for every step, gets a
# floor first, and the rest goes by marginal value.


@dataclass(frozen=True)
class BudgetItem:
    """One image or video frame as the allocator sees it.

    levels: the visual-token counts this item can be compressed to, strictly descending, all
        >= 1; ``levels[0]`` is its natural count (what its compressor gives unconstrained).
    complexity: how rich the item is, e.g. DFMR's mean window std σ̄; higher keeps more tokens
        under the ``complexity`` policy. ``None`` when the compressor reports none.
    video: the chunk index of the video a frame belongs to; ``None`` for images.
    similarity_to_previous: cosine similarity of this frame's CLIP features to the previous
        frame of the same video; ``None`` for a video's first frame and for images.
    """

    levels: tuple[int, ...]
    complexity: float | None = None
    video: int | None = None
    similarity_to_previous: float | None = None

    def __post_init__(self) -> None:
        # operator.index accepts numpy integers from compressors and refuses floats.
        levels = tuple(operator.index(level) for level in self.levels)
        if not levels:
            raise ValueError("BudgetItem.levels is empty; give at least the natural token count")
        if levels[-1] < 1 or any(a <= b for a, b in zip(levels, levels[1:])):
            raise ValueError(f"BudgetItem.levels must be strictly descending and >= 1, got {levels}")
        if self.complexity is not None and math.isnan(self.complexity):
            raise ValueError("BudgetItem.complexity is NaN; give a number or None")
        object.__setattr__(self, "levels", levels)


@dataclass(frozen=True)
class ItemAllocation:
    """What one item gets.

    tokens: the rung of the item's ladder chosen for it; 0 when dropped as a duplicate.
    duplicate_of: the index of the earlier kept frame this one repeats; ``None`` when kept.
    """

    tokens: int
    duplicate_of: int | None = None


@dataclass(frozen=True)
class Allocation:
    """The split of one request's budget.

    items: one allocation per input item, in input order.
    policy: the policy that chose the steps, one of :data:`POLICIES`.
    budget: the visual-token budget; 0 means unlimited.
    total: the sum of ``items[i].tokens``, never above ``budget`` when one is set.
    """

    items: tuple[ItemAllocation, ...]
    policy: str
    budget: int
    total: int


def allocate(
    items: Sequence[BudgetItem],
    budget: int,
    policy: str = "uniform",
    dedup_threshold: float | None = None,
    floor_share: float = DEFAULT_FLOOR_SHARE,
) -> Allocation:
    """Choose a token count for every item so that the total fits ``budget`` (0 = unlimited).

    ``floor_share`` (``complexity`` only, in [0, 1]): each item's floor as a share of its fair
    part of the budget. Raises ``ValueError`` for an unknown policy, a negative budget, a NaN
    threshold or a floor share outside [0, 1], and :class:`BudgetExceeded` when even every kept
    item's smallest setting is over budget.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown budget policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if budget < 0:
        raise ValueError(f"visual_token_budget is {budget}; it must be >= 0 (0 = unlimited)")
    if dedup_threshold is not None and math.isnan(dedup_threshold):
        raise ValueError("dedup_threshold is NaN; give a number or None")
    if not 0.0 <= floor_share <= 1.0:
        raise ValueError(f"floor_share is {floor_share}; it must be in [0, 1]")

    duplicate_of = _deduplicate(items, dedup_threshold)
    kept = [i for i, original in enumerate(duplicate_of) if original is None]
    tokens = [0] * len(items)
    for i in kept:
        tokens[i] = items[i].levels[0]

    if budget and sum(tokens) > budget:
        floor = sum(items[i].levels[-1] for i in kept)
        if floor > budget:
            raise BudgetExceeded(_infeasible_message(len(kept), len(items) - len(kept), floor, budget))
        if policy == "uniform":
            for i, count in zip(kept, _even_split([items[i].levels for i in kept], budget)):
                tokens[i] = count
            _spend_rest(items, kept, tokens, budget)
        else:
            # Stepping up until no step fits already spends what rounding leaves.
            _by_marginal_value(items, kept, tokens, budget, floor_share)

    return Allocation(
        items=tuple(ItemAllocation(t, d) for t, d in zip(tokens, duplicate_of)),
        policy=policy,
        budget=budget,
        total=sum(tokens),
    )


def _deduplicate(items: Sequence[BudgetItem], threshold: float | None) -> list[int | None]:
    """For each item, the index of the kept frame it repeats, or ``None`` when it is kept."""
    duplicate_of: list[int | None] = [None] * len(items)
    if threshold is None:
        return duplicate_of
    last_kept: dict[int, int] = {}  # video -> index of its most recent kept frame
    for i, item in enumerate(items):
        if item.video is None:
            continue
        similarity = item.similarity_to_previous
        # A video's first frame has no previous frame to repeat, whatever its similarity says.
        if item.video in last_kept and similarity is not None and similarity >= threshold:
            duplicate_of[i] = last_kept[item.video]
        else:
            last_kept[item.video] = i
    return duplicate_of


def _rung_at_least(levels: tuple[int, ...], target: float) -> int:
    """The smallest rung >= target (the natural count when every rung is below it)."""
    return next((level for level in reversed(levels) if level >= target), levels[0])


def _rung_at_most(levels: tuple[int, ...], target: float) -> int:
    """The largest rung <= target (the last rung when every rung is above it)."""
    return next((level for level in levels if level <= target), levels[-1])


def _floors(items: Sequence[BudgetItem], kept: list[int], budget: int, floor_share: float) -> dict[int, int]:
    """Each kept item's floor: its rung at or above its share of the fair part when that rung is
    within the fair part itself, else its rung at or below the share; the last rungs when even
    those do not fit together (the caller has checked that the last rungs do)."""
    fair = budget / len(kept)
    target = floor_share * fair
    floors = {}
    for i in kept:
        up = _rung_at_least(items[i].levels, target)
        # A rung above the fair part would be a floor larger than the item's share of the budget.
        floors[i] = up if up <= fair else _rung_at_most(items[i].levels, target)
    if sum(floors.values()) <= budget:
        return floors
    return {i: items[i].levels[-1] for i in kept}


def _weights(items: Sequence[BudgetItem], kept: list[int]) -> dict[int, float]:
    """Each item's complexity as a weight; without one, 0 (all equal when no item has one)."""
    known = [items[i].complexity for i in kept if items[i].complexity is not None]
    default = 0.0 if known else 1.0
    return {i: max(items[i].complexity if items[i].complexity is not None else default, 0.0) for i in kept}


def _by_marginal_value(
    items: Sequence[BudgetItem], kept: list[int], tokens: list[int], budget: int, floor_share: float
) -> None:
    """Floors first, then the rest by value per token (``complexity / tokens held``), one rung at a time."""
    floors = _floors(items, kept, budget, floor_share)
    weights = _weights(items, kept)
    for i in kept:
        tokens[i] = floors[i]
    # Ties: the richer item (a ratio can underflow), one with a complexity before one without, the
    # one holding fewer tokens (all-zero complexities split evenly), then the earlier.
    _step_up(
        items,
        kept,
        tokens,
        budget,
        lambda i, held: (-weights[i] / held, -weights[i], items[i].complexity is None, held),
    )


def _spend_rest(items: Sequence[BudgetItem], kept: list[int], tokens: list[int], budget: int) -> None:
    """What rounding left: the item holding the fewest tokens (ties: the earlier) whose next rung
    fits steps up, until none fits."""
    _step_up(items, kept, tokens, budget, lambda i, held: held)


def _step_up(
    items: Sequence[BudgetItem],
    kept: list[int],
    tokens: list[int],
    budget: int,
    priority: Callable[[int, int], float | tuple[float, float, bool, int]],
) -> None:
    """Step items up one rung at a time, lowest ``priority(i, tokens held)`` first (ties: the
    earlier item), while the step fits; an item whose next step does not fit steps no more (what
    is left only shrinks)."""
    rest = budget - sum(tokens[i] for i in kept)
    rung = {i: items[i].levels.index(tokens[i]) for i in kept}
    heap = [(priority(i, tokens[i]), i) for i in kept if rung[i] > 0]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        up = items[i].levels[rung[i] - 1]
        if up - tokens[i] > rest:
            continue
        rest -= up - tokens[i]
        tokens[i] = up
        rung[i] -= 1
        if rung[i] > 0:
            heapq.heappush(heap, (priority(i, up), i))


def _even_split(ladders: list[tuple[int, ...]], target: int) -> list[int]:
    """The uniform rule on one group: step the item holding the most (ties: the later one).

    Needs ``sum(l[-1]) <= target < sum(l[0])``. The steps run in decreasing (from-count,
    index) order, so after every step from a count above v, item k sits at ``at_most(k, v)``,
    its largest rung <= v (or its last rung). Bisect for the largest v whose full pass fits,
    then finish the pass at v + 1 from the last item backwards.
    """
    ascending = [ladder[::-1] for ladder in ladders]

    def at_most(k: int, v: int) -> int:
        position = bisect.bisect_right(ascending[k], v)
        return ascending[k][position - 1] if position else ascending[k][0]

    def total_at(v: int) -> int:
        return sum(at_most(k, v) for k in range(len(ladders)))

    fits, over = 0, max(ladder[0] for ladder in ladders)  # total_at(fits) <= target < total_at(over)
    while over - fits > 1:
        middle = (fits + over) // 2
        if total_at(middle) <= target:
            fits = middle
        else:
            over = middle
    counts = [at_most(k, over) for k in range(len(ladders))]
    total = sum(counts)
    for k in reversed(range(len(ladders))):
        if total <= target:
            break
        if counts[k] == over and over != ladders[k][-1]:
            lower = at_most(k, fits)
            total -= counts[k] - lower
            counts[k] = lower
    return counts


def refuse_early(must_keep: int, may_drop: int, smallest: int, budget: int) -> None:
    """Before any image is analysed: :class:`BudgetExceeded` when ``must_keep`` items (images, and
    the frames de-duplication cannot drop) at ``smallest`` tokens each exceed ``budget`` (0 =
    unlimited). ``may_drop`` frames might repeat others and are not counted."""
    if budget and must_keep * smallest > budget:
        message = _infeasible_message(must_keep, 0, must_keep * smallest, budget)
        if may_drop:
            message += f" ({may_drop} more video frames were not counted: they may repeat others)"
        raise BudgetExceeded(message)


def _infeasible_message(kept: int, dropped: int, floor: int, budget: int) -> str:
    noun, verb = ("media item", "needs") if kept == 1 else ("media items", "need")
    duplicates = f" ({dropped} more dropped as duplicate frames)" if dropped else ""
    return (
        f"the {kept} {noun}{duplicates} {verb} at least {floor} visual tokens (their smallest settings); "
        f"visual_token_budget is {budget}; raise the budget or send fewer images or frames"
    )
