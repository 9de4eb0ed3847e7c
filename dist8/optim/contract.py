"""torch.optim.Optimizer's contract beyond the update, for :class:`dist8.optim.base.Optimizer8bit`.

What code written for any torch optimizer relies on and dist8's own state machinery would
otherwise break:

* copies: ``copy.deepcopy(opt)`` and pickling give an optimizer that steps identically
  (torch's ``__getstate__`` keeps only defaults, state and param_groups);
* parameters swapped into ``param_groups`` after construction (FSDP2 applied late, as
  accelerate and HF Trainer do): :meth:`TorchContract.follow_params`;
* non-contiguous parameters or gradients: a contiguous working copy, written back after the
  step (:meth:`TorchContract.working_copy`), so the contiguous path pays nothing;
* steps that never find a gradient, the mark of parameters replaced after construction (fully_shard
  applied late by hand): one warning (:meth:`TorchContract.notice_steps_without_gradients`);
* a ``step`` replaced on the instance after an LR scheduler wrapped it: :func:`as_scheduler_wrapped`.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from dist8.optim import dtensor
from dist8.optim.config import positional_name
from dist8.optim.dtensor_layout import is_dtensor
from dist8.optim.manager import merge_marks, restore_module_marks
from dist8.optim.positions import ParamPositions

__all__ = ["TorchContract", "as_scheduler_wrapped"]


def as_scheduler_wrapped(opt: torch.optim.Optimizer, step: Callable[[Any], Any]) -> Callable[..., Any]:
    """``step(opt, *args, **kwargs)`` as an instance's ``opt.step``, wrapped as torch's LR schedulers wrap it.

    For code that replaces ``opt.step`` after a scheduler was made on ``opt`` (HF Trainer and Lightning
    make theirs before any callback runs; DeepSpeed gets the optimizer after them). A scheduler wraps
    the step it found (its function, bound again at each call, so a step replaced later or a class
    changed later would be bypassed), marks the wrapper (``_wrapped_by_lr_sched``) and records each
    call on the optimizer (``_opt_called``); at its first ``step()`` it warns that ``optimizer.step``
    "has been overridden" when the mark is gone, or was not called first. Both are torch's private
    names; were they to change, the cost is that warning, nothing else. Holds ``opt`` weakly, as
    torch's wrapper does (it lives in ``opt.__dict__``).
    """
    ref = weakref.ref(opt)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        target._opt_called = True  # type: ignore[union-attr]
        return step(target, *args, **kwargs)

    wrapped._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return wrapped


class TorchContract:
    """Mixin of :class:`dist8.optim.base.Optimizer8bit` (uses its state, names and checks)."""

    # ---- copies (copy.deepcopy, pickle) -------------------------------------------
    # Rebuilt after a copy: keyed by id() or holding process groups / weak references.
    _NOT_COPIED = ("dtensor_layouts", "dtensor_boxes", "_known", "dtensor_hook", "_checked_hyper",
                   "partials_counted_elsewhere")

    # Set on the instance by other code, bound to this optimizer: a copy that kept them would step the
    # original (an LR scheduler's wrapper of ``step`` and its call flag; gradient release's no-op
    # ``step``/``zero_grad`` and its handle, which holds a lock).
    _BOUND_TO_THE_ORIGINAL = ("_opt_called", "_dist8_gradient_release")

    def __getstate__(self) -> dict[str, Any]:
        """Everything a copy needs to step identically (torch's keeps only defaults, state and
        param_groups); registered hooks, and methods other code replaced on this instance (a
        scheduler's wrapped ``step``, gradient release's), are not copied, as with torch's optimizers."""
        methods = {k for k in self.__dict__ if callable(getattr(type(self), k, None))}
        state = {k: v for k, v in self.__dict__.items()
                 if k not in self._NOT_COPIED and k not in self._BOUND_TO_THE_ORIGINAL and k not in methods
                 and not (k.startswith("_optimizer_") and k.endswith("_hooks"))}
        if self.uses_dtensor:
            state["reduce_partials"] = None  # a closure over a process group: attach() makes it again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)  # torch's: empty hook dicts, the profiled step
        if not had_differentiable:  # torch adds it; a copy's defaults equal the original's
            self.defaults.pop("differentiable", None)
        self.dtensor_layouts = {}
        self.dtensor_hook = None
        self._checked_hyper = {}
        self.partials_counted_elsewhere = frozenset()
        self.dtensor_boxes = {}
        self.__dict__.setdefault("amp_unscale", "kernel")  # copies pickled before it existed
        if self.uses_dtensor:
            self.uses_dtensor = dtensor.attach(self)
        self._known = ParamPositions(self.param_groups, self.param_names)

    # ---- parameters swapped in param_groups (FSDP2 applied after construction) ----------
    def _refuse_listed_twice(self) -> None:
        """A parameter put into ``param_groups`` a second time by hand (``group["params"].append(p)``;
        add_param_group refuses it) would be updated twice per step: refused, naming both positions."""
        first: dict[int, tuple[int, int]] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) in first:
                    g0, p0 = first[id(p)]
                    raise ValueError(
                        f"parameter {self.param_names.get(p, positional_name(g0, p0))} is in param_groups twice "
                        f"({positional_name(g0, p0)} and {positional_name(gi, pi)}): it would be updated twice per "
                        "step; list each parameter once")
                first[id(p)] = (gi, pi)

    def follow_params(self) -> None:
        """Take the parameters now in ``param_groups`` as this optimizer's (run by step, state_dict
        and load_state_dict; call it after replacing parameters by hand).

        Code that applies FSDP2 after the optimizer was built (accelerate, HF Trainer) swaps DTensors
        into ``param_groups``: a new parameter takes the name and module marks of the one it
        replaced, state already made for the old one is re-laid-out onto the new one's local
        shard (exactly: the state is defined on the global parameter), and DTensor mode is
        decided again (a mix of DTensors and plain tensors is refused, naming them).
        """
        restore_module_marks()  # GlobalOptimManager's module overrides a swap took away
        if not self._known.changed(self.param_groups):
            return
        current = [p for g in self.param_groups for p in g["params"]]
        kinds = {is_dtensor(p) for p in current}
        if len(kinds) > 1:  # refused before anything changes: the optimizer stays as it was
            plain = [self.param_name(p) for p in current if not is_dtensor(p)]
            raise TypeError(
                f"param_groups now mix DTensors (FSDP2) and plain tensors ({plain[:3]} are plain); one dist8 "
                "optimizer needs all its parameters sharded the same way: apply fully_shard to the root module too"
            )
        self._refuse_listed_twice()
        for group in self.param_groups:
            self._check_params(group["params"])
        moved, resized, replaced_by_resized = {}, [], set()
        alive = {id(q): q for q in (*self.state, *self.param_names)}
        for r in self._known.replacements(self.param_groups, alive):
            if r.name is not None and r.param not in self.param_names:
                self.param_names[r.param] = r.name
            if r.marks is not None:  # keys the new parameter's own mark has win (e.g. Embedding's, set again)
                merge_marks(r.param, r.marks)
            if r.old is not None and self.state.get(r.old):
                # Another shape (a layer resized, e.g. an embedding for a larger vocabulary) is a new parameter:
                # fresh state at its first step, as torch's optimizers give it. Moving the old state would fail
                # the step after the state had left the old parameter (it was lost, and the retry went fresh).
                if tuple(r.old.shape) != tuple(r.param.shape):
                    resized.append(f"{self.param_name(r.param)} {tuple(r.old.shape)} -> {tuple(r.param.shape)}")
                    replaced_by_resized.add(r.old)
                    continue
                moved[r.param] = self.state.pop(r.old)
        if resized:
            warnings.warn(f"dist8: {', '.join(resized)}: replaced in param_groups by a tensor of another shape; "
                          "it starts with fresh optimizer state (as in torch's optimizers)", stacklevel=3)
        current = set(current)
        stale = [q for q in self.state if q not in current]  # parameters no longer stepped
        names = [self.param_name(q) for q in stale if self.state[q] and q not in replaced_by_resized]
        if names:
            # torch's optimizers keep such state (and their state_dict() then fails on it); dist8 frees it, which
            # a parameter put back later (freezing by removal, then add_param_group) would otherwise not notice
            listed = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            warnings.warn(f"dist8: {listed} ({len(names)} parameter{'s' if len(names) > 1 else ''}) "
                          "left param_groups: their optimizer state is freed, and a parameter put back starts with "
                          "fresh state (freeze with requires_grad_(False) or grad=None to keep it)", stacklevel=3)
        for q in stale:
            del self.state[q]
        self._positions = None
        self._fixed_settings = {q: v for q, v in self._fixed_settings.items() if q in current}
        self.correction_made_for = {q: v for q, v in self.correction_made_for.items() if q in current}
        self.dtensor_layouts = {}
        if self.uses_dtensor and not dtensor.has_dtensor_params(self):
            dtensor.detach(self)
        self.uses_dtensor = dtensor.attach(self)
        self._known = ParamPositions(self.param_groups, self.param_names)
        for p, st in moved.items():  # e.g. plain global state -> this rank's shard of the new DTensor
            self.state[p] = self.check_state(p, st, copy=False)  # moved: the old entry is gone

    # ---- steps that never find a gradient (parameters replaced after construction) ------
    #: Warn (once) when the second ``step()`` in a row finds no gradient on any parameter before any
    #: parameter ever had one; False silences it (parameters frozen on purpose).
    warn_without_gradients: bool = True

    def notice_steps_without_gradients(self) -> None:
        """Called by ``step()``. torch's ``fully_shard`` (and PEFT's adapters) put new parameters in the
        model: an optimizer built before holds the old ones, which backward never reaches, and every
        step does nothing, silently, as torch's optimizers do. One step without gradients is a no-op
        by torch's contract; two in a row before any gradient was seen get one warning."""
        if self.__dict__.get("_seen_gradient") or not self.warn_without_gradients:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        if any(p.grad is not None for p in params):
            self._seen_gradient = True
            return
        self._steps_without_gradients = self.__dict__.get("_steps_without_gradients", 0) + 1
        if self._steps_without_gradients == 2 and params:
            warnings.warn(
                f"dist8: {type(self).__name__}.step() ran twice and none of its {len(params)} parameters had a "
                "gradient either time: backward does not reach the parameters it was built with. Build the "
                "optimizer after anything that replaces the model's parameters (torch's fully_shard does; DDP "
                "and model.to() do not) and after adding adapters (PEFT); if they are frozen on purpose, set "
                "opt.warn_without_gradients = False", stacklevel=3)

    @staticmethod
    def working_copy(p: torch.Tensor, after_step: list) -> torch.Tensor:
        """A contiguous stand-in for ``p`` whose ``.grad`` is a contiguous copy of ``p.grad``.

        The kernels read and write dense memory; only non-contiguous parameters or
        gradients pay this copy (and a non-contiguous parameter the copy back after the step,
        appended to ``after_step`` as a callable).
        """
        if p.is_contiguous():
            work = p.detach()  # the same memory: updated in place, nothing to copy back
        else:
            work = p.detach().contiguous()
            after_step.append(functools.partial(p.detach().copy_, work))
        work.grad = p.grad.detach().contiguous()
        return work
