"""Gradient release for ``nn.Linear`` weights in chunks: no layer's weight gradient exists whole.

With ``dist8.gradient_release(model, opt, linear_grad_chunk=N)`` every eligible plain
``nn.Linear`` computes its weight gradient inside its own backward in row chunks of about ``N``
elements (whole quantization blocks) and steps each chunk at once (:class:`dist8.optim.range_step.RangeStep`),
so the largest gradient alive is one chunk instead of the largest layer's weight gradient: the
term that kept gradient release's peak above its steady bytes per parameter.

Exactness: block-aligned ranges step bitwise like the whole parameter, and a chunk's rows of
``grad_out^T @ input`` are the rows the whole product has up to the BLAS's summation order: bitwise
with torch's CPU BLAS here for chunks of at least :data:`MIN_CHUNK_ROWS` rows (fewer rows take a
matrix-vector path); a GPU BLAS may sum in another order. Activation checkpointing (reentrant or
not) is chunked too: a forward recomputed inside a backward belongs to that backward's graph. The input gradient is computed before the weight moves.
The bias keeps the ordinary release hook.

Where the whole gradient is used instead (correct, not chunked, for that backward): a module
called more than once in one graph (a shared layer; found at the second call, the earlier calls
are switched too), forward under an autocast to another dtype than the weight's (autocast to the
weight's own dtype, e.g. bf16 weights under bf16 autocast, casts nothing and is chunked), an
input whose dtype is not the weight's, a
parameter whose settings stop allowing it (e.g. ``percentile_clipping`` set later by a
scheduler or an override). A backward that does not accumulate the weight's gradient
(``torch.autograd.grad(loss, inputs)``) computes no weight gradient and steps nothing, as the
ordinary release hook does.
"""
from __future__ import annotations

import math
import types
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dist8.optim.range_step import RangeStep, range_step_refusal

if TYPE_CHECKING:
    from dist8.optim.release import GradientRelease

__all__ = ["ChunkedLinears", "MIN_CHUNK_ROWS", "chunk_rows"]

# Says whether the running backward will execute a graph node (here: the weight's
# AccumulateGrad); used by torch's own multi-grad hooks. Absent in some build: assume it will.
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
# The id of the backward running on this thread (-1 outside one): a forward run inside a backward is
# activation checkpointing's recompute and belongs to that backward's graph, not to the outer one.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)

# Fewer rows make the BLAS take a matrix-vector path whose sums differ from the whole product's
# (1-2 row fp32 chunks were 1 ulp off on this CPU's oneDNN); 8 rows and up matched bitwise.
MIN_CHUNK_ROWS = 8


def chunk_rows(out_features: int, in_features: int, block_size: int, chunk_numel: int) -> int:
    """Rows of a ``[out_features, in_features]`` weight per chunk: whole quantization blocks of
    ``block_size`` elements, about ``chunk_numel`` elements, and at least :data:`MIN_CHUNK_ROWS` rows
    (rounded up to whole blocks)."""
    unit = block_size // math.gcd(in_features, block_size)  # rows whose elements fill whole blocks
    least = unit * -(-MIN_CHUNK_ROWS // unit)
    rows = max(least, chunk_numel // in_features // unit * unit)
    return min(out_features, rows)


class _LinearUse:
    """Bookkeeping of one patched ``nn.Linear``: which of its graph nodes still wait for backward."""

    def __init__(self, owner: ChunkedLinears, module: torch.nn.Linear, name: str) -> None:
        self.owner = owner
        self.module = module
        self.name = name
        self.pending: list[tuple[weakref.ref, int]] = []  # (forward's node, graph task it ran in)

    def started(self, ctx: Any) -> None:
        """A forward in a graph: chunk only if no other forward of this module in the same graph
        (same running backward, or none) waits for backward."""
        task = _graph_task_id()
        self.pending = [(r, t) for r, t in self.pending if (c := r()) is not None and not c.done]
        ctx.done = False
        ctx.chunked = True
        for r, t in self.pending:  # a shared layer: every use of this graph returns its whole gradient
            c = r()
            if t == task and c is not None:
                c.chunked = ctx.chunked = False
        self.pending.append((weakref.ref(ctx), task))


class _ChunkedWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use: _LinearUse) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.use = use
        use.started(ctx)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        ctx.done = True
        x, weight = ctx.saved_tensors
        # before the weight moves: the input gradient uses the weight of the forward
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        go = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        grad_b = go.sum(0) if ctx.needs_input_grad[2] else None
        grad_w = ctx.use.owner.weight_grad(ctx.use, bool(ctx.chunked), go, xs) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, grad_b, None


class ChunkedLinears:
    """The ``nn.Linear`` modules whose weights a :class:`~dist8.optim.release.GradientRelease` steps in chunks.

    Attributes:
        chunked: names of the modules whose weight gradients are chunked.
        unchunked: ``{name: reason}`` of the plain ``nn.Linear`` modules left to the whole-gradient hook.
        chunk_numel: elements per chunk asked for (rounded to whole blocks per module).
    """

    def __init__(self, release: GradientRelease, model: torch.nn.Module, chunk_numel: int) -> None:
        self.release = release
        self.chunk_numel = chunk_numel
        self.chunked: list[str] = []
        self.unchunked: dict[str, str] = {}
        self._patched: list[torch.nn.Module] = []
        opt = release.optimizer
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        for name, module in model.named_modules():
            if type(module) is not torch.nn.Linear:  # subclasses (LoRA, quantized layers) compute their own way
                continue
            w = module.weight
            reason = None
            if not w.requires_grad or id(w) not in in_opt:
                reason = "its weight is frozen or not in the optimizer"
            elif uses.get(id(w), 0) > 1:
                reason = "its weight is shared with another module (tied)"
            elif "forward" in module.__dict__:
                reason = "its forward is already replaced (e.g. by accelerate's hooks)"
            else:
                reason = range_step_refusal(opt, w)
            if reason is not None:
                self.unchunked[name] = reason
                continue
            module.forward = types.MethodType(_released_linear_forward, module)
            module._dist8_linear_use = _LinearUse(self, module, name)
            self._patched.append(module)
            self.chunked.append(name)

    def grad_numel(self, p: torch.Tensor) -> int:
        """Elements of ``p``'s gradient alive at once: one chunk for a chunked weight, else all of it."""
        for module in self._patched:
            if module.weight is p:
                opt = self.release.optimizer
                block = opt.settings(p, opt.group_of(p)).block_size
                return chunk_rows(p.shape[0], p.shape[1], block, self.chunk_numel) * p.shape[1]
        return p.numel()

    def remove(self) -> None:
        """Give every patched module its own forward back."""
        for module in self._patched:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_dist8_linear_use", None)
        self._patched.clear()

    def weight_grad(self, use: _LinearUse, chunked: bool, go: torch.Tensor, xs: torch.Tensor) -> torch.Tensor | None:
        """Step ``use``'s weight chunk by chunk and return None, or return its whole gradient."""
        w = use.module.weight
        if _will_execute is not None:
            with torch.enable_grad():
                accumulate = w.view_as(w).grad_fn.next_functions[0][0]
            if not _will_execute(accumulate):  # e.g. torch.autograd.grad(loss, inputs): no weight gradient wanted
                return None
        release = self.release
        if not (chunked and release.active) or range_step_refusal(release.optimizer, w) is not None:
            return go.t().mm(xs)
        with release.lock:
            release.before_update(w)
            step = RangeStep(release.optimizer, w)
            out_features, in_features = w.shape
            rows = chunk_rows(out_features, in_features, step.block_size, self.chunk_numel)
            for r0 in range(0, out_features, rows):
                step.update(r0 * in_features, go[:, r0:r0 + rows].t().mm(xs))
            step.finish()
            release.after_update(w)
        return None


def _released_linear_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` whose backward steps the weight in chunks (see the module docstring)."""
    device = input.device.type
    if (not torch.is_grad_enabled() or not self.weight.requires_grad or input.dtype != self.weight.dtype
            or (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != self.weight.dtype)):
        return F.linear(input, self.weight, self.bias)  # autocast would cast: autograd's own backward
    return _ChunkedWeightGrad.apply(input, self.weight, self.bias, self._dist8_linear_use)
