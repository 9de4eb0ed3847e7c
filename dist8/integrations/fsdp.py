"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with dist8's optimizers.

dist8's optimizers take DTensor parameters directly (see :mod:`dist8.optim.dtensor`):
the update runs on local shards with the fused kernels, quantization blocks are
laid out on the global parameter, and the optimizer state dict works with
``torch.distributed.checkpoint`` at any world size. This module adds:

* :func:`fully_shard` -- ``torch.distributed.fsdp.fully_shard`` that keeps dist8's
  parameter marks (e.g. :class:`dist8.nn.StableEmbedding`'s 32-bit state), which
  are lost when FSDP2 replaces the parameters by DTensors;
* :func:`prepare` -- restores those marks on an already wrapped model and refuses
  FSDP1 (``FullyShardedDataParallel``) models with a clear message;
* :func:`save_dcp` / :func:`load_dcp` -- model + optimizer checkpoints with
  ``torch.distributed.checkpoint``; optimizer state is stored as uint8 codes (sharded
  like the parameter) and fp32 absmax (one full copy), never as fp32 moments.

Typical use::

    from dist8.integrations import fsdp
    for block in model.blocks:
        fsdp.fully_shard(block, mp_policy=policy)
    fsdp.fully_shard(model, mp_policy=policy)
    opt = dist8.AdamW8bit(model.named_parameters(), lr=3e-4)
    ...
    fsdp.save_dcp("ckpt/step100", model, opt)
    fsdp.load_dcp("ckpt/step100", model, opt)   # any world size
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dist8.optim.config import OVERRIDE_ATTR
from dist8.optim.manager import restore_module_marks

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.checkpoint.state_dict import StateDictOptions

__all__ = ["fully_shard", "prepare", "save_dcp", "load_dcp", "check_not_fsdp1"]

_FSDP1_MSG = (
    "{what} is wrapped with FSDP1 (FullyShardedDataParallel, flat parameters), which dist8 optimizers do not "
    "support: wrap the model with torch.distributed.fsdp.fully_shard (FSDP2) or use dist8.ShardedOptimizer instead"
)


def check_not_fsdp1(model: nn.Module) -> None:
    """Raise ``TypeError`` if ``model`` (or a submodule) is an FSDP1 ``FullyShardedDataParallel``.

    Args:
        model: the module to check: it and its submodules (by class name), and its parameters
            (FSDP1's ``FlatParameter``).
    """
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise TypeError(_FSDP1_MSG.format(what=f"module {name or '<root>'!r}"))
    for name, p in model.named_parameters():
        if type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False):
            raise TypeError(_FSDP1_MSG.format(what=f"parameter {name!r}"))


def _marks(module: nn.Module) -> dict[str, dict]:
    return {n: dict(getattr(p, OVERRIDE_ATTR)) for n, p in module.named_parameters()
            if getattr(p, OVERRIDE_ATTR, None)}


def _restore(module: nn.Module, marks: dict[str, dict]) -> None:
    params = dict(module.named_parameters())
    for name, mark in marks.items():
        if name in params:
            setattr(params[name], OVERRIDE_ATTR, dict(mark))


def prepare(model: nn.Module) -> nn.Module:
    """Make a ``fully_shard``-wrapped model ready for a dist8 optimizer; returns ``model``.

    Refuses FSDP1 models, and marks again the weights FSDP2 replaced that carry a module-owned
    setting: :class:`dist8.nn.Embedding` and :class:`dist8.nn.StableEmbedding` (32-bit state) and
    ``GlobalOptimManager.register_module_override`` (see :func:`dist8.optim.manager.restore_module_marks`,
    which dist8 optimizers also run when built). ``override_config`` marks name a tensor, not a module:
    they are lost unless registered with ``register_parameters`` (as in bitsandbytes) or kept by
    :func:`fully_shard`. Call it after ``fully_shard`` and before creating the optimizer;
    :func:`fully_shard` does both for you.

    Args:
        model: the model wrapped with torch's ``fully_shard`` (it and its submodules are checked for FSDP1).
    """
    check_not_fsdp1(model)
    restore_module_marks()
    return model


def _group_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters ``fully_shard(module)`` would put in its group: those of ``module``
    not inside a submodule that is already sharded (FSDP2 checks their dtypes at the first forward)."""
    from torch.distributed.fsdp import FSDPModule

    found: dict[int, tuple[str, nn.Parameter]] = {}

    def visit(m: nn.Module, prefix: str) -> None:
        for name, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                found.setdefault(id(p), (prefix + name, p))
        for name, child in m.named_children():
            if not isinstance(child, FSDPModule):
                visit(child, f"{prefix}{name}.")

    visit(module, "")
    return list(found.values())


def _shard_kept_fp32_first(module: nn.Module, shard, kwargs: dict) -> None:
    """FSDP2 needs one parameter dtype per group; ``dist8.cast_model`` keeps norm layers fp32 next to
    bf16 weights. When ``module``'s group would mix dtypes, the outermost fp32 modules cast_model kept
    inside it become groups of their own first; a mix that remains is refused, naming one parameter
    of each dtype, before torch's assertion at the first forward would name none."""
    from torch.distributed.fsdp import FSDPModule

    from dist8.nn import is_kept_fp32

    if len({p.dtype for _, p in _group_params(module)}) <= 1 or is_kept_fp32(module):
        return

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, FSDPModule):
                continue
            if is_kept_fp32(child):
                if any(p.requires_grad for p in child.parameters()):
                    shard(child, **kwargs)
            else:
                visit(child)

    visit(module)
    by_dtype: dict[torch.dtype, str] = {}
    for name, p in _group_params(module):
        by_dtype.setdefault(p.dtype, name)
    if len(by_dtype) > 1:
        kinds = " and ".join(f"{str(dt).replace('torch.', '')} ({name})" for dt, name in by_dtype.items())
        raise ValueError(f"fully_shard({type(module).__name__}): its parameters mix {kinds}; FSDP2 needs one dtype "
                         f"per fully_shard group: fully_shard the submodules of the other dtype first")


def fully_shard(module: nn.Module, **kwargs: Any) -> nn.Module:
    """``torch.distributed.fsdp.fully_shard(module, **kwargs)`` keeping dist8's parameter marks.

    FSDP2 needs one parameter dtype per group: the fp32 modules :func:`dist8.cast_model` kept inside
    ``module`` (norm layers next to bf16 weights) are sharded as groups of their own first, with the
    same ``kwargs``; any other mix of dtypes is refused with one line naming a parameter of each.

    Args:
        module: the module to shard (each block first, then the root), as for torch's ``fully_shard``;
            FSDP1-wrapped modules are refused with ``TypeError``.
        **kwargs: torch's ``fully_shard`` keyword arguments (``mesh``, ``reshard_after_forward``,
            ``mp_policy``, ``offload_policy``, ...), passed on unchanged.

    Returns what torch's ``fully_shard`` returns: ``module``, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import fully_shard as _fully_shard

    check_not_fsdp1(module)
    marks = _marks(module)
    _shard_kept_fp32_first(module, _fully_shard, kwargs)
    out = _fully_shard(module, **kwargs)
    _restore(module, marks)
    return out


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, options=None):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=options)


def save_dcp(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, extra: dict | None = None,
             process_group: ProcessGroup | None = None, options: StateDictOptions | None = None) -> None:
    """Save model and optimizer with ``torch.distributed.checkpoint.save`` (collective).

    The optimizer part holds, per parameter, ``state1``/``state2`` (uint8 codes, or
    fp32 for 32-bit state) as DTensors sharded like the parameter, ``absmax1``/
    ``absmax2`` as one full-length fp32 tensor, and ``step``.

    Args:
        path: the checkpoint directory (DCP's ``checkpoint_id``), written by every rank.
        model: the model (e.g. sharded with :func:`fully_shard`), saved under ``"model"``.
        optimizer: its dist8 optimizer, saved under ``"optim"``.
        extra: values to store too (e.g. ``{"step": 100}``), under ``"extra"``; :func:`load_dcp` reads
            them back. Default None (nothing; an empty dict stores nothing either).
        process_group: passed to ``dcp.save``. Default None (the default process group).
        options: torch's ``StateDictOptions`` for ``get_state_dict``. Default None (torch's defaults).
    """
    import torch.distributed.checkpoint as dcp

    msd, osd = _state_dicts(model, optimizer, options)
    state = {"model": msd, "optim": osd}
    if extra:
        state["extra"] = dict(extra)
    dcp.save(state, checkpoint_id=path, process_group=process_group)


def load_dcp(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, extra: dict | None = None,
             process_group: ProcessGroup | None = None, options: StateDictOptions | None = None) -> dict | None:
    """Load what :func:`save_dcp` wrote, at any world size (collective); returns ``extra`` if given.

    Nothing is unpickled but DCP's own metadata classes: ``.metadata`` is read through an allowlist
    and checked (every data file it names a regular file inside ``path``), DCP is given that checked
    metadata instead of unpickling the file itself, and tensors and byte items load with
    ``weights_only=True``.

    Args:
        path: the checkpoint directory :func:`save_dcp` wrote.
        model: the model to load into, built and sharded as at save (any world size).
        optimizer: its dist8 optimizer, created before the call (its state is created here to load into).
        extra: a dict with the same keys as at save (values are placeholders) to read them back: the
            loaded dict is returned. Default None (not read; returns None, as for an empty dict).
        process_group: passed to ``dcp.load``. Default None (the default process group).
        options: torch's ``StateDictOptions`` for ``get_state_dict`` and ``set_state_dict``. Default
            None (torch's defaults).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from dist8.checkpoint.torch_files import checked_dcp_reader, weights_only_loads
    from dist8.shard.agreement import failures_on_every_rank

    msd, osd = _state_dicts(model, optimizer, options)  # also creates the optimizer state to load into
    state = {"model": msd, "optim": osd}
    if extra:
        state["extra"] = dict(extra)
    # one rank refusing alone left the others waiting in dcp.load (a disk whose files differ between nodes)
    with failures_on_every_rank(process_group, f"load_dcp({path!r})"):
        reader = checked_dcp_reader(path)  # DCP gets the checked metadata: it never unpickles .metadata
    with weights_only_loads():
        dcp.load(state, storage_reader=reader, process_group=process_group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    return state.get("extra")
