"""Gradient release in chunks: no ``nn.Linear`` or ``nn.Embedding`` weight gradient exists whole.

With ``dist8.gradient_release(model, opt, weight_grad_chunk=N)`` every eligible plain
``nn.Linear`` and ``nn.Embedding`` (and an Embedding subclass with a ``lookup(input)`` method, such
as :class:`dist8.nn.StableEmbedding`) computes its weight gradient inside its own backward in row
chunks of about ``N`` elements (whole quantization blocks) and steps each chunk at once
(:class:`dist8.optim.range_step.RangeStep`), so the largest gradient alive is one chunk instead of
the largest layer's weight gradient: the term that kept gradient release's peak above its steady
bytes per parameter (for a language model, its embedding and output head are the largest).

Exactness: block-aligned ranges step bitwise like the whole parameter. A Linear chunk is the rows
``grad_out[:, rows]^T @ input`` of the whole product, equal up to the BLAS's summation order:
bitwise with torch's CPU BLAS here for chunks of at least :data:`MIN_CHUNK_ROWS` rows (fewer rows
take a matrix-vector path); a GPU BLAS may sum in another order. An Embedding chunk is torch's own
``embedding_dense_backward`` over the tokens whose ids fall in its rows (bitwise on the CPU, bf16
included). The input gradient of a Linear is computed before its weight moves; biases keep the
ordinary release hook. Activation checkpointing (reentrant or not) is chunked too: a forward
recomputed inside a backward belongs to that backward's graph.

Where the whole gradient is used instead (correct, not chunked, for that backward): a module
called more than once in one graph (a shared layer; found at the second call, the earlier calls
are switched too), a Linear forward under an autocast to another dtype than the weight's
(autocast to the weight's own dtype, e.g. bf16 weights under bf16 autocast, casts nothing and is
chunked) or with an input of another dtype, a parameter whose settings stop allowing it (e.g.
``percentile_clipping`` set later by an override). A backward that does not accumulate the
weight's gradient (``torch.autograd.grad(loss, inputs)``) computes no weight gradient and steps
nothing, as the ordinary release hook does.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dist8.kernels.eager import eager_only
from dist8.optim.range_step import RangeStep, range_step_refusal

if TYPE_CHECKING:
    from dist8.optim.release import GradientRelease

__all__ = ["ChunkedWeights", "MIN_CHUNK_ROWS", "chunk_rows", "current_graph_task"]

# Says whether the running backward will execute a graph node (here: the weight's
# AccumulateGrad); used by torch's own multi-grad hooks. Absent in some build: assume it will.
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
# current_graph_task(): the id of the backward running on this thread (-1 outside one, or where torch does not
# say). A forward run inside a backward is activation checkpointing's recompute and belongs to that backward's
# graph, not to the outer one.
current_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)

# Fewer rows make the BLAS take a matrix-vector path whose sums differ from the whole product's
# (1-2 row fp32 chunks were 1 ulp off on this CPU's oneDNN); 8 rows and up matched bitwise.
MIN_CHUNK_ROWS = 8

_USE_ATTR = "dist8_chunked_grad"  # the patched module's bookkeeping (_ModuleUse)


def chunk_rows(out_features: int, in_features: int, block_size: int, chunk_numel: int) -> int:
    """Rows of a ``[out_features, in_features]`` weight per chunk: whole quantization blocks of
    ``block_size`` elements, about ``chunk_numel`` elements, and at least :data:`MIN_CHUNK_ROWS` rows
    (rounded up to whole blocks)."""
    unit = block_size // math.gcd(in_features, block_size)  # rows whose elements fill whole blocks
    least = unit * -(-MIN_CHUNK_ROWS // unit)
    rows = max(least, chunk_numel // in_features // unit * unit)
    return min(out_features, rows)


class _ModuleUse:
    """Bookkeeping of one patched module: which of its graph nodes still wait for backward."""

    def __init__(self, owner: ChunkedWeights, module: torch.nn.Module, name: str) -> None:
        self.owner = owner
        self.module = module
        self.name = name
        self.param = module.weight  # the optimizer's parameter; another tensor there computes plainly
        self.pending: list[tuple[weakref.ref, int]] = []  # (forward's node, graph task it ran in)

    # A copy of a patched module (copy.deepcopy, pickle / torch.save) gets None here and computes
    # like a plain module: its weight is not in the handle's optimizer.
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return _none, ()

    def started(self, ctx: Any) -> None:
        """A forward in a graph (``ctx``: its node, which gets ``use``, ``done`` and ``chunked``): chunk
        only if no other forward of this module in the same graph (same running backward, or none)
        waits for backward."""
        task = current_graph_task()
        ctx.use = self
        self.pending = [(r, t) for r, t in self.pending if (c := r()) is not None and not c.done]
        ctx.done = False
        ctx.chunked = True
        for r, t in self.pending:  # a shared layer: every use of this graph returns its whole gradient
            c = r()
            if t == task and c is not None:
                c.chunked = ctx.chunked = False
        self.pending.append((weakref.ref(ctx), task))


class _ChunkedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use: _ModuleUse) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
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
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = ctx.use.owner.weight_grad(ctx.use, bool(ctx.chunked), lambda r0, r1: go[:, r0:r1].t().mm(xs),
                                               lambda: go.t().mm(xs))
        return grad_x, grad_w, grad_b, None


class _ChunkedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, use: _ModuleUse) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.num_weights = padding_idx, weight.shape[0]
        use.started(ctx)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        ctx.done = True
        (ids,) = ctx.saved_tensors
        ids = ids.reshape(-1)
        go = grad_out.reshape(ids.numel(), -1)
        pad = -1 if ctx.padding_idx is None else ctx.padding_idx

        def rows(r0: int, r1: int) -> torch.Tensor:  # torch's own backward over the tokens of these rows
            sel = ((ids >= r0) & (ids < r1)).nonzero().squeeze(1)
            return torch.ops.aten.embedding_dense_backward(go[sel], ids[sel] - r0, r1 - r0,
                                                           pad - r0 if r0 <= pad < r1 else -1, False)

        grad_w = ctx.use.owner.weight_grad(
            ctx.use, bool(ctx.chunked), rows,
            lambda: torch.ops.aten.embedding_dense_backward(go, ids, ctx.num_weights, pad, False))
        return None, grad_w, None, None


class ChunkedWeights:
    """The modules whose weights a :class:`~dist8.optim.release.GradientRelease` steps in chunks.

    Attributes:
        chunked: names of the ``nn.Linear``/``nn.Embedding`` modules whose weight gradients are chunked.
        unchunked: ``{name: reason}`` of the other plain ``nn.Linear``/``nn.Embedding`` modules (left
            to the whole-gradient hook).
        chunk_numel: elements per chunk asked for (rounded to whole blocks per module).
    """

    def __init__(self, release: GradientRelease, model: torch.nn.Module, chunk_numel: int) -> None:
        self.release = release
        self.chunk_numel = chunk_numel
        self.chunked: list[str] = []
        self.unchunked: dict[str, str] = {}
        self._patched: list[tuple[torch.nn.Module, str]] = []  # (module, the method replaced)
        self._weights: dict[str, torch.Tensor] = {}  # name -> weight of a module left unchunked as _FROZEN
        opt = release.optimizer
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        for name, module in model.named_modules():
            # Exact types (subclasses such as LoRA or quantized layers compute their own way), and
            # Embedding subclasses that get their rows through a ``lookup(input)`` method (dist8's
            # StableEmbedding): that method is replaced instead of ``forward``.
            attr = "forward"
            if type(module) is torch.nn.Linear:
                forward = _released_linear_forward
            elif type(module) is torch.nn.Embedding:
                forward = _released_embedding_forward
            elif isinstance(module, torch.nn.Embedding) and callable(getattr(type(module), "lookup", None)):
                forward, attr = _released_embedding_forward, "lookup"
            else:
                continue
            w = module.weight
            reason = None
            if not w.requires_grad or id(w) not in in_opt:
                reason = _FROZEN
                self._weights[name] = w
            elif uses.get(id(w), 0) > 1:
                reason = "its weight is shared with another module (tied)"
            elif attr in module.__dict__:
                reason = f"its {attr} is already replaced (e.g. by accelerate's hooks)"
            elif isinstance(module, torch.nn.Embedding) and (module.sparse or module.scale_grad_by_freq
                                                             or module.max_norm is not None):
                reason = "sparse, scale_grad_by_freq or max_norm embeddings keep torch's backward"
            else:
                reason = range_step_refusal(opt, w)
            if reason is not None:
                self.unchunked[name] = reason
                continue
            # a partial of a module-level function, not a bound method: it pickles and deep-copies
            setattr(module, attr, functools.partial(forward, module))
            setattr(module, _USE_ATTR, _ModuleUse(self, module, name))
            self._patched.append((module, attr))
            self.chunked.append(name)

    def became_trainable(self, params: list[torch.Tensor]) -> None:
        """Record why the modules of ``params`` (weights unfrozen or added to the optimizer after the
        release) stay unchunked: their hooks step them whole."""
        ids = {id(p) for p in params}
        for name, reason in list(self.unchunked.items()):
            if reason == _FROZEN and id(self._weights.get(name)) in ids:
                self.unchunked[name] = "its weight became trainable after gradient_release: stepped whole"

    def grad_numel(self, p: torch.Tensor) -> int:
        """Elements of ``p``'s gradient alive at once: one chunk for a chunked weight, else all of it."""
        for module, _ in self._patched:
            if module.weight is p:
                opt = self.release.optimizer
                block = opt.settings(p, opt.group_of(p)).block_size
                return chunk_rows(p.shape[0], p.shape[1], block, self.chunk_numel) * p.shape[1]
        return p.numel()

    def remove(self) -> None:
        """Give every patched module its own forward back."""
        for module, attr in self._patched:
            module.__dict__.pop(attr, None)
            module.__dict__.pop(_USE_ATTR, None)
        self._patched.clear()

    @eager_only  # inside a compiled step's backward dynamo would trace the update (as the release hook's)
    def weight_grad(self, use: _ModuleUse, chunked: bool, rows: Callable[[int, int], torch.Tensor],
                    whole: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """Step ``use``'s weight chunk by chunk (``rows(r0, r1)``: the gradient of rows ``[r0, r1)``)
        and return None, or return its whole gradient (``whole()``)."""
        w = use.param
        if _will_execute is not None:
            with torch.enable_grad():
                accumulate = w.view_as(w).grad_fn.next_functions[0][0]
            if not _will_execute(accumulate):  # e.g. torch.autograd.grad(loss, inputs): no weight gradient wanted
                return None
        release = self.release
        if not (chunked and release.active) or range_step_refusal(release.optimizer, w) is not None:
            return whole()
        with release.lock:
            release.before_update(w)
            step = RangeStep(release.optimizer, w)
            out_features, in_features = w.shape
            n = chunk_rows(out_features, in_features, step.block_size, self.chunk_numel)
            for r0 in range(0, out_features, n):
                step.update(r0 * in_features, rows(r0, min(r0 + n, out_features)))
            step.finish()
            release.after_update(w)
            release.chunk_stepped_in[w] = current_graph_task()
        return None


_FROZEN = "its weight is frozen or not in the optimizer"


def _none() -> None:
    return None


def _use_of(module: torch.nn.Module) -> _ModuleUse | None:
    """The module's bookkeeping while chunked, else None (a copy, or a removed handle)."""
    use = module.__dict__.get(_USE_ATTR)
    # module.weight is not the parameter when torch.func.functional_call swapped it in, or when
    # user code replaced it: that tensor is not in the optimizer, autograd computes its gradient
    return use if use is not None and use.owner.release.active and module.weight is use.param else None


def _released_linear_forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` whose backward steps the weight in chunks (see the module docstring)."""
    device = input.device.type
    use = _use_of(self)
    if (use is None or not torch.is_grad_enabled() or not self.weight.requires_grad or input.dtype != self.weight.dtype
            or (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != self.weight.dtype)):
        return F.linear(input, self.weight, self.bias)  # autocast would cast: autograd's own backward
    return _ChunkedLinear.apply(input, self.weight, self.bias, use)


def _released_embedding_forward(self: torch.nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    """``nn.Embedding.forward`` (or a subclass's ``lookup``) whose backward steps the weight in chunks."""
    use = _use_of(self)
    if use is None or not torch.is_grad_enabled() or not self.weight.requires_grad:
        return F.embedding(input, self.weight, self.padding_idx)
    return _ChunkedEmbedding.apply(input, self.weight, self.padding_idx, use)
