"""Stage-2 gradients of ShardedOptimizer: a flat gradient buffer per parameter dtype whose buckets are
reduced to the ranks that own their blocks as soon as backward completes them. (One file, one concern: what
stage 2's ``.grad`` holds between backward and the step -- buffers, buckets, presence, and the refusals of
gradients it cannot treat as torch would.)

:class:`Stage2Grads` is what ShardedOptimizer(stage=2) holds: the buffers, the parameters' ``.grad``
views of them, the backward hooks, the buckets (:class:`GradBuckets`) and which parameters hold a
gradient in torch's sense (:class:`GradPresence`).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from dist8.shard.agreement import from_every_rank
from dist8.shard.flat import FlatBuffer

__all__ = ["GradBuckets", "GradPresence", "Stage2Grads", "ddp_problem"]


def ddp_problem(params: Sequence[torch.Tensor]) -> str | None:
    """The refusal to give when a DistributedDataParallel wrapper holds any of ``params``, else None.

    DDP and stage 2 both reduce the gradients (DDP averages them in place after backward, or sums
    accumulation passes under its own no_sync()), which stage 2's checks see as gradients changed
    after backward or a second backward pass: that message would name clipping or no_sync(), not
    the cause. DDP leaves no mark on the parameters, so the wrappers alive in the process are
    looked up (on this error path only: a walk over the objects the garbage collector tracks)."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    ours = {id(p) for p in params}
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance may ask obj.__class__, which proxies answer with code
        if issubclass(type(obj), DistributedDataParallel) and any(id(q) in ours for q in obj.module.parameters()):
            return ("these parameters' model is wrapped in DistributedDataParallel, which reduces their gradients "
                    "itself; ShardedOptimizer(stage=2) reduces them during backward too: use stage=1 under DDP "
                    "(or stage=2 without the DDP wrapper)")
    return None


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
        self.marked = [False] * len(self.bucket_of)

    def wait(self) -> None:
        """Wait for the reductions already launched (none is left writing into a buffer about to change)."""
        for work in self.works:
            work.wait()
        self.works = []

    def mark_ready(self, param_index: int) -> None:
        """A parameter's gradient is complete; launch every bucket that is now ready, in order."""
        self.marked[param_index] = True
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

    def launch_remaining(self) -> None:
        """Launch the buckets not yet launched (some parameter of theirs got no gradient here), in order."""
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
            self.next_bucket += 1

    def flush(self) -> None:
        """Launch the buckets not yet launched and wait for all."""
        self.launch_remaining()
        self.wait()
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
    ``zero_grad(set_to_none=False)`` for a parameter that held one, or a gradient assigned to ``.grad``;
    cleared by ``zero_grad()``). ``fired[i]``: its hook ran since the last step or ``zero_grad``, so its
    bucket may already be reduced.
    """

    def __init__(self, n: int) -> None:
        self.has = [False] * n
        self.fired = [False] * n

    def backward_hook(self, index: int) -> None:
        self.has[index] = self.fired[index] = True

    def zeroed(self, kept: Sequence[bool]) -> None:
        """``zero_grad``: ``kept[i]``, parameter ``i`` keeps a (zeroed) gradient, as
        ``zero_grad(set_to_none=False)`` keeps one that is there; the others have none."""
        self.has = list(kept)
        self.fired = [False] * len(self.fired)

    def stepped(self) -> None:
        self.fired = [False] * len(self.fired)


class Stage2Grads:
    """The stage-2 gradients of ShardedOptimizer's parameters.

    Args:
        params: the parameters in layout order (views of their flat parameter buffers);
            names: their names, same order (for error messages).
        buffers: the flat parameter buffers (:func:`dist8.shard.flat.flat_buffers`);
            buffer_of: per parameter, the index of its buffer.
        rank, world_size, group: this rank, the number of ranks and the process group.
        bucket_cap_bytes: a gradient bucket is closed once it holds this many bytes.
        accumulating: returns True while backward passes only accumulate (``no_sync``).

    Every parameter's ``.grad`` is its range of a flat gradient buffer laid out like its
    parameter buffer. A hook after each parameter's gradient accumulation marks it present
    and, on several ranks and unless accumulating, launches every bucket that is complete;
    :meth:`reduce` then finishes the reductions and averages this rank's owned range.
    """

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str], buffers: Sequence[FlatBuffer],
                 buffer_of: Sequence[int], rank: int, world_size: int, group: dist.ProcessGroup | None,
                 bucket_cap_bytes: int, accumulating: Callable[[], bool]) -> None:
        self.params, self.names = list(params), list(names)
        self.buffers, self.buffer_of = list(buffers), list(buffer_of)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.accumulating = accumulating
        self.flat = [torch.zeros_like(buf.flat) for buf in self.buffers]
        spans = [(k, self.buffers[k].offset[i], self.buffers[k].offset[i] + p.numel())
                 for i, (k, p) in enumerate(zip(self.buffer_of, self.params))]
        self.buckets = GradBuckets(self.flat, spans, [buf.rank_ranges for buf in self.buffers], bucket_cap_bytes,
                                   group, rank)
        self.presence = GradPresence(len(self.params))
        # The buffers' version counters right after this step's last write of ours, once a bucket was
        # launched (None before): in-place ops bump them (views share their base's counter), collectives
        # do not. A different count at the step means the gradients were changed after their reduction
        # began (torch.nn.utils.clip_grad_norm_, p.grad.mul_): see present_on_any_rank.
        self.launch_versions: list[int] | None = None
        # a parameter's second gradient since the last step (see on_gradient): the refusal, raised at the step
        self.second_gradient: str | None = None
        # per parameter: its range still holds what the last step reduced and averaged (several ranks; cleared by
        # zero_grad() and by a fresh gradient): not the parameter's gradient any more, and a backward adds onto it
        self.stale = [False] * len(self.params)
        # each parameter's .grad: its range of the gradient buffer, made once
        self.views = [self.view(i, 0, p.numel()).view(p.shape) for i, p in enumerate(self.params)]
        self.view_ptrs = [v.data_ptr() for v in self.views]  # where each view must point (see repair_view)
        self.hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self.params)]
        self.attach_views()

    def remove(self) -> None:
        """Take the backward hooks off the parameters (a newer ShardedOptimizer took them over)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def view(self, index: int, start: int, numel: int) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of parameter ``index``'s gradient (flat)."""
        k = self.buffer_of[index]
        return self.buffers[k].view(index, start, numel, of=self.flat[k])

    def repair_view(self, index: int) -> bool:
        """Give parameter ``index`` a fresh view of its gradient range if its view object was re-pointed
        elsewhere: ``model.to(...)`` sets ``param.grad.data`` to a converted copy (accelerate's
        ``prepare`` copies every CPU tensor with ``model.to("cpu:0")``), and the view object is
        ``param.grad``. True if it was."""
        if self.views[index].data_ptr() == self.view_ptrs[index]:
            return False
        self.views[index] = self.view(index, 0, self.params[index].numel()).view(self.params[index].shape)
        return True

    def attach_views(self) -> None:
        for i, p in enumerate(self.params):
            self.repair_view(i)
            p.grad = self.views[i]

    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        # The parameter holds its hook; the hook holds these buffers only weakly, so an optimizer
        # that is dropped frees them (its hooks then do nothing).
        ref = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            grads = ref()
            if grads is not None:
                grads.on_gradient(index, p)

        return hook

    def on_gradient(self, index: int, p: torch.Tensor) -> None:
        """Parameter ``index``'s gradient was accumulated by backward: into the buffer, bucket marked."""
        flat = self.flat[self.buffer_of[index]]
        if p.dtype != flat.dtype or p.device.type != flat.device.type or (p.device.index or 0) != (
                flat.device.index or 0):
            return  # cast or moved after the optimizer was built: its step refuses, naming the parameter
        self.repair_view(index)  # then p.grad (the re-pointed view) holds the gradient: copied in below
        view = self.views[index]
        if p.grad.data_ptr() != view.data_ptr():  # e.g. after model.zero_grad(set_to_none=True)
            view.copy_(p.grad)
            p.grad = view
            self.stale[index] = False  # a fresh gradient; else backward added onto the last step's (refused)
        self.presence.backward_hook(index)
        if self.world_size > 1 and not self.accumulating():
            if self.buckets.marked[index]:  # its bucket may be reduced already: the new gradient would be lost
                # Refused at the step, on every rank (present_on_any_rank): raised here, inside one rank's
                # backward (a data-dependent branch), it left the other ranks waiting in the reductions.
                self.second_gradient = self.second_gradient or ddp_problem(self.params) or (
                    f"parameter {self.names[index]} got a second gradient before step(): ShardedOptimizer(stage=2) "
                    "sums each gradient onto the rank that owns it as soon as backward has accumulated it, so a "
                    "parameter takes one gradient per step. Accumulating over several backward passes: wrap all but "
                    "the last in `with opt.no_sync():` (as with DDP). A parameter used both inside and outside a "
                    "reentrant activation checkpoint (use_reentrant=True, whose recomputation runs a backward of its "
                    "own): use use_reentrant=False. Or use stage=1")
                return
            self.buckets.mark_ready(index)
            self.launch_versions = [g._version for g in self.flat]

    def present_on_any_rank(self, device: torch.device, refused: Exception | None = None) -> list[bool]:
        """Before :meth:`reduce`: bring ``.grad`` changes made outside backward into the buffer (None: no
        gradient, its range zeroed; a tensor assigned: copied in), then which parameters hold a gradient
        on any rank (one small all-reduce).

        ``refused``: the step was refused by this rank's own checks (its param groups, its parameters): the
        buffer is left alone, the collectives are the same, and every rank raises (this one ``refused``
        itself, the others a RuntimeError naming this rank)."""
        if refused is not None:
            return self._share_refusal(device, refused)
        presence = self.presence
        # refused on every rank alike (one rank raising alone would leave the others waiting)
        problem = self.second_gradient
        why = ("stage 2 sums each gradient onto the rank that owns it during backward, so a change made after "
               "backward reaches only this rank's partial sums")
        fix = "clip with opt.clip_grad_norm(max_norm) (the global norm), scale the loss instead, or use stage=1"
        changed = self.launch_versions is not None and [g._version for g in self.flat] != self.launch_versions
        if problem is None and changed:
            problem = ddp_problem(self.params) or (
                f"gradients were changed in place after backward (torch.nn.utils.clip_grad_norm_? p.grad.mul_?); {why}: {fix}")
        for i, p in enumerate(self.params):
            # re-pointed since backward (the model moved): it holds a copy of the range, nothing to bring in
            if self.repair_view(i) and p.grad is not None and p.grad.data_ptr() != self.views[i].data_ptr():
                p.grad = self.views[i]
            view = self.views[i]
            if p.grad is None:  # model.zero_grad(), or set by hand: no gradient, as torch sees it
                if not presence.fired[i]:
                    view.zero_()  # its bucket is reduced at the flush: no stale gradient goes with it
                presence.has[i] = False
                self.stale[i] = False
            elif p.grad.data_ptr() != view.data_ptr():  # a gradient assigned to .grad, not accumulated by backward
                if presence.fired[i] and self.world_size > 1:
                    problem = problem or ddp_problem(self.params) or (
                        f"parameter {self.names[i]}: .grad was replaced after backward; {why}: {fix}")
                    continue
                view.copy_(p.grad)
                p.grad = view
                presence.has[i] = True
                self.stale[i] = False
        kept = next((i for i, (st, has) in enumerate(zip(self.stale, presence.has)) if st and has), None)
        if problem is None and kept is not None:
            problem = (f"parameter {self.names[kept]} still holds the gradient the last step reduced (no zero_grad() "
                       "between the steps): stage 2 sums each gradient onto the rank that owns it during backward "
                       "and averages it at the step, so what is left is no longer the parameter's gradient, and a "
                       "backward adds onto it; call optimizer.zero_grad() (or model.zero_grad()) after each step, "
                       "or use stage=1")
        return self._share_presence(device, problem)

    def _share_refusal(self, device: torch.device, refused: Exception) -> list[bool]:
        try:
            self._share_presence(device, str(refused), "ShardedOptimizer.step() failed")
        except (ValueError, RuntimeError):
            pass  # every rank raises: this one the refusal itself
        raise refused

    def _share_presence(self, device: torch.device, problem: str | None,
                        refusal: str = "this step's gradients were refused") -> list[bool]:
        presence = self.presence
        has = torch.tensor([*presence.has, problem is not None], dtype=torch.uint8, device=device)
        if self.world_size > 1:
            # The buckets backward left unlaunched here first: a parameter used on another rank only (a
            # branch, an expert) had its bucket launched there during backward, so launching ours after
            # this all-reduce paired each rank's collectives with different ones, and every rank hung.
            # Bucket order is fixed, so every rank now issues the same reductions, then the all-reduce.
            self.buckets.launch_remaining()
            dist.all_reduce(has, op=dist.ReduceOp.MAX, group=self.group)
        if has[-1]:
            self.buckets.flush()  # no reduction left in flight into a buffer the caller will zero next
            # every rank's verdict, so that the others name the rank and the cause (collective: has[-1] is agreed)
            kind = RuntimeError if problem is not None and problem == self.second_gradient else ValueError
            verdicts = from_every_rank(None if problem is None else (kind.__name__, problem, refusal), self.group)
            if problem is not None:
                raise kind(problem)
            rank, (kind_name, message, theirs) = next((r, v) for r, v in enumerate(verdicts) if v is not None)
            kind = RuntimeError if kind_name == "RuntimeError" else ValueError
            raise kind(f"{theirs} on rank {rank}: {message}")
        return [bool(h) for h in has[:-1].tolist()]

    def reduce(self) -> None:
        """Finish the bucket reductions and average this rank's owned range (several ranks)."""
        if self.world_size == 1:
            return
        self.buckets.flush()
        for buf, grads in zip(self.buffers, self.flat):
            lo, hi = buf.rank_ranges[self.rank]
            grads[lo:hi].div_(self.world_size)
        self.launch_versions = None  # reduced and averaged: changes from here on (opt.clip_grad_norm) are right

    def stepped(self) -> None:
        self.presence.stepped()
        self.launch_versions = None
        self.second_gradient = None
        if self.world_size > 1:  # one rank holds its whole gradient: stepping it again is torch's semantics
            self.stale = [True] * len(self.params)

    def zero(self, set_to_none: bool) -> None:
        """Zero the buffers in place and give every parameter its view again. ``set_to_none=False`` keeps
        a (zero) gradient where torch would see one, so that it is stepped; one without stays without
        (torch keeps a None gradient None: momentum and weight decay must not move an unused parameter)."""
        # before attach_views: .grad None (model.zero_grad()) or a tensor assigned by hand tells it
        kept = [not set_to_none and self.holds_gradient(i) for i in range(len(self.params))]
        self.buckets.wait()  # after a refused step or backward, reductions may still be writing
        for grads in self.flat:
            grads.zero_()
        self.launch_versions = None
        self.second_gradient = None
        self.attach_views()
        self.buckets.reset()
        self.presence.zeroed(kept)
        self.stale = [False] * len(self.params)

    def holds_gradient(self, index: int) -> bool:
        """Whether parameter ``index`` holds a gradient in torch's sense now: its ``.grad`` is a tensor
        assigned by hand, or its view after backward (or a kept zeroed one); None, or the view of a
        parameter without one, is none."""
        grad = self.params[index].grad
        if grad is None:
            return False
        return self.presence.has[index] or grad.data_ptr() != self.views[index].data_ptr()

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.flat)
