"""Gradient release: each parameter is stepped inside backward as soon as its gradient is ready.

(One file, one concern: the hooks' lifetime -- checks, install, step, surviving swaps, removal.)

``handle = dist8.gradient_release(model, optimizer)`` registers a
``register_post_accumulate_grad_hook`` on every trainable parameter. When a
parameter's gradient is complete, the hook runs the optimizer's update for that
parameter alone and sets ``param.grad = None`` at once, so at most one
parameter's gradient (plus autograd's in-flight buffers) is alive at any time
instead of all of them: the gradient term drops out of bytes per parameter.
While the handle is active ``optimizer.step()`` updates nothing (a training loop
written for the normal step keeps working, and cannot step twice) but runs the
optimizer's step hooks, and ``optimizer.zero_grad()`` only clears what a failed
backward left; ``handle.remove()`` restores both.

Exactness. Every dist8 update rule is per parameter: the moments, bias
corrections, percentile clipping (a per-parameter gradient-norm history),
non-finite skipping and the LAMB/LARS trust ratios (norms of one parameter)
depend only on that parameter's gradient and state. Stepping parameter by
parameter is therefore bitwise the same as one ``optimizer.step()`` over all
of them (``tests/test_gradient_release.py`` holds every rule to it).

FSDP2 (``fully_shard``). FSDP2 runs the post-accumulate-grad hooks of the
sharded parameter right after its reduce-scatter, with the averaged local
shard as ``grad``: the hook steps the local shard (collectives for edge blocks
and partial sums run in hook order, the same on every rank) and frees it.

What is refused, and why:

* ``dist8.ShardedOptimizer``: stage 2 keeps flat gradient buffers of the
  whole model on every rank, so releasing parameters frees nothing; use the
  dist8 optimizer directly with FSDP2 instead.
* ``DistributedDataParallel`` models: the hooks would step with the local,
  not yet averaged gradient. A model wrapped in DDP *after* ``gradient_release`` is refused
  at its first forward under DDP (the forward pre-hook sees DDP's forward running, through
  torch's private ``DistributedDataParallel._active_ddp_module``), before any backward.
* ``torch.amp.GradScaler``: the hooks would step with scaled gradients before
  the scaler has checked them. Detected at ``scaler.step(optimizer)`` (which
  raises); by then one backward has updated the parameters, so use bf16
  autocast (no scaler) with gradient release. An optimizer with
  ``amp_unscale="scaler"`` is refused at once: the scaler would not tell its step.
* Gradient accumulation: there is no gradient left to accumulate. If the loop
  calls ``optimizer.step()`` (a no-op now), a second backward before it raises
  before touching anything; ``optimizer.step()`` after several backward passes
  raises too. A loop that never calls ``step()`` cannot be told apart.
* Reentrant activation checkpointing (``use_reentrant=True``) of a module run more than once
  per forward: each reentrant checkpoint runs a backward of its own, so that module's
  parameters get a partial gradient from each. The second is refused (a forward pre-hook on
  the model counts its forward passes), but the first has been stepped by then; a model
  that is never called itself (only its submodules) is not counted, and the refusal then
  comes from ``optimizer.step()``. The default ``use_reentrant=False`` accumulates first and is exact.
* Parameters that become trainable later (``add_param_group``, ``requires_grad_(True)``) are hooked
  at the next forward of the model, or stepped by the no-op ``optimizer.step()`` if they got a
  gradient first (a model never called itself); they stay unchunked under ``weight_grad_chunk``.
* ``on_nonfinite="raise"``: parameters are updated one at a time inside backward, so a raise at
  one of them cannot leave the step undone (the others are stepped already). Refused at
  ``gradient_release``, and at the next update if set afterwards; the default ``"skip"`` skips per
  block, ``"skip_param"`` per parameter.
* ``zero_grad``: each step is that of a loop calling ``zero_grad(set_to_none=True)``. It clears only
  what an exception from backward left: the gradients not stepped yet (as torch's ``zero_grad``) and
  the updates counted towards the next ``optimizer.step()``, so a loop that catches the exception goes on.
  With ``set_to_none=False`` the normal step also steps a parameter that got no gradient this step
  (a zero gradient: momentum and weight decay go on); released, it has no gradient and is not stepped.
* Optimizer step hooks (``register_step_pre_hook``/``post_hook``, and torch's global ones) run at
  ``optimizer.step()`` as torch runs them: pre hooks at its start, post hooks at its end, when every
  parameter has been stepped (an EMA of the weights is right). A pre hook can no longer change the
  update, which happened in backward: warned once per optimizer.
  LR schedulers work (they change ``param_groups``, which each hook reads), made before or after
  ``gradient_release`` (no warning that ``optimizer.step`` was overridden either way).
* ``torch.compile`` of a training step that calls ``backward()``: the hooks, the chunked weight steps
  and ``optimizer.step``/``zero_grad`` run eagerly (graph breaks), as the optimizer's own ``step`` does.
* A global ``torch.nn.utils.clip_grad_norm_`` over all parameters: it runs
  after backward, when every gradient is already released (it sees none and
  returns 0). This cannot be detected from here. Use ``max_grad_norm_per_param``
  (clips each parameter's gradient to that norm before its step) or the
  optimizer's ``percentile_clipping``, both per parameter.
"""
from __future__ import annotations

import functools
import itertools
import numbers
import threading
import types
import warnings
import weakref
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer  # the global step hooks' registries

from dist8.kernels.eager import eager_only
from dist8.messages import brief
from dist8.optim.base import Optimizer8bit
from dist8.optim.range_step import optimizer_range_refusal
from dist8.optim.chunked_grads import ChunkedWeights, current_graph_task
from dist8.optim.config import hyperparameters_of
from dist8.optim.contract import as_scheduler_wrapped
from dist8.optim.dcp_init import called_by_dcp_init
from dist8.optim.settings_watch import SettingsWatch

__all__ = ["GradientRelease", "check_nonfinite_mode", "gradient_release"]

_ACTIVE_ATTR = "_dist8_gradient_release"
# id(parameter) -> the active handle whose hook steps it. Not keyed by the tensor: a weak reference to a
# parameter makes torch.utils.swap_tensors refuse it (Module.to / to_empty on FSDP2 models). The handle is
# held weakly (its hooks on the parameter keep it alive), and _released_by checks that it holds the parameter.
_RELEASED_BY: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# Optimizers already warned that their step pre hooks run after the update (once per optimizer).
_WARNED_PRE_HOOKS: weakref.WeakSet = weakref.WeakSet()


def _impl_of(p: torch.Tensor) -> int | None:
    """The address of ``p``'s C++ tensor, which swap_tensors changes (None if torch stops exposing it:
    the hooks are then installed again at every forward)."""
    return getattr(p, "_cdata", None)


def _released_by(p: torch.Tensor) -> GradientRelease | None:
    handle = _RELEASED_BY.get(id(p))
    if handle is None or not any(q is p for g in handle.optimizer.param_groups for q in g["params"]):
        return None  # an id reused by another tensor
    return handle


class GradientRelease:
    """Handle returned by :func:`gradient_release`; ``remove()`` (or leaving a ``with`` block) undoes it.

    Users call ``dist8.gradient_release(model, optimizer, ...)``, which checks the arguments, makes
    the handle and installs its hooks; constructing one directly checks and installs nothing.
    The arguments are :func:`gradient_release`'s:

    Args:
        model: the module whose parameters ``optimizer`` updates.
        optimizer: the dist8 optimizer (:class:`dist8.optim.Optimizer8bit`; a client's wrapper
            already unwrapped) whose ``step`` updates nothing while the handle is active.
        max_grad_norm_per_param: clip each parameter's gradient to this L2 norm before its
            step, or None (off).
        weight_grad_chunk: elements per row chunk of the weight gradients of plain ``nn.Linear``
            and ``nn.Embedding`` modules, stepped chunk by chunk, or None (off). Default None.

    Attributes:
        steps: parameter updates run so far (one per parameter per backward), by the hooks or,
            with ``weight_grad_chunk``, by a Linear's or Embedding's backward chunk by chunk.
        chunks: the :class:`~dist8.optim.chunked_grads.ChunkedWeights` of ``weight_grad_chunk``
            (``.chunked``: module names, ``.unchunked``: ``{name: reason}``), or None.
        lock: held while a parameter is updated (autograd may run leaves on several threads).
    """

    def __init__(self, model: torch.nn.Module, optimizer: Optimizer8bit, max_grad_norm_per_param: float | None,
                 weight_grad_chunk: int | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm_per_param = max_grad_norm_per_param
        self.weight_grad_chunk = weight_grad_chunk
        self.chunks: ChunkedWeights | None = None
        self.steps = 0
        self.lock = threading.Lock()  # CUDA and CPU leaves may finish on different autograd threads
        self._updates_since_step: dict[torch.Tensor, int] = {}
        self._loop_calls_step = False
        # Forward passes of the model seen by a forward pre-hook, and the one each parameter was last
        # updated in: a second update within one forward is a partial gradient (see before_update).
        self._forwards = 0
        self._updated_in_forward: dict[torch.Tensor, int] = {}
        # weight -> the backward (graph task id) whose layer stepped it in chunks (weight_grad_chunk)
        self.chunk_stepped_in: dict[torch.Tensor, int] = {}
        self._hooks: list = []
        # [parameter, its hook's RemovableHandle, its C++ tensor when hooked (_impl_of)]; each entry holds
        # its parameter, so an id in _hooked_ids is not reused by another tensor while hooked
        self._param_hooks: list[list] = []
        self._hooked_ids: set[int] = set()
        self._saved_methods: dict[str, Any] = {}
        self._ddp_checked: weakref.WeakSet = weakref.WeakSet()  # DDP modules found not to reduce our parameters
        self._settings_watch = SettingsWatch()  # settings the state was last found to fit (_refuse_unfit_states)
        self.active = False

    # ---- install / remove -------------------------------------------------------------
    def _install(self) -> None:
        opt = self.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._hook_param(p)
        for name in ("step", "zero_grad"):
            if name in opt.__dict__:  # e.g. an LR scheduler's step counter wrapper
                self._saved_methods[name] = opt.__dict__[name]
        # Bound to the optimizer (not to this handle): torch's LR schedulers re-bind ``step.__func__``
        # to the optimizer when they wrap it.
        scheduled = getattr(self._saved_methods.get("step"), "_wrapped_by_lr_sched", False)
        opt.step = as_scheduler_wrapped(opt, _released_step) if scheduled else types.MethodType(_released_step, opt)
        opt.zero_grad = types.MethodType(_released_zero_grad, opt)
        setattr(opt, _ACTIVE_ATTR, self)
        # first among the model's pre-hooks: a refusal there comes before FSDP2's unshard (raised after it,
        # it left the model's parameters unsharded plain tensors)
        self._hooks.append(self.model.register_forward_pre_hook(_forward_counter(self), prepend=True))
        self.active = True
        if self.weight_grad_chunk is not None:
            self.chunks = ChunkedWeights(self, self.model, self.weight_grad_chunk)

    def remove(self) -> None:
        """Remove the hooks and give ``optimizer.step``/``zero_grad`` back their normal behaviour."""
        if not self.active:
            return
        if self.chunks is not None:
            self.chunks.remove()
        for h in [*self._hooks, *(entry[1] for entry in self._param_hooks)]:
            h.remove()
        self._hooks.clear()
        self._param_hooks.clear()
        self._hooked_ids.clear()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if _RELEASED_BY.get(id(p)) is self:
                    del _RELEASED_BY[id(p)]
        opt = self.optimizer
        for name in ("step", "zero_grad"):
            if name in self._saved_methods:
                setattr(opt, name, self._saved_methods[name])
            else:
                opt.__dict__.pop(name, None)
        opt.__dict__.pop(_ACTIVE_ATTR, None)
        self.active = False

    def __enter__(self) -> GradientRelease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def forward_started(self) -> None:
        """Count a forward pass of the model (its forward pre-hook)."""
        with self.lock:
            self._refuse_ddp_forward()
            self._forwards += 1
            self._hook_swapped_params()
            self._hook_new_params()
            self._refuse_bad_groups()
            self._refuse_unfit_states()

    def _refuse_ddp_forward(self) -> None:
        """Refuse a forward inside DistributedDataParallel whose gradients DDP averages: the model was
        wrapped after ``gradient_release``, so the hooks would step with each rank's local gradient and
        the ranks' weights would drift apart, silently. Raised in the forward, before any of it is stepped."""
        ddp = getattr(torch.nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if ddp is None or ddp in self._ddp_checked:
            return
        ignored = set(getattr(ddp, "parameters_to_ignore", ()))
        reduced = {id(p) for name, p in ddp.module.named_parameters() if name not in ignored and p.requires_grad}
        names = {id(p): name for name, p in self.model.named_parameters()}
        for entry in self._param_hooks:
            if id(entry[0]) in reduced:
                raise RuntimeError(
                    f"gradient_release: the model runs inside DistributedDataParallel, which averages the gradient "
                    f"of parameter {names.get(id(entry[0]), self.optimizer.param_name(entry[0]))} after backward; the hooks would step with "
                    "each rank's local gradient and the ranks would drift apart. Nothing was stepped. Use FSDP2 "
                    "(fully_shard) for gradient release across ranks, or remove() the handle to train with DDP")
        self._ddp_checked.add(ddp)

    def _refuse_bad_groups(self) -> None:
        """Refuse, in the forward, a param-group value edited to one the step refuses (``lr = -1``, one beta):
        the backward's hooks refused it at that group's first parameter, with the parameters of other groups
        before it in backward order stepped. One dict comparison per group when nothing changed
        (:meth:`Optimizer8bit.check_changed_group`)."""
        for group in self.optimizer.param_groups:
            self.optimizer.check_changed_group(group, hyperparameters_of(group))

    def _refuse_unfit_states(self) -> None:
        """Refuse, in the forward, a settings change the state cannot follow (``optim_bits`` or percentile
        clipping set after the first step): the backward's hooks refused it at that parameter, with the
        parameters before it in backward order stepped. Checked when a mark or a group value the state
        depends on changed (:class:`~dist8.optim.settings_watch.SettingsWatch`): one look per forward."""
        # the parameters the hooks can step: a frozen one's state is checked when it is trainable again (the
        # watch sees another list), as the plain step checks a parameter when it has a gradient
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if self._settings_watch.changed(params, self.optimizer.param_groups):
            self.optimizer.check_states_fit(params)
            self._settings_watch.accept()

    def _hook_swapped_params(self) -> None:
        """Hook again a parameter whose hook a swap took away. torch.utils.swap_tensors (Module.to /
        to_empty / cuda on FSDP2 models, any module under set_swap_module_params_on_conversion) keeps the
        parameter object and its Python hook dict, but gives it another C++ tensor, which has no hook:
        the parameter would silently stop being stepped, opt.step() being a no-op. Assigning the dict
        again installs it on the new tensor. One comparison per parameter and forward."""
        for entry in self._param_hooks:
            p, impl = entry[0], _impl_of(entry[0])
            if impl is None or impl != entry[2]:
                p._post_accumulate_grad_hooks = p._post_accumulate_grad_hooks
                entry[2] = impl

    def _hook_param(self, p: torch.Tensor) -> None:
        self._param_hooks.append([p, p.register_post_accumulate_grad_hook(self._hook), _impl_of(p)])
        self._hooked_ids.add(id(p))
        _RELEASED_BY[id(p)] = self

    def _hook_new_params(self) -> None:
        """Hook a parameter that became trainable after the release was installed: added with
        ``add_param_group`` (Lightning's ``BackboneFinetuning``) or unfrozen (``requires_grad_(True)``).
        Unhooked, it was never stepped (``optimizer.step()`` is a no-op) and its gradient grew, silently.
        Checked as :func:`gradient_release` checks the parameters it hooks. One set lookup per parameter
        and forward (and per ``optimizer.step()``, for a model that is never called itself)."""
        new = [p for group in self.optimizer.param_groups for p in group["params"]
               if p.requires_grad and id(p) not in self._hooked_ids]
        if not new:
            return
        # A gradient it holds already (it got gradients before it was added) is summed with the next one
        # and stepped by its hook, as the normal step would step the sum. Not checked against the model's
        # parameters: inside FSDP2's forward those are the unsharded tensors, not the optimizer's shards.
        check_releasable(None, self.optimizer, new, "it became trainable after gradient_release (added "
                         "to the optimizer or unfrozen) and ", gradient_ok=True)
        for p in new:
            self._hook_param(p)
        if self.chunks is not None:  # stepped whole by its hook, not in chunks
            self.chunks.became_trainable(new)

    # ---- the hook ------------------------------------------------------------------------
    @eager_only  # inside a compiled step's backward dynamo traced the update and lost optimizer state
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:  # none, or stepped in chunks by its layer's backward (weight_grad_chunk)
            return
        with self.lock:
            self.before_update(p)
            if self.max_grad_norm_per_param is not None:
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm_per_param)
            self.step_param(p)
            self.after_update(p)
            p.grad = None  # released: the point of it all

    def before_update(self, p: torch.Tensor) -> None:
        """Refuse a second update of ``p`` from one forward pass of the model, or before ``optimizer.step()``
        (gradient accumulation), and ``on_nonfinite="raise"`` set after the release. Hold :attr:`lock`."""
        check_nonfinite_mode(self.optimizer)
        task = current_graph_task()
        if task != -1 and self.chunk_stepped_in.get(p) == task:
            # its layer stepped it in chunks from the layer's share alone; this is the rest of its gradient
            raise RuntimeError(
                f"gradient_release: parameter {self.optimizer.param_name(p)} is also used outside its own layer "
                "(e.g. F.linear(h, emb.weight) for a tied head, or a loss term on the weight), and weight_grad_chunk "
                "stepped it from the layer's share of its gradient alone; the rest was not stepped. Tie weights "
                "through modules (head.weight = emb.weight), or gradient_release without weight_grad_chunk")
        if self._forwards and self._updated_in_forward.get(p) == self._forwards:
            raise RuntimeError(
                f"gradient_release: parameter {self.optimizer.param_name(p)} got a second gradient from one forward "
                "pass of the model (reentrant activation checkpointing, use_reentrant=True, of a module run more than "
                "once: each checkpoint's backward brings a partial gradient; or several backward passes of one "
                "forward); the first was stepped, this one was not. Use use_reentrant=False, or remove the handle"
            )
        if self._loop_calls_step and self._updates_since_step.get(p, 0) > 0:
            raise RuntimeError(
                f"gradient_release: parameter {self.optimizer.param_name(p)} got a second gradient before "
                "optimizer.step(); gradient accumulation is incompatible with gradient release (each backward "
                "is a step); this parameter was not updated again. Remove the handle to accumulate"
            )

    def after_update(self, p: torch.Tensor) -> None:
        """Count an update of ``p`` (by the hook or by its layer's chunks). Hold :attr:`lock`."""
        self._updates_since_step[p] = self._updates_since_step.get(p, 0) + 1
        self._updated_in_forward[p] = self._forwards
        self.steps += 1

    def step_param(self, p: torch.Tensor) -> None:
        """Run the optimizer's update for ``p`` alone (:meth:`Optimizer8bit.step_params`).

        The optimizer's step hooks do not run here, once per parameter, but once per step at
        ``optimizer.step()`` (:meth:`step_with_hooks`).
        """
        self.optimizer.step_params([p])

    # ---- what optimizer.step() and zero_grad() do while active ------------------------------
    @eager_only  # host-side bookkeeping and user hooks, as the optimizer's own step
    def step_with_hooks(self, args: tuple, kwargs: dict) -> Any:
        """``optimizer.step(*args, **kwargs)`` while active: :meth:`released_step` between the optimizer's step
        hooks and torch's global ones, run as torch's step wrapper runs them (a pre hook may return new
        ``(args, kwargs)``; ``args`` start with the optimizer). The post hooks run when every parameter has
        been stepped (by the hooks in backward), what an EMA of the weights needs. A pre hook runs after
        the update, so it cannot change it: warned once per optimizer."""
        opt = self.optimizer
        args = (opt, *args)
        # torch's registries (private names: were they to change, the hooks would not run, as before)
        pre = [*getattr(torch_optimizer, "_global_optimizer_pre_hooks", {}).values(),
               *getattr(opt, "_optimizer_step_pre_hooks", {}).values()]
        if pre and opt not in _WARNED_PRE_HOOKS:
            _WARNED_PRE_HOOKS.add(opt)
            warnings.warn("gradient_release: optimizer step pre hooks run at optimizer.step(), after the parameters "
                          "were updated inside backward, so they cannot change the update; use a post hook, or "
                          "remove() the handle", stacklevel=4)
        for hook in pre:
            result = hook(opt, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"optimizer step pre hook {hook} must return None or a tuple of "
                                       f"(new_args, new_kwargs), but got {brief(result)}")
                args, kwargs = result
        out = self.released_step(*args[1:], **kwargs)
        for hook in [*getattr(opt, "_optimizer_step_post_hooks", {}).values(),
                     *getattr(torch_optimizer, "_global_optimizer_post_hooks", {}).values()]:
            hook(opt, args, kwargs)
        return out

    @eager_only  # as torch's own zero_grad
    def released_zero_grad(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad()`` while active. After a complete backward there is nothing to clear; after
        an exception from backward, the gradients not stepped yet are cleared (torch's ``zero_grad``) and
        the updates counted towards the next ``optimizer.step()`` are forgotten, so that a loop catching
        the exception goes on (the next backward is not taken for gradient accumulation)."""
        with self.lock:
            self._updates_since_step.clear()
        saved = self._saved_methods.get("zero_grad")
        if saved is not None:
            saved(set_to_none)
        else:
            type(self.optimizer).zero_grad(self.optimizer, set_to_none)  # the class's: imports no dynamo

    def released_step(self, closure: Any = None) -> Any:
        """``optimizer.step()`` while active: no update (the hooks did them); refuses GradScaler and accumulation."""
        if getattr(self.optimizer, "found_inf", None) is not None:
            raise RuntimeError(
                "gradient_release is incompatible with torch.amp.GradScaler: the parameters were stepped inside "
                "backward with scaled, unchecked gradients. Use bf16 autocast without a scaler, or remove the "
                "gradient_release handle"
            )
        repeated = [self.optimizer.param_name(p) for p, n in self._updates_since_step.items() if n > 1]
        self._updates_since_step.clear()
        # the next backward is a new step even where the model itself is not called again (a loop over its
        # submodules after one model() call): its updates are no second gradient of that one forward
        self._updated_in_forward.clear()
        self._loop_calls_step = True
        if repeated:
            raise RuntimeError(
                f"gradient_release: parameters ({', '.join(repeated[:3])}{', ...' if len(repeated) > 3 else ''}) "
                "were updated by several backward passes since the last optimizer.step(); gradient accumulation "
                "is incompatible with gradient release (each backward is a step)"
            )
        with self.lock:
            # A gradient still here was not stepped by a hook: a parameter that became trainable after the
            # release and got one before any forward of the model hooked it (a model never called itself), or
            # one set by hand -- torch's DCP builds the state template it loads into so (get/set_optimizer_
            # state_dict on an optimizer without state: zero gradients, lr 0, optimizer.step()); left alone,
            # a resume under gradient release loaded no optimizer state, silently. Stepped here, as the
            # normal step would. The same parameters in the same order on every rank (FSDP2: collective).
            late = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            # DCP's lr=0 step (only ever on an optimizer without state) would count (dist8.optim.dcp_init): state only
            if late and not self.optimizer.state and called_by_dcp_init():
                self.optimizer.make_fresh_state(late)
                for p in late:
                    p.grad = None
                late = []
            if late:
                self.optimizer.step_params(late)
                self.steps += len(late)  # stepped at this optimizer.step(): nothing counted towards the next
                for p in late:
                    p.grad = None
            self._hook_new_params()
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None


# The model's forward pre-hook reaches its handle through a token, so that copies of the model
# (copy.deepcopy, torch.save) carry a plain picklable partial, not the handle and its lock.
_TOKENS = itertools.count()
_HANDLES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _forward_counter(handle: GradientRelease) -> Any:
    token = next(_TOKENS)
    _HANDLES[token] = handle
    return functools.partial(_count_forward, token)


def _count_forward(token: int, module: torch.nn.Module, args: Any) -> None:  # noqa: ARG001
    handle = _HANDLES.get(token)
    if handle is not None and handle.model is module:  # a copy of the model is not the model
        handle.forward_started()


def _released_step(opt: Optimizer8bit, *args: Any, **kwargs: Any) -> Any:
    return getattr(opt, _ACTIVE_ATTR).step_with_hooks(args, kwargs)


def _released_zero_grad(opt: Optimizer8bit, set_to_none: bool = True) -> None:
    getattr(opt, _ACTIVE_ATTR).released_zero_grad(set_to_none)


def gradient_release(
    model: torch.nn.Module, optimizer: Optimizer8bit, *, max_grad_norm_per_param: float | None = None,
    weight_grad_chunk: int | None = None,
) -> GradientRelease:
    """Step each parameter inside backward as soon as its gradient is ready, and free the gradient.

    Args:
        model: the module whose parameters ``optimizer`` updates (plain or FSDP2 ``fully_shard``).
        optimizer: a dist8 optimizer (:class:`dist8.optim.Optimizer8bit`) over the model's parameters,
            or a client's wrapper of one that keeps it as ``.optimizer`` (accelerate's
            ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``): the release goes on the
            wrapped optimizer, whose no-op ``step()`` the wrapper's calls.
        max_grad_norm_per_param: if set, clip each parameter's gradient to this L2 norm
            before its step (the per-parameter replacement of a global
            ``clip_grad_norm_``, which gradient release cannot support). Default None (off).
        weight_grad_chunk: if set (elements, e.g. 262144), every plain ``nn.Linear`` and
            ``nn.Embedding`` of the model computes its weight gradient in row chunks of about this
            many elements (whole quantization blocks) inside its backward and steps each chunk at
            once, so no layer's weight gradient exists whole (:mod:`dist8.optim.chunked_grads`;
            bitwise the same step). ``handle.chunks.chunked`` names those modules, ``handle.chunks.unchunked``
            the others with the reason. Not with LAMB/LARS, ``on_nonfinite="skip_param"``/
            ``"raise"``, ``max_grad_norm_per_param`` or FSDP2. Default None (off).

    Returns:
        A :class:`GradientRelease` handle; ``handle.remove()`` undoes everything.
        While active, ``optimizer.step()`` updates nothing but runs the step hooks, and
        ``optimizer.zero_grad()`` only clears what an exception from backward left.

    Raises a one-line error for: an optimizer that is not a dist8 optimizer
    (``ShardedOptimizer`` named), a ``DistributedDataParallel`` model (or, at its first forward,
    a model wrapped in DDP afterwards), ``on_nonfinite="raise"``, an optimizer
    that already has gradient release, a parameter another optimizer's gradient release
    already steps, a parameter of the optimizer that is not in the model, a parameter
    that still holds a gradient, a bad clip value.
    """
    inner = getattr(optimizer, "optimizer", None)  # a client's wrapper (accelerate's AcceleratedOptimizer, ...)
    if not isinstance(optimizer, Optimizer8bit) and isinstance(inner, torch.optim.Optimizer):
        optimizer = inner  # its step() calls the wrapped optimizer's, which the release makes a no-op
    if type(optimizer).__name__ == "ShardedOptimizer":
        raise TypeError(
            "gradient_release does not support dist8.ShardedOptimizer: stage 2 keeps a flat gradient buffer of the "
            "whole model on every rank, so releasing gradients frees nothing. Use the dist8 optimizer directly with "
            "FSDP2 (fully_shard) for sharded gradient release"
        )
    if not isinstance(optimizer, Optimizer8bit):
        raise TypeError(f"gradient_release needs a dist8 optimizer (dist8.optim.Optimizer8bit), got {type(optimizer).__name__}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            "gradient_release does not support DistributedDataParallel: the hooks would step with the local gradient "
            "before DDP averages it. Use FSDP2 (fully_shard) with a dist8 optimizer"
        )
    if optimizer.amp_unscale == "scaler":
        raise ValueError(
            "gradient_release does not support amp_unscale='scaler': a GradScaler would unscale and check the "
            "gradients after the hooks had already stepped with them, unseen. Use bf16 autocast (no scaler) with "
            "the default amp_unscale='kernel'"
        )
    if getattr(optimizer, _ACTIVE_ATTR, None) is not None:
        raise RuntimeError("gradient_release is already active on this optimizer; remove() the first handle")
    if max_grad_norm_per_param is not None and (  # True passed as 1.0
        isinstance(max_grad_norm_per_param, bool)
        or not (isinstance(max_grad_norm_per_param, (int, float)) and max_grad_norm_per_param > 0)
    ):
        raise ValueError(f"max_grad_norm_per_param must be a number > 0 or None, got {brief(max_grad_norm_per_param)}")
    if weight_grad_chunk is not None:
        _check_weight_grad_chunk(optimizer, weight_grad_chunk, max_grad_norm_per_param)
    check_nonfinite_mode(optimizer)
    check_releasable(model, optimizer, [p for group in optimizer.param_groups for p in group["params"]])
    chunk = None if weight_grad_chunk is None else int(weight_grad_chunk)
    handle = GradientRelease(model, optimizer, max_grad_norm_per_param, chunk)
    handle._install()
    return handle


def check_nonfinite_mode(optimizer: Optimizer8bit) -> None:
    """Refuse ``on_nonfinite="raise"`` (ValueError naming it): gradient release updates the parameters one
    at a time inside backward, so a raise at one of them cannot leave the step undone."""
    if optimizer.on_nonfinite == "raise":
        raise ValueError(
            "gradient_release does not support on_nonfinite='raise': parameters are updated one at a time inside "
            "backward, so a raise cannot leave the step undone; use the default 'skip' (skips per quantization "
            "block) or 'skip_param' (skips the whole parameter)")


def check_releasable(model: torch.nn.Module | None, optimizer: Optimizer8bit, params: list[torch.Tensor],
                     why: str = "", gradient_ok: bool = False) -> None:
    """Refuse, naming it, a parameter of ``params`` that gradient release could not step: not in ``model``
    (None: not checked), already released by another optimizer's handle, or (unless ``gradient_ok``) holding a
    gradient. ``why`` prefixes the reason."""
    in_model = None if model is None else {id(p) for p in model.parameters()}
    for p in params:
        name = optimizer.param_name(p)
        if in_model is not None and id(p) not in in_model:
            raise ValueError(f"optimizer parameter {name} is not a parameter of the model; {why}gradient_release "
                             "hooks the model's parameters and could not step it")
        if _released_by(p) is not None:
            raise RuntimeError(
                f"parameter {name} is already released by another optimizer's gradient_release; {why}its hook "
                "steps the parameter and frees the gradient, so this optimizer would never see one; remove() that "
                "handle first")
        if p.grad is not None and not gradient_ok:
            raise RuntimeError(
                f"parameter {name} still holds a gradient; {why}its next gradient would be added to it and stepped: "
                "set its .grad to None first (optimizer.zero_grad(set_to_none=True) before gradient_release)")


def _check_weight_grad_chunk(optimizer: Optimizer8bit, chunk: Any, max_grad_norm_per_param: float | None) -> None:
    """ValueError naming ``weight_grad_chunk`` for a bad value or an optimizer setting that cannot chunk."""
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk <= 0:
        raise ValueError(f"weight_grad_chunk must be a number of elements > 0 or None, got {brief(chunk)}")
    if max_grad_norm_per_param is not None:
        raise ValueError("weight_grad_chunk cannot be combined with max_grad_norm_per_param: the clip needs the whole "
                         "gradient's norm before any chunk is stepped")
    refusal = optimizer_range_refusal(optimizer)  # LAMB/LARS, whole-gradient checks, FSDP2
    if refusal is not None:
        raise ValueError(f"weight_grad_chunk cannot be used with this optimizer: {refusal}")
