"""The pieces of a DeepSpeed checkpoint's dist8 optimizer state put back together, every piece checked.

Used by :mod:`dist8.integrations.deepspeed_convert` (``dist8 ckpt from-deepspeed``): each rank file holds
per-parameter *segments* of flat partitions (ZeRO 1-3) or whole parameters (ZeRO-0).
:class:`StateAssembly` checks each piece as ``load_state_dict`` checks state, its start and shape against the
parameter, that the pieces cover every element exactly once, and dequantizes them into whole parameters.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist8.messages import brief

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit

__all__ = ["StateAssembly", "add_rank_state", "is_int", "one_line"]


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (a KeyError's without the quotes its str() adds)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(text).split())


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_SEGMENT_KEYS = ("segment_names", "segment_starts", "segment_shapes", "segments")


def add_rank_state(assembly: StateAssembly, fname: str, base: dict) -> None:
    """Add one rank file's optimizer state (segments of flat partitions, or whole parameters) to ``assembly``."""
    from dist8.checkpoint.format import CheckpointError
    from dist8.optim.state_schema import STATE_DICT_INFO, state_key

    info = base.get(STATE_DICT_INFO)
    names = info.get("names", {}) if isinstance(info, dict) else {}
    state = base["state"]
    if not isinstance(state, dict) or not isinstance(names, dict):
        raise CheckpointError(f"{fname}: optimizer state and {STATE_DICT_INFO}.names must be dicts")
    for pid, st in state.items():
        where = f"{fname}: optimizer state {pid}"
        if not isinstance(st, dict):
            raise CheckpointError(f"{where} is {brief(st)}, not a dict")
        if "segments" in st:
            lists = [st.get(k) for k in _SEGMENT_KEYS]
            if not all(isinstance(v, (list, tuple)) for v in lists) or len({len(v) for v in lists}) != 1:
                raise CheckpointError(f"{where}: {', '.join(_SEGMENT_KEYS)} must be lists of one length "
                                      "(a segment's name, start, parameter shape and state)")
            for i, (name, start, shape, seg) in enumerate(zip(*lists)):
                if seg is not None:  # a segment never stepped
                    assembly.add(f"{where} segment {i}", name, start, seg, shape)
        elif state_key(1) in st:
            name = names.get(pid)
            if name is None:
                raise CheckpointError(f"{where} has no parameter name")
            assembly.add(where, name, 0, st, None)


class StateAssembly:
    """Whole-parameter fp32 state put together from the rank files' pieces (segments or whole parameters).

    :meth:`add` checks each piece before anything is allocated: the optimizer's own state check
    (``state_schema.check_state``, what ``load_state_dict`` uses: keys of the rule, dtypes, lengths,
    absmax finite and >= 0, step a whole number >= 0, ...), its start and shape against the parameter's
    shape in ``shapes``; :meth:`check_coverage` then asks for every element covered exactly once, and
    :meth:`assemble` (after the weights are read) dequantizes the pieces into whole parameters.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], opt: Optimizer8bit) -> None:
        self.shapes = shapes
        self.rule, self.block_size, self.quant_map = opt.rule, opt.block_size, opt.quant_map
        # name -> (start, stop, where, checked state) of each piece
        self.pieces: dict[str, list[tuple[int, int, str, dict[str, Any]]]] = {}

    def add(self, where: str, name: Any, start: Any, st: Any, saved_shape: Any) -> None:
        """Piece ``st`` of parameter ``name`` from element ``start``; ``saved_shape`` (a segment's record of its
        parameter's shape) or None for a whole parameter, whose state has the parameter's shape."""
        from dist8.checkpoint.format import CheckpointError
        from dist8.optim.state_schema import is_8bit_state, state_key

        param_shape = self.shapes.get(name) if isinstance(name, str) else None
        if param_shape is None:
            raise CheckpointError(f"{where}: state of parameter {brief(name)}, which the checkpoint's model does "
                                  "not have (another model's rank file?)")
        numel = math.prod(param_shape)
        if saved_shape is None:
            shape = param_shape
        else:
            if not (isinstance(saved_shape, (list, tuple)) and all(is_int(d) for d in saved_shape)
                    and tuple(saved_shape) == param_shape):
                raise CheckpointError(f"{where}: segment_shapes says parameter {name} has shape {brief(saved_shape)}, "
                                      f"the checkpoint's model {param_shape}")
            first = st.get(state_key(1)) if isinstance(st, dict) else None
            shape = (first.numel(),) if isinstance(first, torch.Tensor) else (0,)  # segments are flat
        if not (is_int(start) and 0 <= start <= numel - math.prod(shape)):
            raise CheckpointError(f"{where}: a segment of {math.prod(shape)} elements starting at {brief(start)} "
                                  f"does not fit parameter {name} ({numel} elements)")
        checked = self._checked(where, name, st, shape)
        earlier = self.pieces.setdefault(name, [])
        if earlier and is_8bit_state(earlier[0][3]) != is_8bit_state(checked):
            kinds = [f"{8 if is_8bit_state(st) else 32}-bit" for st in (checked, earlier[0][3])]
            raise CheckpointError(f"{where}: parameter {name} has {kinds[0]} state here, {kinds[1]} state in "
                                  f"{earlier[0][2]} (mixed rank files?)")
        earlier.append((int(start), int(start) + math.prod(shape), where, checked))

    def _checked(self, where: str, name: str, st: Any, shape: tuple[int, ...]) -> dict[str, Any]:
        from dist8.checkpoint.format import CheckpointError
        from dist8.optim.state_schema import check_state

        try:  # DeepSpeed's partitions are fp32: no master-weight correction
            return check_state(self.rule, name, st, shape, torch.device("cpu"), block_size=self.block_size,
                               correction=None, copy=False)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{where}: {one_line(exc)}") from None

    def check_coverage(self, tdir: Path) -> None:
        """Every element of a parameter with state covered by exactly one piece (counting elements, two pieces
        over the same range -- a duplicated or mixed rank file -- passed and left another range zero)."""
        from dist8.checkpoint.format import CheckpointError

        for name, pieces in self.pieces.items():
            numel, covered, last, gap_end = math.prod(self.shapes[name]), 0, "", None
            for start, stop, where, _ in sorted(pieces, key=lambda piece: piece[:2]):
                if start < covered:
                    raise CheckpointError(f"{where}: state of parameter {name} for elements [{start}, {stop}) "
                                          f"overlaps the piece of {last} (a duplicated or mixed rank file?)")
                if start > covered:
                    gap_end = start
                    break
                covered, last = stop, where
            if covered != numel:
                raise CheckpointError(f"{tdir}: parameter {name} has no state for elements [{covered}, "
                                      f"{gap_end or numel}) of {numel} (missing rank files?)")

    def assemble(self, weights: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, Any]]:
        """``{name: {"step", "8bit", "state{i}" (fp32, dequantized), "gnorm_vec"?}}`` of every parameter with
        state; ``weights`` (read by ``source``) must have the shapes the pieces were checked against."""
        from dist8.checkpoint.format import CheckpointError
        from dist8.optim.state_schema import (GNORM, STEP, absmax_key, is_8bit_state, is_signed, state_indices,
                                              state_key)
        from dist8.quant import dequantize_blockwise, get_map

        qmaps = {s: get_map(self.quant_map, s) for s in (True, False)}
        entries = {}
        for name, pieces in self.pieces.items():
            weight = weights.get(name)
            if weight is None or tuple(weight.shape) != self.shapes[name]:
                raise CheckpointError(f"{source}: weights of parameter {name} are "
                                      f"{brief(weight if weight is None else tuple(weight.shape))}, its state has "
                                      f"shape {self.shapes[name]}")
            is8 = is_8bit_state(pieces[0][3])
            entry: dict[str, Any] = {STEP: 0, "8bit": is8}
            for i in state_indices(self.rule):
                entry[state_key(i)] = torch.zeros(weight.numel())
                for start, stop, _, st in pieces:
                    s = st[state_key(i)].reshape(-1)
                    if is8:
                        s = dequantize_blockwise(s, st[absmax_key(i)], qmaps[is_signed(self.rule, i)], self.block_size)
                    entry[state_key(i)][start:stop] = s.reshape(-1).float()
            for _, _, _, st in pieces:
                entry[STEP] = max(entry[STEP], st[STEP])
                if GNORM in st:
                    entry[GNORM] = st[GNORM]
            entries[name] = entry
        return entries
