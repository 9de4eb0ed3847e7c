"""Stage-2 gradient buckets: reduce each bucket to the ranks that own its blocks as soon as it is ready."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["GradBuckets", "GradPresence"]


class GradBuckets:
    """Groups parameters (in reverse order, as backward produces them) into buckets of flat-buffer ranges.

    Args:
        flat_grads: the flat gradient buffers (one per parameter dtype, see :mod:`dist8.shard.flat`).
        param_spans: per parameter, ``(buffer index, start, stop)`` of its gradient in its buffer.
        rank_ranges: per buffer, the element range ``[lo, hi)`` each rank owns.
        cap_bytes: a bucket is closed once its ranges hold at least this many bytes.
        group: the process group; rank: this rank in it.

    When every parameter of a bucket has its gradient, each of the bucket's buffer ranges
    is summed onto the rank(s) owning those blocks with ``dist.reduce`` (one call per
    owning rank and buffer, asynchronous), so each rank ends with the summed gradient of
    its own blocks only. Buckets (and the buffers within a bucket) are launched in a
    fixed order on every rank, so collectives always match, whatever order the hooks
    of different dtypes fire in.
    """

    def __init__(
        self,
        flat_grads: Sequence[torch.Tensor],
        param_spans: Sequence[tuple[int, int, int]],
        rank_ranges: Sequence[Sequence[tuple[int, int]]],
        cap_bytes: int,
        group: dist.ProcessGroup | None,
        rank: int = 0,
    ) -> None:
        self.flat_grads = list(flat_grads)
        self.rank = rank
        self.rank_ranges = rank_ranges
        self.group = group
        # (spans: buffer -> (start, stop), member parameter indices); a bucket's members of one
        # buffer are consecutive there, so each buffer contributes one range.
        self.buckets: list[tuple[dict[int, tuple[int, int]], list[int]]] = []
        spans: dict[int, tuple[int, int]] = {}
        members: list[int] = []

        def nbytes(s: dict[int, tuple[int, int]]) -> int:
            return sum((b - a) * self.flat_grads[k].element_size() for k, (a, b) in s.items())

        for index in reversed(range(len(param_spans))):
            k, start, stop = param_spans[index]
            a, b = spans.get(k, (start, stop))
            spans[k] = (min(a, start), max(b, stop))
            members.append(index)
            if nbytes(spans) >= cap_bytes:
                self.buckets.append((spans, members))
                spans, members = {}, []
        if members:
            self.buckets.append((spans, members))
        self.bucket_of = {i: b for b, (_, members) in enumerate(self.buckets) for i in members}
        self.bytes_sent = 0
        self.reset()

    def reset(self) -> None:
        self.pending = [len(members) for _, members in self.buckets]
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
        spans, _ = self.buckets[b]
        for k in sorted(spans):
            start, stop = spans[k]
            for owner, (lo, hi) in enumerate(self.rank_ranges[k]):
                a, z = max(start, lo), min(stop, hi)
                if a >= z:
                    continue
                chunk = self.flat_grads[k][a:z]
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


class GradPresence:
    """Which parameters hold a gradient in torch's sense (``p.grad is not None``) under stage 2.

    Stage 2 keeps every ``.grad`` as a view of the flat gradient buffer, so "no gradient" cannot be
    read off ``.grad``: a parameter that took no part in backward (an unused branch, an expert no
    token was routed to) would otherwise step with zeros (momentum and weight decay moving it) after
    ``optimizer.zero_grad()``, or with its last gradient again after ``model.zero_grad()`` (which
    sets ``.grad`` to None but leaves the buffer). torch's optimizers skip such parameters; this
    records what torch would see, so :class:`~dist8.shard.ShardedOptimizer` can skip them too.

    ``has[i]``: parameter ``i`` holds a gradient (set by its backward hook, by
    ``zero_grad(set_to_none=False)``, or a gradient assigned to ``.grad``; cleared by
    ``zero_grad()``). ``fired[i]``: its hook ran since the last step or ``zero_grad``, so its
    bucket may already be reduced.
    """

    def __init__(self, n: int) -> None:
        self.has = [False] * n
        self.fired = [False] * n

    def backward_hook(self, index: int) -> None:
        self.has[index] = self.fired[index] = True

    def zeroed(self, set_to_none: bool) -> None:
        self.has = [not set_to_none] * len(self.has)
        self.fired = [False] * len(self.fired)

    def stepped(self) -> None:
        self.fired = [False] * len(self.fired)
