"""Stage-2 gradient buckets: reduce each bucket to the ranks that own its blocks as soon as it is ready."""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["GradBuckets"]


class GradBuckets:
    """Groups parameters (in reverse order, as backward produces them) into buckets of flat-buffer ranges.

    When every parameter of a bucket has its gradient, the bucket's range of the
    flat gradient buffer is summed onto the rank(s) owning those blocks with
    ``dist.reduce`` (one call per owning rank, asynchronous), so each rank ends
    with the summed gradient of its own blocks only. Buckets are launched in a
    fixed order on every rank, so collectives always match.
    """

    def __init__(
        self,
        flat_grad: torch.Tensor,
        param_ranges: list[tuple[int, int]],
        rank_ranges: list[tuple[int, int]],
        cap_elements: int,
        group: dist.ProcessGroup | None,
        rank: int = 0,
    ) -> None:
        self.flat_grad = flat_grad
        self.rank = rank
        self.rank_ranges = rank_ranges
        self.group = group
        self.buckets: list[tuple[int, int, list[int]]] = []  # (start, stop, param indices)
        current: list[int] = []
        for index in reversed(range(len(param_ranges))):
            current.append(index)
            start = param_ranges[current[-1]][0]
            stop = param_ranges[current[0]][1]
            if stop - start >= cap_elements:
                self.buckets.append((start, stop, current))
                current = []
        if current:
            self.buckets.append((param_ranges[current[-1]][0], param_ranges[current[0]][1], current))
        self.bucket_of = {i: b for b, (_, _, members) in enumerate(self.buckets) for i in members}
        self.bytes_sent = 0
        self.reset()

    def reset(self) -> None:
        self.pending = [len(members) for _, _, members in self.buckets]
        self.next_bucket = 0
        self.works: list = []

    def mark_ready(self, param_index: int) -> None:
        """A parameter's gradient is complete; launch every bucket that is now ready, in order."""
        b = self.bucket_of[param_index]
        self.pending[b] -= 1
        while self.next_bucket < len(self.buckets) and self.pending[self.next_bucket] <= 0:
            self._launch(self.next_bucket)
            self.next_bucket += 1

    def _launch(self, b: int) -> None:
        start, stop, _ = self.buckets[b]
        for owner, (lo, hi) in enumerate(self.rank_ranges):
            a, z = max(start, lo), min(stop, hi)
            if a >= z:
                continue
            chunk = self.flat_grad[a:z]
            if owner != self.rank:
                self.bytes_sent += chunk.numel() * chunk.element_size()
            dst = owner if self.group is None else dist.get_global_rank(self.group, owner)
            self.works.append(dist.reduce(chunk, dst=dst, op=dist.ReduceOp.SUM, group=self.group, async_op=True))

    def flush(self) -> None:
        """Launch the buckets not yet launched (parameters without gradients) and wait for all."""
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
            self.next_bucket += 1
        for work in self.works:
            work.wait()
        self.reset()
