"""The base class of every dist8 optimizer: construction, per-parameter settings, state, state dicts.

One concern: the class users and every layer hold (its public attributes and methods);
the step pipeline, validation, DTensor handling, torch-contract plumbing, hooks and skip
counting live in their own modules beside it.

A subclass names its update rule (:class:`dist8.kernels.Rule`), validates its
hyperparameters (:meth:`Optimizer8bit.check_hyper`) and turns them into per-step
:class:`dist8.kernels.Scalars` (:meth:`Optimizer8bit.scalars`). This class resolves the
settings of each parameter (the fp32-vs-8-bit decision on the global parameter, name
overrides, the effective block size), creates and checks state through
:mod:`dist8.optim.state_schema`, and hands the parameters with a gradient to the step
pipeline (:mod:`dist8.optim.pipeline`: non-finite handling, percentile clipping, kernel
calls, LAMB/LARS trust ratios). DTensor (FSDP2) parameters go through
:mod:`dist8.optim.dtensor`.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dist8.kernels import RULE_WRITES_UPDATE, Rule, Scalars
from dist8.kernels.eager import eager_only
from dist8.optim import dtensor, master_weights, pipeline
from dist8.optim import dtensor_layout as dtl
from dist8.optim import state_schema as schema
from dist8.optim.amp import amp_scaling, check_amp_unscale
from dist8.optim.config import (GLOBAL_NUMEL_ATTR, OVERRIDE_ATTR, check_overrides, check_overrides_match,
                                fixed_lr_override_message,
                                global_numel, hyperparameters_of, load_group_values, loaded_hyperparameters,
                                match_overrides, name_every_group, positional_name, split_named_params,
                                unknown_arguments_message, uses_8bit)
from dist8.optim.contract import TorchContract
from dist8.optim.dcp_init import called_by_dcp_init
from dist8.optim.hooks import load_state_dict_with_hooks
from dist8.optim.lazy_dynamo import LazyDynamoOptimizer
from dist8.optim.manager import apply_positional_configs, restore_module_marks
from dist8.optim.nonfinite import SkipCounter, check_mode
from dist8.optim.paged import paged_message
from dist8.optim.positions import ParamPositions
from dist8.optim.validation import (
    SUPPORTED_DTYPES,
    check_flag,
    check_gradient,
    check_group,
    check_number,
    check_param_types,
    check_unique_params,
)
from dist8.quant import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, check_block_size, effective_block_size, get_map, num_blocks

__all__ = ["Optimizer8bit", "ParamSettings", "SUPPORTED_DTYPES", "bit_variants"]


@dataclass(frozen=True)
class ParamSettings:
    """Resolved settings of one parameter (group values with overrides applied)."""

    name: str
    use_8bit: bool
    block_size: int
    hyper: dict[str, Any]
    # The correction this parameter keeps (int8: 24-bit master, int16: 32-bit), None for none.
    correction: torch.dtype | None = None


@eager_only
def _map_on(name: str, signed: bool, device: torch.device) -> torch.Tensor:
    """The quantization map on ``device``; made once, outside torch.compile (get_map is lru_cached)."""
    return get_map(name, signed).to(device)


# The way out of a refused state-kind change (check_state_fits) for an optimizer that keeps state by parameter.
FRESH_STATE_FIX = "give it fresh state with del optimizer.state[param]"


class Optimizer8bit(TorchContract, LazyDynamoOptimizer):
    """Base class of dist8's optimizers; not used directly.

    Args common to all subclasses:
        optim_bits: 8 (default for the ``*8bit`` classes) or 32 bits of state.
        min_8bit_size: parameters with fewer elements (of the whole, unsharded
            parameter) keep 32-bit state. Default 4096.
        percentile_clipping: clip each parameter's gradient to this percentile of
            its nonzero gradient norms among its last 100 steps (100 = off, the default).
        block_size: quantization block size in elements, a power of two in [64, 65536]. Default 256.
        block_wise: False quantizes each parameter with one absmax (the paper's ablation).
        quant_map: ``"dynamic"`` (default, the paper's dynamic tree map; bitsandbytes' maps),
            ``"linear"`` (ablation) or ``"fp8"`` (small-float codes the AVX2 and AVX-512 CPU kernels
            compute from the float bits instead of looking up: a faster CPU step, about twice
            the dynamic map's second-moment rounding error; :func:`dist8.quant.fp8_map`).
        overrides: ``{"name-pattern": {"optim_bits": 32, "lr": ...}}`` applied to
            parameters passed as ``model.named_parameters()`` (fnmatch patterns). An ``lr`` there
            is fixed, as in bitsandbytes' ``GlobalOptimManager``: LR schedulers change the groups'
            ``lr``, not overrides (warned once when a scheduler is seen); a param group of its own
            is scheduled.
        on_nonfinite: ``"skip"`` (default): a quantization block whose gradient (or new
            state: overflow) is non-finite keeps its state and parameter, found by the kernel
            itself (no extra read) and counted in ``nonfinite_skips`` (blocks) and
            :meth:`nonfinite_skips_by_param`; ``"skip_param"``: gradients are checked before
            the update and a parameter with any inf/NaN is skipped whole (counted once);
            ``"raise"``: that check, and ``FloatingPointError`` naming the parameter.
        check_finite: run the ``"skip_param"``/``"raise"`` check (default True; ``"skip"``
            needs none). The kernels skip non-finite blocks in every mode.
        master_weight_bits: None (default), 24 or 32 (FlashOptim's name): bf16/fp16 parameters
            keep an int8 (24) or int16 (32) correction so that parameter + correction is a
            24/32-bit master weight, decoded, updated and re-encoded in the fused kernel
            (:mod:`dist8.quant.master`: error bound ``2**(E(p) - min(t + b, 24))``, e.g. 3.1e-5
            relative for bf16 + 24). fp32 parameters are their own master and are unaffected;
            refused (ValueError) when no parameter is bf16/fp16. A group key and an override key.
        maximize: False (default); True maximizes the objective, as torch.optim's ``maximize``:
            the gradient's sign is folded into the kernel's gradient scale (exact: the step
            equals the minimizing step on the negated gradient bitwise). A group key.
        amp_unscale: who unscales under ``torch.amp.GradScaler`` (:mod:`dist8.optim.amp`).
            ``"kernel"`` (default): the scaler hands its scale and found-inf to ``step()``,
            which skips itself on inf/NaN (``amp_skips``, one decision on every rank) or
            unscales inside the kernels, as torch's fused AdamW. ``"scaler"``: the scaler
            unscales the gradients and does not call ``step()`` on inf/NaN, as torch's other
            optimizers and bitsandbytes'; needed for PyTorch Lightning's gradient clipping
            under mixed precision and for accelerate's ``optimizer_step_was_skipped``.
            Refused with DTensor (FSDP2) parameters and by gradient release.
    """

    rule: Rule
    n_betas = 2  # length of the ``betas`` hyperparameter, where the family has one (AdEMAMix: 3)

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        block_size: int = DEFAULT_BLOCK_SIZE,
        quant_map: str = "dynamic",
        overrides: dict[str, dict[str, Any]] | None = None,
        on_nonfinite: str = "skip",
        check_finite: bool = True,
        max_unorm: float = 0.0,
        args: Any = None,
        is_paged: bool = False,
        master_weight_bits: int | None = None,
        maximize: bool = False,
        amp_unscale: str = "kernel",
        **unknown: Any,
    ) -> None:
        if unknown:
            raise TypeError(unknown_arguments_message(type(self).__name__, unknown))
        if args is not None:
            raise ValueError("args (a bitsandbytes config object) is not supported; pass keyword arguments")
        if check_flag(is_paged, "is_paged"):
            name = type(self).__name__
            raise ValueError(paged_message(f"{name}(is_paged=True)", f"{name}(is_paged=False), the default"))
        if check_number(max_unorm, "max_unorm", "constructor", lo=0.0) and self.rule not in RULE_WRITES_UPDATE:
            raise ValueError(f"max_unorm={max_unorm} is not supported by {type(self).__name__}; use 0.0")
        check_mode(on_nonfinite)
        self.amp_unscale = check_amp_unscale(amp_unscale)
        check_block_size(block_size, largest=MAX_BLOCK_SIZE)
        get_map(quant_map, True)  # validates the name
        defaults = dict(defaults)
        defaults.update(optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
                        master_weight_bits=master_weight_bits, maximize=check_flag(maximize, "maximize"))
        groups, self.param_names = split_named_params(params)
        restore_module_marks()  # before the marks are read
        apply_positional_configs(groups)  # GlobalOptimManager.register_parameters' overrides, by position
        self.block_size = block_size
        self.block_wise = check_flag(block_wise, "block_wise")
        self.quant_map = quant_map
        self.overrides = check_overrides(overrides)
        self.on_nonfinite = on_nonfinite
        self.check_finite = check_flag(check_finite, "check_finite")
        self.skip_counter = SkipCounter()
        self.amp_skips = 0  # steps skipped because torch.amp.GradScaler found inf/NaN
        self.dtensor_layouts: dict = {}  # (id(param), block) -> dtensor_layout.Layout, filled lazily
        self.dtensor_boxes: dict = {}  # FSDP + TP: id(param) -> every rank's (offset, shape), see dtensor.attach
        self._qmaps: dict[tuple[torch.device, bool], torch.Tensor] = {}
        self._fixed_settings: dict[torch.Tensor, tuple] = {}
        # parameter -> its dtype when its master-weight correction was last made or used: a parameter cast since
        # (model.float() after bf16 steps) carries its master over instead of losing or misreading it
        # (the correction weakly: state deleted by hand frees it)
        self.correction_made_for: dict[torch.Tensor, tuple[torch.dtype, weakref.ref]] = {}
        self._checked_hyper: dict[int, tuple] = {}  # id(group) -> (group, its hyperparameters when last checked)
        self._positions: dict[torch.Tensor, str] | None = None
        # Sums partial per-parameter reductions across shards (identity when unsharded).
        self.reduce_partials: Callable[[torch.Tensor], torch.Tensor] | None = None
        # id() of parameters whose partials another rank adds to that sum (replicated DTensors: one
        # replica counts; see dist8.optim.dtensor.attach).
        self.partials_counted_elsewhere: frozenset[int] = frozenset()
        # Set by sharded wrappers: (piece -> index of its parameter, number of parameters).
        self.global_slots: tuple[dict[torch.Tensor, int], int] | None = None
        # Set by sharded wrappers: the name of each global slot's parameter (messages name parameters
        # whose pieces other ranks hold).
        self.global_slot_names: list[str] | None = None
        self.uses_dtensor = False
        self.dtensor_hook = None  # handle of the DTensor state-dict hook (dist8.optim.dtensor.attach)
        super().__init__(groups, defaults)
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            self._check_params(group["params"])
        self.uses_dtensor = dtensor.attach(self)  # DTensor (FSDP2) params: reduce_partials, state-dict hook
        master_weights.check_applies(self)
        if not any(hasattr(p, GLOBAL_NUMEL_ATTR) for g in self.param_groups for p in g["params"]):
            check_overrides_match(self.overrides, self.param_names.values())  # a wrapper's pieces: it checks
        self._known = ParamPositions(self.param_groups, self.param_names)
        self._constructed = True

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # torch.amp.GradScaler's protocol (also read by Lightning and accelerate): True makes the
        # scaler set ``grad_scale``/``found_inf`` and always call step() (see dist8.optim.amp).
        return self.amp_unscale == "kernel"

    # ---- non-finite skips ---------------------------------------------------------
    @property
    def nonfinite_skips(self) -> int:
        """Skips so far: blocks (``on_nonfinite="skip"``, and overflows in any mode) plus whole
        parameters (``"skip_param"``). Reading it copies pending device counts to the host."""
        return self.skip_counter.total

    @nonfinite_skips.setter
    def nonfinite_skips(self, value: int) -> None:
        self.skip_counter.total = value

    @property
    def last_nonfinite(self) -> list[str]:
        """Names of the parameters with a skip in the last step."""
        return self.skip_counter.last

    def nonfinite_skips_by_param(self) -> dict[str, int]:
        """``{parameter name: skips}`` for the parameters with any (same units as :attr:`nonfinite_skips`)."""
        return self.skip_counter.by_name()

    # ---- hooks for subclasses -------------------------------------------------
    def check_hyper(self, hyper: dict[str, Any], where: str) -> None:
        """Validate the subclass's own hyperparameters (raise ValueError naming the key and ``where``)."""

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        """The kernel scalars and flags of one step (``step`` counts from 1) for hyperparameters ``hyper``."""
        raise NotImplementedError

    def kernel_scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        """:meth:`scalars` with ``maximize`` applied, what every update path hands the kernels: each
        rule starts with ``g * grad_scale``, so a negated scale is torch's ``-grad`` exactly."""
        return self.scalars(hyper, step, -grad_scale if hyper.get("maximize") else grad_scale)

    def trust_ratio(self, hyper: dict[str, Any], p_norm: float, u_norm: float) -> float:
        """LAMB/LARS: the factor on ``lr`` from the parameter and update norms (1 for other rules)."""
        return 1.0

    # ---- settings ---------------------------------------------------------------
    def validate_hyper(self, hyper: dict[str, Any], where: str) -> None:
        """Check a param group's (or override's) hyperparameters; ValueError naming the key and ``where``."""
        check_group(hyper, where, self.n_betas)
        self.check_hyper(hyper, where)

    def _check_group(self, group: dict[str, Any], gi: int) -> None:
        missing = [k for k in self.defaults if k not in group]
        if missing:  # a key deleted from a live group (torch fills them in only when a group is added)
            raise ValueError(f"param group {gi} has no {missing[0]!r}; every group of {type(self).__name__} needs "
                             f"{sorted(self.defaults)}")
        self.validate_hyper(group, f"param group {gi}")
        hyper = hyperparameters_of(group)
        for pattern, extra in self.overrides.items():  # at construction, not at the first step
            self.validate_hyper(dict(hyper, **extra), f"override {pattern!r} on param group {gi}")
        for p in group["params"]:  # module marks (GlobalOptimManager) made before construction: the same
            marks = getattr(p, OVERRIDE_ATTR, None)
            if marks:
                self.validate_hyper(dict(hyper, **marks), f"overrides for parameter {self.param_name(p)}")

    @eager_only  # host-side bookkeeping: torch 2.6's dynamo warns at its id()/dict.get when tracing it
    def check_changed_group(self, group: dict[str, Any], group_hyper: dict[str, Any]) -> None:
        """Validate ``group`` again at a step if its hyperparameters changed since they were last
        checked (a scheduler or user code writing ``group["lr"] = nan`` or ``betas = (0.9,)``):
        a bad value raises naming the key before anything is updated, instead of the step
        skipping every block as non-finite. One dict comparison per group when nothing changed."""
        # CPU tensor values (a tensor lr, which schedulers fill_ in place) are compared by value;
        # CUDA ones by identity, never read back (no host sync per step).
        snapshot = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type == "cpu" else v
                    for k, v in group_hyper.items()}
        checked = self._checked_hyper.get(id(group))
        if checked is not None and checked[0] is group and checked[1] == snapshot:
            return
        gi = next((i for i, g in enumerate(self.param_groups) if g is group), -1)
        self._check_group(group, gi)
        self._checked_hyper[id(group)] = (group, snapshot)

    def check_loaded_group(self, saved: dict[str, Any], gi: int) -> None:
        """Validate the hyperparameters of param group ``gi`` of a loaded state dict (or checkpoint)
        as they would be after loading; ValueError naming the key and the group."""
        self.validate_hyper(loaded_hyperparameters(self.param_groups[gi], saved),
                            f"param group {gi} of the loaded state dict")
        if "initial_lr" in saved:  # an LR scheduler's base (torch keeps it in the group): it scales every later lr
            check_number(saved["initial_lr"], "initial_lr", f"param group {gi} of the loaded state dict", lo=0.0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` with dist8's checks; a refused group is not added.

        A parameter listed twice (in this group or in an earlier one) is refused, naming it.
        """
        existing = getattr(self, "param_groups", [])
        names: dict[torch.Tensor, str] = {}
        named_now: list[dict] = []  # existing groups given positional names for this group's sake
        if isinstance(param_group, dict):
            (param_group,), names = split_named_params([param_group], first_index=len(existing))
            check_unique_params(param_group["params"], existing, self.param_name, f"param group {len(existing)}",
                                param_group.get("param_names"))
            if existing and "param_names" in existing[0]:
                name_every_group([param_group], len(existing))
            elif "param_names" in param_group:  # the first named group: list the others by position
                named_now = list(existing)
                name_every_group(existing)
        added_names = {p: n for p, n in names.items() if p not in self.param_names}
        n_groups = len(existing)
        try:
            super().add_param_group(param_group)
            if not self.__dict__.get("_constructed"):  # during __init__, which checks all groups itself
                return
            self.param_names.update(added_names)
            self._positions = None
            self._known.add_group(self.param_groups[-1]["params"], self.param_names)
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
            self._check_params(self.param_groups[-1]["params"])
            for p in self.param_groups[-1]["params"]:
                if dtl.is_dtensor(p) != self.uses_dtensor:  # all DTensors or none (the step relies on it)
                    raise TypeError(
                        f"parameter {self.param_name(p)} is {'a DTensor' if dtl.is_dtensor(p) else 'a plain tensor'} "
                        f"but this optimizer's parameters are {'DTensors' if self.uses_dtensor else 'plain tensors'}; "
                        "give it an optimizer of its own"
                    )
            master_weights.check_applies(self)
        except (TypeError, ValueError):  # take back everything this call changed
            if self.__dict__.get("_constructed") and len(self.param_groups) > n_groups:
                self.param_groups.pop()
                self._known.pop_group()
                self._positions = None
            for p in added_names:
                self.param_names.pop(p, None)
            for group in named_now:
                del group["param_names"]
            raise

    def _check_params(self, params: list[torch.Tensor]) -> None:
        check_param_types(params, self.param_name)
        for p in params:
            dtl.check_param(self.param_name(p), p)  # refuses FSDP1 flat parameters

    def param_name(self, p: torch.Tensor) -> str:
        """The parameter's name if known (``param_names``), else its position ``group G index I``."""
        if p in self.param_names:
            return self.param_names[p]
        positions = self._positions
        if positions is None or p not in positions:  # built once (and again after add_param_group)
            positions = {q: positional_name(gi, pi) for gi, group in enumerate(getattr(self, "param_groups", []))
                         for pi, q in enumerate(group["params"])}
            self._positions = positions
        return positions.get(p, "<unregistered parameter>")

    def settings(
        self, p: torch.Tensor, group: dict[str, Any], group_hyper: dict[str, Any] | None = None
    ) -> ParamSettings:
        """Resolve group hyperparameters, module marks and name overrides for ``p``.

        ``group_hyper`` (the group's hyperparameters, ``hyperparameters_of(group)``, made once per step
        by the caller) is shared, not copied, by parameters without overrides.
        """
        fixed = self._fixed_settings.get(p)
        marks = getattr(p, OVERRIDE_ATTR, None)
        # name, name patterns and size do not change: resolved once, and again when the marks do (a mark is
        # replaced, never edited: GlobalOptimManager.override_config after the first step applies, as in
        # bitsandbytes)
        if fixed is None or fixed[3] is not marks:
            extra = match_overrides(self.param_names.get(p), p, self.overrides)
            if extra:
                self.validate_hyper(dict(hyperparameters_of(group), **extra),
                                    f"overrides for parameter {self.param_name(p)}")
            fixed = self._fixed_settings[p] = (self.param_name(p), extra, global_numel(p), marks)
            if "lr" in extra and "initial_lr" in group and not self.__dict__.get("_warned_fixed_lr"):
                self._warned_fixed_lr = True  # once per optimizer
                warnings.warn(fixed_lr_override_message(fixed[0], extra["lr"]), UserWarning, stacklevel=3)
        name, extra, numel, _ = fixed
        hyper = group_hyper if group_hyper is not None else hyperparameters_of(group)
        return self.resolve_settings(name, extra, numel, hyper, p.dtype)

    def resolve_settings(self, name: str, extra: dict[str, Any], numel: int, hyper: dict[str, Any],
                         dtype: torch.dtype | None = None) -> ParamSettings:
        """Settings of a parameter (or DeepSpeed segment) ``name`` with ``numel`` elements in the whole,
        unsharded parameter: group hyperparameters ``hyper`` with the override entries ``extra``
        applied, the fp32-vs-8-bit decision, the effective block size and (given the parameter's
        ``dtype``) its master-weight correction. The one place these are decided."""
        if extra:
            hyper = dict(hyper, **extra)
        use_8bit = uses_8bit(hyper["optim_bits"], hyper["min_8bit_size"], numel)
        block = effective_block_size(self.block_size, self.block_wise, numel)
        correction = None
        if dtype is not None and hyper.get("master_weight_bits") is not None:
            correction = schema.correction_dtype(dtype, hyper["master_weight_bits"])
        return ParamSettings(name=name, use_8bit=use_8bit, block_size=block, hyper=hyper, correction=correction)

    def rule_state_signed(self, index: int) -> bool:
        """Whether state ``index`` (1-based) uses the signed map."""
        return schema.is_signed(self.rule, index)

    def qmap(self, device: torch.device, signed: bool) -> torch.Tensor:
        """This optimizer's quantization map (``quant_map``), signed or unsigned, on ``device`` (cached)."""
        key = (device, signed)
        if key not in self._qmaps:
            self._qmaps[key] = _map_on(self.quant_map, signed, device)
        return self._qmaps[key]

    # ---- state ------------------------------------------------------------------
    def init_state(self, p: torch.Tensor, settings: ParamSettings) -> dict[str, Any]:
        """Fresh state for ``p``: zero codes and absmax (8-bit) or zero fp32 tensors."""
        if dtl.is_dtensor(p):
            return dtensor.init_state(self, p, settings)
        return schema.new_state(self.rule, p.shape, num_blocks(p.numel(), settings.block_size), settings.use_8bit,
                                settings.hyper["percentile_clipping"], p.device, settings.correction)

    def param_state(self, p: torch.Tensor, settings: ParamSettings) -> dict[str, Any]:
        """``p``'s state for a step with ``settings``: created if missing, its master-weight
        correction made to match the setting (which may have changed since the last step)."""
        if not self.state[p]:
            self.state[p] = self.init_state(p, settings)
        state = self.state[p]
        if settings.correction is not None or schema.CORRECTION in state:
            made_for, correction = self.correction_made_for.get(p, (None, None))
            if correction is None or correction() is not state.get(schema.CORRECTION):  # made or loaded since
                made_for = None
            master_weights.sync_correction(p, state, settings.correction, made_for)
            if schema.CORRECTION in state:
                self.correction_made_for[p] = (p.dtype, weakref.ref(state[schema.CORRECTION]))
            else:
                self.correction_made_for.pop(p, None)
        return state

    def state_nbytes(self) -> int:
        """Bytes held by optimizer state tensors (codes, absmax, fp32 state, history, master-weight corrections)."""
        return sum(
            v.numel() * v.element_size() for st in self.state.values() for v in st.values() if isinstance(v, torch.Tensor)
        )

    # ---- the step -----------------------------------------------------------------
    @eager_only  # the kernels are opaque ops: tracing the host-side rest gains nothing and broke (see below)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over all parameters that have a gradient.

        Runs eagerly under ``torch.compile`` (one graph break): traced, FSDP2 (DTensor) parameters' state
        layout went into an inductor graph that failed (NameError in generated code)."""
        # torch DCP's zero-gradient lr=0 step (only ever on an optimizer without state): make the state, step nothing
        if not self.state and called_by_dcp_init():
            self.follow_params()
            self.make_fresh_state()
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.follow_params()
        self.notice_steps_without_gradients()
        self._update(((group, group["params"]) for group in self.param_groups))
        return loss

    @torch.no_grad()
    def make_fresh_state(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Give each of ``params`` (default: every parameter with a gradient) that has no state the state its
        first step would create (zero moments, ``step`` 0), changing nothing else: what torch DCP's state
        initialisation asks of ``step()`` (:mod:`dist8.optim.dcp_init`)."""
        wanted = None if params is None else {id(p) for p in params}
        for group in self.param_groups:
            hyper = hyperparameters_of(group)
            for p in group["params"]:
                chosen = p.grad is not None if wanted is None else id(p) in wanted
                if chosen and not self.state.get(p):
                    self.state[p] = self.init_state(p, self.settings(p, group, hyper))

    @torch.no_grad()
    def step_params(self, params: Iterable[torch.Tensor]) -> None:
        """Update only ``params`` (those with a gradient), exactly as :meth:`step` updates them.

        Every dist8 rule is per parameter (moments, percentile clipping, non-finite skips,
        LAMB/LARS trust ratios), so stepping parameters one call at a time is bitwise one
        :meth:`step` over all of them. Used by :func:`dist8.gradient_release`. With DTensor
        parameters it is collective: call it with the same parameters in the same order on every rank.
        """
        # as step() does: parameters swapped into param_groups after construction (accelerate's and HF
        # Trainer's FSDP2 prepare) are taken up; the release path made local-shard state for them and failed
        self.follow_params()
        pairs: dict[int, tuple[dict, list]] = {}
        for p in params:
            try:
                group = self.group_of(p)
            except ValueError as e:
                raise ValueError(f"step_params: {e}") from None
            pairs.setdefault(id(group), (group, []))[1].append(p)
        self._update(pairs.values(), whole_step=False)

    def group_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The param group that holds ``p`` (ValueError naming it if none does)."""
        # Parameter -> its group, rebuilt when the groups change (add_param_group, replaced dicts).
        groups_key = tuple(id(g) for g in self.param_groups)
        cached = self.__dict__.get("_group_of_param")
        if cached is None or cached[0] != groups_key or id(p) not in cached[1]:
            cached = self._group_of_param = (groups_key, {id(q): g for g in self.param_groups for q in g["params"]})
        if id(p) not in cached[1]:
            raise ValueError(f"parameter {self.param_name(p)} is not in this optimizer")
        return cached[1][id(p)]

    def _update(self, groups: Iterable[tuple[dict[str, Any], list[torch.Tensor]]], whole_step: bool = True) -> None:
        # Run after the update, also when it fails: non-contiguous parameters get their working copies
        # back, DTensor gradients redistributed for the step are the caller's again.
        after_step: list[Callable[[], Any]] = []
        try:
            items = self._update_items(groups, after_step, whole_step)
            if items or self.reduce_partials is not None:
                try:
                    pipeline.run_updates(self, items, amp_scaling(self))
                except (RuntimeError, KeyError) as exc:
                    self._name_edited_state(items, exc)
                    raise
        finally:
            for undo in after_step:
                undo()

    def _update_items(self, groups: Iterable[tuple[dict[str, Any], list[torch.Tensor]]],
                      after_step: list[Callable[[], Any]], whole_step: bool = True) -> list[pipeline.UpdateItem]:
        """The (parameter, settings, state) of each listed parameter that has a gradient; creates missing
        state. Non-contiguous parameters get a contiguous working copy and DTensor parameters a
        gradient laid out like them; what undoes either after the step goes to ``after_step``.
        Every parameter is checked before any state is made or changed (FSDP2: on every rank alike,
        ``dtensor.agree_on_step``; per step when ``whole_step``, else once per distinct setting): a
        refusal leaves the optimizer as it was."""
        checked = []
        try:
            for group, group_params in groups:
                group_hyper = hyperparameters_of(group)
                self.check_changed_group(group, group_hyper)
                for p in group_params:
                    if p.grad is None:
                        continue
                    check_gradient(p, self.param_name)
                    if self.uses_dtensor:
                        original = p.grad
                        if dtensor.align_grad(p, self.param_name(p)):
                            after_step.append(functools.partial(setattr, p, "grad", original))
                    settings = self.settings(p, group, group_hyper)
                    existing = self.state.get(p)
                    if existing:
                        self.check_state_fits(p, settings, existing)
                    checked.append((p, settings))
        except Exception as exc:  # FSDP2: the other ranks would wait in the agreement's collective
            if whole_step:
                dtensor.agree_on_step(self, checked, error=exc)
            raise
        dtensor.agree_on_step(self, checked, every_step=whole_step)  # FSDP2: the ranks step alike, or none does
        items = []
        for p, settings in checked:
            state = self.param_state(p, settings)
            # one cheap test on the common path (~0.3 us per parameter); the rest only when it fails
            if not self.uses_dtensor and (p.is_meta or not (p.is_contiguous() and p.grad.is_contiguous())
                                          or not p.numel()):
                if p.is_meta or not p.numel():  # no values to update: count the step only
                    state["step"] += 1
                    continue
                p = self.working_copy(p, after_step)
            items.append(pipeline.UpdateItem(p, settings, state))
        return items

    def _name_edited_state(self, items: list[pipeline.UpdateItem], exc: BaseException) -> None:
        """After a kernel call failed: if a parameter's state no longer passes the load path's schema
        (a tensor replaced by hand: absmax truncated, codes cast, a key deleted), raise that, naming the
        parameter, instead of the kernel's message, which names no parameter. Runs only on failure, so
        the step pays nothing for it; plain parameters only (DTensor shards have their own layout)."""
        if self.uses_dtensor:
            return
        for p, settings, state in items:
            try:
                schema.check_state(self.rule, settings.name, state, tuple(p.shape), p.device,
                                   block_size=settings.block_size, expect_8bit=settings.use_8bit, copy=False)
            except (KeyError, ValueError) as bad:
                raise ValueError(f"{bad.args[0]} (edited after its last step?); {FRESH_STATE_FIX}") from exc
            strided = [k for k, v in state.items() if isinstance(v, torch.Tensor) and not v.is_contiguous()]
            if strided:  # the load path makes its tensors contiguous; the kernels take no others
                raise ValueError(f"{strided[0]} of parameter {settings.name} is not contiguous (edited after its last "
                                 f"step?); {FRESH_STATE_FIX}") from exc

    def check_state_fits(self, p: torch.Tensor, settings: ParamSettings, state: dict[str, Any],
                         fix: str = FRESH_STATE_FIX) -> None:
        """Refuse, naming ``p`` (``settings.name``), state made for another shape or kind than ``p`` and its
        settings now have (a parameter resized, optim_bits/min_8bit_size changed, or percentile clipping
        turned on, after its state was made), which the kernels would otherwise reject without a name;
        ``fix`` ends the message. State that was never stepped (``step`` 0: made by torch DCP's state
        initialisation, or loaded from a checkpoint taken before the first step) holds nothing a step made:
        it is made again, in place, for the settings (its master-weight correction kept) instead."""
        reason = self._unfit_reason(p, settings, state)
        if reason is None:
            return
        if state.get(schema.STEP) == 0:
            correction, fresh = state.get(schema.CORRECTION), self.init_state(p, settings)
            if correction is not None and correction.shape == fresh.get(schema.CORRECTION, correction[:0]).shape:
                fresh[schema.CORRECTION] = correction  # the master's low bits (load_fp32_weights may have set them)
            state.clear()
            state.update(fresh)
            return
        raise ValueError(f"{reason}; {fix}")

    def _unfit_reason(self, p: torch.Tensor, settings: ParamSettings, state: dict[str, Any]) -> str | None:
        name = settings.name  # the parameter's, or the DeepSpeed segment's whole parameter's
        step = state.get(schema.STEP)
        if type(step) is not int or step < 0:  # written by hand (state["step"] = nan, -2, ...): the load path's rule
            try:
                schema.checked_step(step, name)
            except ValueError as exc:  # NaN skipped every later step as non-finite; -2 failed with "math domain error"
                return f"{exc} (written into its optimizer state after its last step?)"
        first = state.get(schema.state_key(1))
        clipping = settings.hyper["percentile_clipping"]
        if clipping < 100 and schema.GNORM not in state:
            # the history starts with the state: read with unfilled entries, its low percentiles are 0 and
            # would scale every gradient of this parameter to 0 (bitsandbytes raises KeyError here)
            return (f"parameter {name} has percentile_clipping={clipping} but its state has no gradient-norm "
                    "history (clipping turned on after its first step?)")
        if first is None:
            return None
        if first.device != p.device:  # the kernels would be handed tensors of two devices (a one-line error, unnamed)
            return (f"parameter {name} is on {p.device} but its optimizer state is on {first.device} (the model moved "
                    "after the optimizer's first step?); opt.load_state_dict(opt.state_dict()) puts the state on "
                    "each parameter's device")
        if not self.uses_dtensor and first.shape != p.shape:
            return (f"parameter {name} has shape {tuple(p.shape)} but its optimizer state was made for "
                    f"{tuple(first.shape)} (resized after its first step?)")
        if (first.dtype == torch.uint8) != settings.use_8bit:
            had, now = ("32", "8") if settings.use_8bit else ("8", "32")
            return (f"parameter {name} has {had}-bit state but its settings now give it {now}-bit state "
                    "(optim_bits or min_8bit_size changed after its first step?)")
        return None

    def check_states_fit(self, params: Iterable[torch.Tensor] | None = None,
                         fix: str = FRESH_STATE_FIX) -> None:
        """:meth:`check_state_fits` for every parameter of ``params`` (default: all of the param groups')
        that has state: a refusal names the first one whose state its settings no longer fit."""
        wanted = None if params is None else {id(p) for p in params}
        for group in self.param_groups:
            hyper = hyperparameters_of(group)
            for p in group["params"]:
                if wanted is not None and id(p) not in wanted:
                    continue
                state = self.state.get(p)
                if state:
                    self.check_state_fits(p, self.settings(p, group, hyper), state, fix)

    def partial_slots(self, items: list[pipeline.UpdateItem]) -> tuple[list[int], int]:
        """Slot of each item in the vectors of per-parameter partial sums, and their length.

        Unsharded: one slot per item. A sharded wrapper maps every piece of a
        parameter to the parameter's global index so partials can be summed
        across ranks with one collective.
        """
        if self.global_slots is None:
            return list(range(len(items))), len(items)
        slot_of, n = self.global_slots
        return [slot_of[it.param] for it in items], n

    # ---- state dict -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` of the parameters now in ``param_groups``."""
        self.follow_params()
        self._drop_unlisted_state()
        sd = super().state_dict()
        sd[schema.STATE_DICT_INFO] = schema.state_dict_info(self.quant_map, self.rule)
        return sd

    def _drop_unlisted_state(self) -> None:
        """Entries of ``state`` for tensors no param group lists: empty ones (reading ``optimizer.state[t]``
        makes one in torch's ``defaultdict``) are dropped; others refused naming the tensor's shape (torch's
        ``state_dict`` raised a bare ``KeyError: <id>`` for either)."""
        listed = {id(p) for group in self.param_groups for p in group["params"]}
        unlisted = [t for t in self.state if id(t) not in listed]
        for t in unlisted:
            if self.state[t]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"optimizer.state holds state for a tensor of shape {shape} that no param group "
                                 "lists; remove it (del optimizer.state[tensor]) or add the tensor with "
                                 "add_param_group")
        for t in unlisted:
            del self.state[t]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; checks every tensor's shape and dtype.

        Unlike ``torch.optim.Optimizer`` this never casts state to the parameter
        dtype (codes stay uint8, absmax and 32-bit state stay float32). The hooks of
        ``register_load_state_dict_pre_hook``/``post_hook`` run as with torch's optimizers.
        """
        self.follow_params()
        load_state_dict_with_hooks(self, state_dict, self._load_checked)

    def _load_checked(self, state_dict: dict[str, Any]) -> None:
        schema.check_state_dict_layout(state_dict)
        schema.check_state_dict_map(state_dict, self.quant_map, self.rule)
        schema.check_state_dict_rule(state_dict, self.rule)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, optimizer has {len(self.param_groups)}")
        id_map: dict[int, torch.Tensor] = {}
        group_of: dict[int, int] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi}: state_dict has {len(saved['params'])} parameters, optimizer has {len(group['params'])}"
                )
            id_map.update(zip(saved["params"], group["params"]))
            group_of.update((key, gi) for key in saved["params"])
        for gi, saved in enumerate(saved_groups):
            self.check_loaded_group(saved, gi)
        new_state: defaultdict = defaultdict(dict)
        for key, st in state_dict["state"].items():
            if key not in id_map:
                raise KeyError(f"state_dict has state for parameter id {key}, which no param group lists")
            p = id_map[key]
            # the kind of state and the correction the parameter needs once the saved group's values are loaded
            group = self.param_groups[group_of[key]]
            settings = self.settings(p, dict(group, **loaded_hyperparameters(group, saved_groups[group_of[key]])))
            new_state[p] = self.check_loaded_state(p, st, settings, "the state dict's group values do not fit its "
                                                   "state (edited?); nothing was loaded")
        kind_changes = [load_group_values(group, saved, warn=False)
                        for saved, group in zip(saved_groups, self.param_groups)]
        self.state = new_state
        for message in dict.fromkeys(m for m in kind_changes if m):  # after the load: it is whole even if one raises
            warnings.warn(message, UserWarning, stacklevel=4)

    def state_block_size(self, p: torch.Tensor) -> int | None:
        """The block of ``p``'s absmax for load-time checks (None for a DTensor: checked on its shards)."""
        if dtl.is_dtensor(p):
            return None
        return effective_block_size(self.block_size, self.block_wise, global_numel(p))

    def check_state(self, p: torch.Tensor, st: dict[str, Any], block_size: int | None = None,
                    expect_8bit: bool | None = None,
                    correction: torch.dtype | None | str = schema.ANY_CORRECTION, copy: bool = True) -> dict[str, Any]:
        """Validate the loaded state ``st`` of parameter ``p`` (see :func:`dist8.optim.state_schema.check_state`).

        ``block_size``: ``p``'s effective block, to check absmax lengths (e.g. from
        :meth:`state_block_size`); ``expect_8bit``: the kind of state ``p``'s settings give it;
        ``correction``: the master-weight correction dtype ``p`` needs (None: none; default: either);
        ``copy``: False when ``st`` is the caller's alone (see the schema's ``check_state``).
        Returns tensors on ``p``'s device (copies unless ``copy=False``); for a DTensor parameter,
        this rank's local shard of state saved at any world size. Raises KeyError/ValueError naming ``p``.
        """
        local = dtl.is_dtensor(p)  # localize_state copies out this rank's part: no whole copy first
        out = schema.check_state(self.rule, self.param_name(p), st, p.shape, p.device, block_size, expect_8bit,
                                 correction, copy and not local)
        return dtensor.localize_state(self, p, out) if local or dtl.has_dtensor(out) else out


    def check_loaded_state(self, p: torch.Tensor, st: dict[str, Any], settings: ParamSettings, fix: str,
                           copy: bool = True) -> dict[str, Any]:
        """:meth:`check_state` of a loaded state for the ``settings`` ``p`` has once the load is done (the kind
        of state they give it, the correction they need), then :meth:`check_state_fits` (e.g. percentile
        clipping's history), ``fix`` ending that refusal. A mismatch was loaded and refused only at the
        next step. ``copy``: as for :meth:`check_state`."""
        out = self.check_state(p, st, block_size=self.state_block_size(p), expect_8bit=settings.use_8bit,
                               correction=settings.correction, copy=copy)
        if out:
            self.check_state_fits(p, settings, out, fix=fix)
        return out


def bit_variants(family: type[Optimizer8bit], name: str, module: str) -> tuple[type, type, type]:
    """The three public classes of an optimizer family, as bitsandbytes names them.

    ``{name}8bit`` (8-bit state by default), ``{name}32bit`` (32-bit state) and ``{name}``
    (bitsandbytes' plain class: 32-bit unless ``optim_bits=8``). Each subclasses ``family``
    directly, so ``isinstance(Adam(...), Adam8bit)`` is False; arguments are the family's.
    """
    docs = {
        f"{name}8bit": f":class:`{family.__name__}` with 8-bit block-wise state by default (bitsandbytes' ``{name}8bit``).",
        f"{name}32bit": f":class:`{family.__name__}` with 32-bit state by default.",
        name: f"bitsandbytes-compatible ``{name}``: :class:`{family.__name__}` with 32-bit state unless ``optim_bits=8``.",
    }
    bits = {f"{name}8bit": 8, f"{name}32bit": 32, name: 32}
    made = []
    for cls_name, doc in docs.items():
        full_doc = f"{doc}\n\n{family.__doc__ or ''}"
        made.append(type(cls_name, (family,), {"default_bits": bits[cls_name], "__doc__": full_doc,
                                               "__module__": module, "__qualname__": cls_name}))
    return made[0], made[1], made[2]
