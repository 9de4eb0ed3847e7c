"""The shared 8-bit state machinery behind every dist8 optimizer.

A subclass names its update rule (:class:`dist8.kernels.Rule`), validates its
hyperparameters and turns them into per-step :class:`dist8.kernels.Scalars`.
Everything else lives here: state creation (8-bit codes + fp32 absmax, or fp32),
the fp32-vs-8-bit decision on the global parameter, name overrides, percentile
clipping, non-finite gradient handling, trust ratios (LAMB/LARS) and a state
dict of plain tensors.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dist8.kernels import RULE_STATES, RULE_WRITES_UPDATE, Rule, Scalars, get_backend
from dist8.optim import dtensor as _dt
from dist8.optim.config import check_overrides, global_numel, match_overrides, split_named_params, uses_8bit
from dist8.quant import check_block_size, get_map, num_blocks

__all__ = ["Optimizer8bit", "ParamSettings", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PERCENTILE_HISTORY = 100


@dataclass(frozen=True)
class ParamSettings:
    """Resolved settings of one parameter (group values with overrides applied)."""

    name: str
    use_8bit: bool
    block_size: int
    hyper: dict[str, Any]


@torch.compiler.disable
def _map_on(name: str, signed: bool, device: torch.device) -> torch.Tensor:
    """The quantization map on ``device``; made once, outside torch.compile (get_map is lru_cached)."""
    return get_map(name, signed).to(device)


def _square_sums(tensors: list[torch.Tensor]) -> list[float]:
    """``sum(t.double() ** 2)`` of each tensor, copied to the host once per device, not once per
    tensor (on a GPU each copy is a sync)."""
    out = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([tensors[i].detach().double().square().sum() for i in idx]).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


class Optimizer8bit(torch.optim.Optimizer):
    """Base class of dist8's optimizers; not used directly.

    Args common to all subclasses:
        optim_bits: 8 (default for the ``*8bit`` classes) or 32 bits of state.
        min_8bit_size: parameters with fewer elements (of the whole, unsharded
            parameter) keep 32-bit state. Default 4096.
        percentile_clipping: clip each parameter's gradient to this percentile of
            its last 100 gradient norms (100 = off, the default).
        block_size: quantization block size in elements, a power of two >= 64. Default 256.
        block_wise: False quantizes each parameter with one absmax (the paper's ablation).
        quant_map: ``"dynamic"`` (default) or ``"linear"`` (ablation).
        overrides: ``{"name-pattern": {"optim_bits": 32, "lr": ...}}`` applied to
            parameters passed as ``model.named_parameters()`` (fnmatch patterns).
        on_nonfinite: ``"skip"`` (default: skip that parameter's step, count it in
            ``nonfinite_skips``) or ``"raise"`` (``FloatingPointError`` naming it).
        check_finite: check gradients for inf/NaN before each update (default True).
    """

    rule: Rule
    # torch.amp.GradScaler then sets ``grad_scale`` and ``found_inf`` before step() instead of
    # unscaling the gradients itself: the kernels fold 1/scale into their gradient scale.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        optim_bits: int = 8,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        block_size: int = 256,
        quant_map: str = "dynamic",
        overrides: dict[str, dict[str, Any]] | None = None,
        on_nonfinite: str = "skip",
        check_finite: bool = True,
        max_unorm: float = 0.0,
        args: Any = None,
        is_paged: bool = False,
    ) -> None:
        if args is not None:
            raise ValueError("args (a bitsandbytes config object) is not supported; pass keyword arguments")
        if is_paged:
            raise ValueError("is_paged=True (paged optimizers) is not supported by dist8")
        if max_unorm and self.rule not in RULE_WRITES_UPDATE:
            raise ValueError(f"max_unorm={max_unorm} is not supported by {type(self).__name__}; use 0.0")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        check_block_size(block_size)
        get_map(quant_map, True)  # validates the name
        defaults = dict(defaults)
        defaults.update(optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping)
        groups, self._names = split_named_params(params)
        self.block_size = block_size
        self.block_wise = bool(block_wise)
        self.quant_map = quant_map
        self.overrides = check_overrides(overrides)
        self.on_nonfinite = on_nonfinite
        self.check_finite = bool(check_finite)
        self.nonfinite_skips = 0
        self.amp_skips = 0  # steps skipped because torch.amp.GradScaler found inf/NaN
        self.last_nonfinite: list[str] = []
        self._qmaps: dict[tuple[torch.device, bool], torch.Tensor] = {}
        # Sums partial per-parameter reductions across shards (identity when unsharded).
        self.reduce_partials: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Set by sharded wrappers: (piece -> index of its parameter, number of parameters).
        self.global_slots: tuple[dict[torch.Tensor, int], int] | None = None
        super().__init__(groups, defaults)
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            self._check_params(group["params"])
        self._dtensor = _dt.attach(self)  # DTensor (FSDP2) params: reduce_partials, state-dict hook

    # ---- hooks for subclasses -------------------------------------------------
    def _check_hyper(self, hyper: dict[str, Any], where: str) -> None:
        """Validate hyperparameters (raise ValueError naming the key)."""

    def _scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        raise NotImplementedError

    def _trust_ratio(self, hyper: dict[str, Any], p_norm: float, u_norm: float) -> float:
        return 1.0

    # ---- settings ---------------------------------------------------------------
    def _check_group(self, group: dict[str, Any], gi: int) -> None:
        where = f"param group {gi}"
        if group["optim_bits"] not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32 ({where}), got {group['optim_bits']}")
        if not isinstance(group["min_8bit_size"], int) or group["min_8bit_size"] < 0:
            raise ValueError(f"min_8bit_size must be a non-negative int ({where}), got {group['min_8bit_size']}")
        if not 0 < group["percentile_clipping"] <= 100:
            raise ValueError(f"percentile_clipping must be in (0, 100] ({where}), got {group['percentile_clipping']}")
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0 ({where}), got {group['lr']}")
        if "weight_decay" in group and group["weight_decay"] < 0:
            raise ValueError(f"weight_decay must be >= 0 ({where}), got {group['weight_decay']}")
        if "eps" in group and group["eps"] < 0:
            raise ValueError(f"eps must be >= 0 ({where}), got {group['eps']}")
        if "betas" in group:
            b1, b2 = group["betas"]
            for key, beta in (("betas[0]", b1), ("betas[1]", b2)):
                if not 0.0 <= beta < 1.0:
                    raise ValueError(f"{key} must be in [0, 1) ({where}), got {beta}")
        self._check_hyper(group, where)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` with dist8's checks; a refused group is not added."""
        super().add_param_group(param_group)
        if "_dtensor" not in self.__dict__:  # during __init__, which checks all groups itself
            return
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
            self._check_params(self.param_groups[-1]["params"])
            for p in self.param_groups[-1]["params"]:
                if _dt.is_dtensor(p) != bool(self._dtensor):  # all DTensors or none (the step relies on it)
                    raise TypeError(
                        f"parameter {self.param_name(p)} is {'a DTensor' if _dt.is_dtensor(p) else 'a plain tensor'} "
                        f"but this optimizer's parameters are {'DTensors' if self._dtensor else 'plain tensors'}; "
                        "give it an optimizer of its own"
                    )
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.is_complex():
                raise TypeError(f"parameter {self.param_name(p)} is complex; dist8 optimizers need real tensors")
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"parameter {self.param_name(p)} has dtype {p.dtype}; supported: float32, bfloat16, float16"
                )
            _dt.check_param(self.param_name(p), p)  # refuses FSDP1 flat parameters

    def param_name(self, p: torch.Tensor) -> str:
        """The parameter's name if known, else its position ``group G index I``."""
        if p in self._names:
            return self._names[p]
        positions = self.__dict__.get("_positions")
        if positions is None or p not in positions:  # built once (and again after add_param_group)
            positions = {q: f"group {gi} index {pi}" for gi, group in enumerate(getattr(self, "param_groups", []))
                         for pi, q in enumerate(group["params"])}
            self._positions = positions
        return positions.get(p, "<unregistered parameter>")

    def settings(
        self, p: torch.Tensor, group: dict[str, Any], group_hyper: dict[str, Any] | None = None
    ) -> ParamSettings:
        """Resolve group hyperparameters, module marks and name overrides for ``p``.

        ``group_hyper`` (the group's entries without ``params``, made once per step
        by the caller) is shared, not copied, by parameters without overrides.
        """
        fixed = self.__dict__.setdefault("_fixed_settings", {}).get(p)
        if fixed is None:  # name, name patterns, module marks and size do not change: resolve once
            extra = match_overrides(self._names.get(p), p, self.overrides)
            if extra:
                self._check_group(dict({k: v for k, v in group.items() if k != "params"}, **extra, params=[]), -1)
            fixed = self._fixed_settings[p] = (self.param_name(p), extra, global_numel(p))
        name, extra, numel = fixed
        hyper = group_hyper if group_hyper is not None else {k: v for k, v in group.items() if k != "params"}
        if extra:
            hyper = dict(hyper, **extra)
        use_8bit = uses_8bit(hyper["optim_bits"], hyper["min_8bit_size"], numel)
        block = self.block_size if self.block_wise else max(64, 1 << max(numel - 1, 1).bit_length())
        return ParamSettings(name=name, use_8bit=use_8bit, block_size=block, hyper=hyper)

    def rule_state_signed(self, index: int) -> bool:
        """Whether state ``index`` (1 or 2) uses the signed map."""
        return RULE_STATES[self.rule][index - 1]

    def qmap(self, device: torch.device, signed: bool) -> torch.Tensor:
        key = (device, signed)
        if key not in self._qmaps:
            self._qmaps[key] = _map_on(self.quant_map, signed, device)
        return self._qmaps[key]

    # ---- state ------------------------------------------------------------------
    def init_state(self, p: torch.Tensor, settings: ParamSettings) -> dict[str, Any]:
        """Fresh state for ``p``: zero codes and absmax (8-bit) or zero fp32 tensors."""
        if _dt.is_dtensor(p):
            return _dt.init_state(self, p, settings)
        state: dict[str, Any] = {"step": 0}
        n = p.numel()
        for i, _signed in enumerate(RULE_STATES[self.rule], start=1):
            if settings.use_8bit:
                state[f"state{i}"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                state[f"absmax{i}"] = torch.zeros(num_blocks(n, settings.block_size), dtype=torch.float32, device=p.device)
            else:
                state[f"state{i}"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if settings.hyper["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(PERCENTILE_HISTORY, dtype=torch.float32, device=p.device)
        return state

    def state_nbytes(self) -> int:
        """Bytes held by optimizer state tensors (codes, absmax, fp32 state, history)."""
        return sum(
            v.numel() * v.element_size() for st in self.state.values() for v in st.values() if isinstance(v, torch.Tensor)
        )

    # ---- the step -----------------------------------------------------------------
    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        return self.reduce_partials(values) if self.reduce_partials is not None else values

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over all parameters that have a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = []
        for group in self.param_groups:
            group_hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"parameter {self.param_name(p)} has a sparse gradient; dist8 needs dense gradients")
                if p.grad.shape != p.shape:
                    raise ValueError(
                        f"parameter {self.param_name(p)} has shape {tuple(p.shape)} but its gradient {tuple(p.grad.shape)}"
                    )
                settings = self.settings(p, group, group_hyper)
                if not self.state[p]:
                    self.state[p] = self.init_state(p, settings)
                items.append((p, settings, self.state[p]))
        if not items and self.reduce_partials is None:
            return loss
        self._run_updates(items, self._amp_scaling())
        return loss

    def _amp_scaling(self) -> tuple[float, bool] | None:
        """(1/scale, inf found) when torch.amp.GradScaler steps this optimizer, else None.

        The scaler has checked every gradient of ``param_groups`` for inf/NaN
        (``found_inf``) and left them scaled by ``grad_scale`` (None once the user
        called ``scaler.unscale_``): the step is skipped whole when it found any, as
        torch's optimizers do, and otherwise the gradients are unscaled inside the kernels.
        """
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return None
        scale = getattr(self, "grad_scale", None)
        inv_scale = 1.0 if scale is None else 1.0 / float(scale)
        return inv_scale, float(found_inf) > 0

    def partial_slots(self, items: list) -> tuple[list[int], int]:
        """Slot of each item in the vectors of per-parameter partial sums, and their length.

        Unsharded: one slot per item. A sharded wrapper maps every piece of a
        parameter to the parameter's global index so partials can be summed
        across ranks with one collective.
        """
        if self.global_slots is None:
            return list(range(len(items))), len(items)
        slot_of, n = self.global_slots
        return [slot_of[p] for p, _, _ in items], n

    def _run_updates(self, items: list, amp: tuple[float, bool] | None = None) -> None:
        slots, n = self.partial_slots(items)
        sharded = self.reduce_partials is not None
        # Per-parameter partials, summed across shards in one call:
        # [non-finite flags | grad squares | GradScaler found inf (any rank)].
        partials = torch.zeros(2 * n + 1, dtype=torch.float64)
        need_gnorm = any(g["percentile_clipping"] < 100 for g in self.param_groups) or any(
            s.hyper["percentile_clipping"] < 100 for _, s, _ in items
        )
        inv_scale = 1.0 if amp is None else amp[0]
        check = self.check_finite and amp is None  # GradScaler has checked every gradient already
        if amp is not None and amp[1]:
            partials[2 * n] = 1.0
        to_check: dict[torch.device, list] = {}  # one pass over all gradients of a device
        to_norm: list = []  # (slot, gradient) for percentile clipping
        dtensors = bool(self._dtensor)  # all parameters are DTensors, or none (checked when added)
        for slot, (p, settings, _state) in zip(slots, items):
            grad = _dt.local(p.grad) if dtensors else p.grad
            if check:
                to_check.setdefault(grad.device, []).append((slot, grad))
            if need_gnorm and settings.hyper["percentile_clipping"] < 100:
                to_norm.append((slot, grad))
        for (slot, _), sq in zip(to_norm, _square_sums([g for _, g in to_norm])):
            partials[n + slot] += sq * inv_scale * inv_scale  # the history holds unscaled norms
        for device, pairs in to_check.items():
            finite = get_backend(device).all_finite_many([g for _, g in pairs])
            for (slot, _), ok in zip(pairs, finite):
                if not ok:
                    partials[slot] = 1.0
        if sharded or check or need_gnorm:
            partials = self._reduce(partials)
        partials = partials.tolist()  # read once per parameter below: floats, not tensor indexing
        if partials[2 * n] > 0:  # GradScaler found inf/NaN (on some rank): skip the whole step
            self.amp_skips += 1
            return
        self.last_nonfinite = []
        trust_items = []
        edges = _dt.EdgeBatch() if self._dtensor else None  # shard-edge blocks, finished after the loop
        # Plain tensors whose kernel calls differ only in the tensors go to the kernel together
        # (one call instead of one per parameter; LAMB/LARS need their update direction back).
        batches: dict[tuple, tuple[Scalars, list]] = {}
        scalars_memo: dict[tuple, tuple] = {}
        batchable = self.rule not in RULE_WRITES_UPDATE
        for slot, (p, settings, state) in zip(slots, items):
            if partials[slot] > 0:
                self.nonfinite_skips += 1
                self.last_nonfinite.append(settings.name)
                if self.on_nonfinite == "raise":
                    self._run_batches(batches)
                    if edges is not None:
                        edges.finish()
                    raise FloatingPointError(
                        f"non-finite gradient in parameter {settings.name}; step skipped, state untouched"
                    )
                continue
            step = state["step"] + 1
            grad_scale = inv_scale
            if settings.hyper["percentile_clipping"] < 100:
                grad_scale *= self._percentile_scale(state, float(partials[n + slot]), step, settings.hyper["percentile_clipping"])
            if dtensors:
                update = _dt.update(self, p, state, settings, step, grad_scale, edges)
            elif batchable:
                # Parameters sharing a hyper dict (a group without overrides) share their scalars.
                memo_key = (id(settings.hyper), step, grad_scale)
                memo = scalars_memo.get(memo_key)
                if memo is None:
                    scalars, flags = self._scalars(settings.hyper, step, grad_scale)
                    memo = scalars_memo[memo_key] = (scalars, flags, scalars.as_tuple())
                scalars, flags, values = memo
                key = (values, flags, settings.block_size, settings.use_8bit, p.device)
                batches.setdefault(key, (scalars, []))[1].append(self._kernel_tensors(p, state))
                update = None
            else:
                update = self._update_one(p, state, settings, step, grad_scale)
            state["step"] = step
            if update is not None:
                trust_items.append((slot, p, settings, update))
        self._run_batches(batches)
        if edges is not None:
            edges.finish()
        if trust_items or (sharded and self.rule in RULE_WRITES_UPDATE):
            self._apply_trust_ratios(trust_items, n)

    def _percentile_scale(self, state: dict, gnorm_sq: float, step: int, percentile: float) -> float:
        history = state["gnorm_vec"]
        history[(step - 1) % PERCENTILE_HISTORY] = gnorm_sq
        filled = history[: min(step, PERCENTILE_HISTORY)]
        clip_sq = float(torch.quantile(filled, percentile / 100.0, interpolation="lower"))
        return 1.0 if gnorm_sq <= clip_sq or gnorm_sq == 0 else math.sqrt(clip_sq / gnorm_sq)

    def _kernel_tensors(self, p: torch.Tensor, state: dict) -> tuple:
        """(param, grad, state1, state2, absmax1, absmax2) of one parameter for the kernels."""
        two = len(RULE_STATES[self.rule]) == 2
        return (p.detach(), p.grad.detach(), state["state1"], state["state2"] if two else None,
                state.get("absmax1"), state.get("absmax2") if two else None)

    def _kernel_qmaps(self, device: torch.device, use_8bit: bool) -> tuple:
        signs = RULE_STATES[self.rule]
        if not use_8bit:
            return None, None
        return self.qmap(device, signs[0]), (self.qmap(device, signs[1]) if len(signs) == 2 else None)

    def _run_batches(self, batches: dict) -> None:
        """One kernel call per group of parameters collected by _run_updates."""
        for (_, flags, block_size, use_8bit, device), (scalars, rows) in batches.items():
            q1, q2 = self._kernel_qmaps(device, use_8bit)
            get_backend(device).fused_update_multi(self.rule, rows, q1, q2, scalars, flags, block_size)
        batches.clear()

    def _update_one(self, p: torch.Tensor, state: dict, settings: ParamSettings, step: int, grad_scale: float):
        scalars, flags = self._scalars(settings.hyper, step, grad_scale)
        update = None
        if self.rule in RULE_WRITES_UPDATE:
            update = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
        q1, q2 = self._kernel_qmaps(p.device, settings.use_8bit)
        get_backend(p.device).fused_update(
            self.rule, *self._kernel_tensors(p, state), q1, q2, scalars, flags, settings.block_size, update
        )
        return update

    def _apply_trust_ratios(self, trust_items: list, n_slots: int) -> None:
        sums = torch.zeros(2 * n_slots, dtype=torch.float64)
        squares = _square_sums([t for _, p, _, u in trust_items for t in (_dt.local(p), u)])
        for k, (slot, _p, _settings, _update) in enumerate(trust_items):
            sums[2 * slot] += squares[2 * k]
            sums[2 * slot + 1] += squares[2 * k + 1]
        sums = self._reduce(sums)
        for slot, p, settings, update in trust_items:
            ratio = self._trust_ratio(settings.hyper, math.sqrt(sums[2 * slot]), math.sqrt(sums[2 * slot + 1]))
            p = _dt.local(p)
            new = p.detach().reshape(-1).float() - torch.tensor(settings.hyper["lr"] * ratio, dtype=torch.float32) * update
            p.detach().copy_(new.view(p.shape))

    # ---- state dict -----------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; checks every tensor's shape and dtype.

        Unlike ``torch.optim.Optimizer`` this never casts state to the parameter
        dtype (codes stay uint8, absmax and 32-bit state stay float32).
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from optimizer.state_dict())")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, optimizer has {len(self.param_groups)}")
        id_map: dict[int, torch.Tensor] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi}: state_dict has {len(saved['params'])} parameters, optimizer has {len(group['params'])}"
                )
            id_map.update(zip(saved["params"], group["params"]))
        new_state: defaultdict = defaultdict(dict)
        for key, st in state_dict["state"].items():
            if key not in id_map:
                raise KeyError(f"state_dict has state for parameter id {key}, which no param group lists")
            p = id_map[key]
            new_state[p] = self._checked_state(p, st)
        for saved, group in zip(saved_groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
        self.state = new_state

    def _checked_state(self, p: torch.Tensor, st: dict[str, Any]) -> dict[str, Any]:
        name = self.param_name(p)
        n_states = len(RULE_STATES[self.rule])
        out: dict[str, Any] = {}
        for i in range(1, n_states + 1):
            if f"state{i}" not in st:
                raise KeyError(f"state for parameter {name} has no 'state{i}' (keys: {sorted(st)})")
            s = st[f"state{i}"]
            if tuple(s.shape) != tuple(p.shape):
                raise ValueError(f"state{i} of parameter {name} has shape {tuple(s.shape)}, parameter has {tuple(p.shape)}")
            if s.dtype == torch.uint8:
                a = st.get(f"absmax{i}")
                if a is None:
                    raise KeyError(f"8-bit state{i} of parameter {name} has no absmax{i}")
                out[f"absmax{i}"] = a.to(device=p.device, dtype=torch.float32)
            elif s.dtype != torch.float32:
                raise ValueError(f"state{i} of parameter {name} has dtype {s.dtype}; expected uint8 or float32")
            out[f"state{i}"] = s.to(p.device)
        out["step"] = int(st.get("step", 0))
        if "gnorm_vec" in st:
            out["gnorm_vec"] = st["gnorm_vec"].to(device=p.device, dtype=torch.float32)
        return _dt.localize_state(self, p, out) if _dt.is_dtensor(p) or _dt.has_dtensor(out) else out
