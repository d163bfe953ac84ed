"""Which campaign chunks run, and which of the finished ones are kept.

With `samples_per_target`: every chunk not yet on disk, each kept as it finishes.

With `valid_per_target` (samples_per_target is then the cap): each target's chunks are judged
in chunk order, and the target stops at the first chunk k whose chunks 0…k hold that many
valid samples. Workers may sample later chunks meanwhile; a chunk finished before the ones
ahead of it is held until they are in, and dropped when the target turned out to be done
without it. So the kept chunks are the ones a single worker would have kept, whatever the
number of workers or the order in which chunks finish, and a resumed campaign (whose kept
chunks are on disk) continues exactly. A target stops with up to one chunk of valid samples
more than asked.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any

from crystallm_core.product.campaign_spec import CampaignSpec, WorkItem


class ChunkPlan:
    """Hands out work items (`next_item`) and decides what to keep (`finished`).

    Every call costs O(log targets), amortised: a campaign may hold 10,000 targets and
    thousands of chunks each, and the driver asks once per chunk. Per target it keeps running
    sums of what is kept, a pointer to its next chunk to hand out and to judge, and its place
    in a heap ordered by (chunks in flight, target)."""

    def __init__(self, spec: CampaignSpec, done: dict[str, int]):
        """done: key → valid samples of every chunk already on disk."""
        self.wanted = spec.valid_per_target
        self.chunks: dict[int, list[WorkItem]] = defaultdict(list)
        for item in spec.work_items():
            self.chunks[item.target.index].append(item)
        self.valid = dict(done)  # judged and kept: key → valid samples
        self.held: dict[str, tuple[int, Any]] = {}  # finished, waiting for the chunks ahead of it
        self.dispatched = set(done)
        self.in_flight: dict[int, int] = defaultdict(int)
        self.next_to_hand: dict[int, int] = defaultdict(int)  # chunk index to look at first
        self.next_to_judge: dict[int, int] = defaultdict(int)
        self.kept_valid: dict[int, int] = defaultdict(int)
        self.kept_samples: dict[int, int] = defaultdict(int)
        self.cap = {target: sum(item.n for item in items) for target, items in self.chunks.items()}
        for target, items in self.chunks.items():
            for item in items:
                if item.key in done:
                    self.kept_valid[target] += done[item.key]
                    self.kept_samples[target] += item.n
        self.remaining = sum(self.open_samples(t) for t in self.chunks)
        self.queue = [(0, target) for target in sorted(self.chunks)]  # a heap; stale entries are skipped

    def satisfied(self, target: int) -> bool:
        """The target's kept chunks hold the valid samples asked for (never, without valid_per_target)."""
        return self.wanted is not None and self.kept_valid[target] >= self.wanted

    def open_samples(self, target: int) -> int:
        """Samples the target may still need: its cap less what is kept (0 once satisfied)."""
        if self.satisfied(target):
            return 0
        return self.cap[target] - self.kept_samples[target]

    def next_item(self) -> WorkItem | None:
        """The next chunk to sample: targets still short, the one with the fewest chunks in flight
        first, each target's chunks in order; None when nothing more is needed now."""
        while self.queue:
            count, target = heapq.heappop(self.queue)
            if count != self.in_flight[target] or self.satisfied(target):
                continue  # an outdated entry, or a target that is done
            items, index = self.chunks[target], self.next_to_hand[target]
            while index < len(items) and items[index].key in self.dispatched:
                index += 1
            self.next_to_hand[target] = index
            if index == len(items):
                continue  # every chunk handed out: the target leaves the queue
            self.dispatched.add(items[index].key)
            self.in_flight[target] += 1
            heapq.heappush(self.queue, (self.in_flight[target], target))
            return items[index]
        return None

    def finished(self, item: WorkItem, n_valid: int, payload: Any) -> list[Any]:
        """A chunk was sampled: the payloads to keep now, in chunk order (this one's, earlier held
        ones', or none)."""
        target = item.target.index
        self.in_flight[target] -= 1
        heapq.heappush(self.queue, (self.in_flight[target], target))
        if self.wanted is None:
            self.keep(item, n_valid)
            return [payload]
        self.held[item.key] = (n_valid, payload)
        kept, items = [], self.chunks[target]
        while self.next_to_judge[target] < len(items):
            chunk = items[self.next_to_judge[target]]
            if chunk.key in self.valid:  # kept before (on disk when the plan was made)
                self.next_to_judge[target] += 1
                continue
            if chunk.key not in self.held:
                break  # a chunk ahead is not in yet: later ones wait
            n, held = self.held.pop(chunk.key)
            self.next_to_judge[target] += 1
            if self.satisfied(target):
                continue  # the target was done without it: dropped
            self.keep(chunk, n)
            kept.append(held)
        return kept

    def keep(self, item: WorkItem, n_valid: int) -> None:
        target = item.target.index
        before = self.open_samples(target)
        self.valid[item.key] = n_valid
        self.kept_valid[target] += n_valid
        self.kept_samples[target] += item.n
        self.remaining -= before - self.open_samples(target)

    def remaining_samples(self) -> int:
        """Samples still to draw at most (the cap, for targets still short)."""
        return self.remaining
