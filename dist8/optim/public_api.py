"""What ``help()`` shows for the public optimizer classes: the full signature and every argument.

The families' ``__init__`` take their own hyperparameters explicitly and pass dist8's shared
options (``block_size``, ``overrides``, ...) through ``**kwargs`` to
:class:`dist8.optim.base.Optimizer8bit`. :func:`document` gives a family (and the ``X8bit``,
``X32bit``, ``X`` classes made from it) a ``__signature__`` that lists both, and appends the
shared arguments' documentation to the family's docstring.
"""
from __future__ import annotations

import inspect

__all__ = ["SHARED_ARGS_DOC", "document"]

SHARED_ARGS_DOC = """
    Arguments every dist8 optimizer takes (keyword arguments):
        optim_bits (int): bits of optimizer state per value, 8 or 32. Default: 8 for the
            ``X8bit`` classes, 32 for ``X32bit`` and for bitsandbytes' plain ``X``.
        min_8bit_size (int): parameters with fewer elements than this keep 32-bit state
            (counted on the whole parameter, also when it is sharded). Default 4096.
        percentile_clipping (int): clip each parameter's gradient to this percentile (1-100)
            of its nonzero gradient norms among its last 100 steps. Default 100 (off).
        block_wise (bool): True: one fp32 absmax per block of ``block_size`` values; False:
            one absmax for the whole parameter (the paper's ablation). Default True.
        block_size (int): quantization block length in elements, a power of two >= 64.
            Default 256 (8-bit state costs 1 + 4/256 bytes per value per state).
        quant_map (str): ``"dynamic"`` (the paper's dynamic tree map, as bitsandbytes),
            ``"linear"`` (ablation) or ``"fp8"`` (e4m3/e5m3 small-float codes that the AVX2
            and AVX-512 CPU kernels compute instead of looking up: faster there, about twice the dynamic
            map's second-moment rounding error). Default ``"dynamic"``.
        overrides (dict | None): ``{"name pattern": {"lr": ..., "optim_bits": 32, ...}}``,
            fnmatch patterns over the names of ``model.named_parameters()``; later patterns
            win. Default None.
        on_nonfinite (str): ``"skip"``: a quantization block whose gradient (or new state:
            overflow) holds inf/NaN keeps its state and parameter values, found by the kernel
            itself (no extra read), counted in ``nonfinite_skips`` (blocks) and
            ``nonfinite_skips_by_param()``; ``"skip_param"``: gradients are checked before the
            update and a parameter with any inf/NaN is skipped whole (counted once);
            ``"raise"``: that check, and ``FloatingPointError`` naming the parameter.
            Default ``"skip"``.
        check_finite (bool): run the ``"skip_param"``/``"raise"`` check (one more read of each
            gradient); pass False where something else already checks. ``"skip"`` needs none,
            and under ``torch.amp.GradScaler`` the scaler's check is used instead. Default True.
        max_unorm (float): bitsandbytes' update-norm clip; dist8's LAMB and LARS use it as
            described above, the others accept only 0.0. Default 0.0.
        args: bitsandbytes' config object; not supported, must be None.
        is_paged (bool): bitsandbytes' paged state; not supported, must be False.
        master_weight_bits (int | None): None, 24 or 32 (FlashOptim's name): each bf16/fp16
            parameter keeps an int8 (24) or int16 (32) correction (1 or 2 bytes per value) so
            that parameter + correction is a 24/32-bit master weight, decoded, updated and
            re-encoded in the fused kernel (relative error 3.1e-5 for bf16 + 24, see
            dist8.quant.master). fp32 parameters are their own master and unaffected; refused
            when no parameter is bf16/fp16. Also a param-group and ``overrides`` key. Default None.
        maximize (bool): maximize the objective (torch.optim's ``maximize``): the gradient's
            sign is folded into the kernel's gradient scale, so the step is bitwise the
            minimizing step on ``-grad``. A param-group key. Default False.
        amp_unscale (str): who unscales under ``torch.amp.GradScaler``. ``"kernel"``: the
            scaler hands its scale and found-inf to ``step()``, which skips itself on inf/NaN
            (counted in ``amp_skips``, the same decision on every rank, FSDP2 included) or
            unscales inside the kernels, as torch's fused AdamW. ``"scaler"``: the scaler
            unscales the gradients and skips calling ``step()`` on inf/NaN, as torch's other
            optimizers and bitsandbytes'; PyTorch Lightning needs it for ``gradient_clip_val``
            under mixed precision, accelerate for ``optimizer_step_was_skipped``. Refused
            with DTensor (FSDP2) parameters and by gradient release. Default ``"kernel"``.
"""


def _shared_parameters() -> list[inspect.Parameter]:
    from dist8.optim.base import Optimizer8bit

    params = inspect.signature(Optimizer8bit.__init__).parameters.values()
    return [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def document(family: type) -> type:
    """Class decorator: the family's full public signature (its own arguments, then the shared
    keyword arguments) as ``__signature__``, and :data:`SHARED_ARGS_DOC` after its docstring."""
    own = [p for name, p in inspect.signature(family.__init__).parameters.items()
           if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in own}
    shared = [p for p in _shared_parameters() if p.name not in names]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in own):
        raise TypeError(f"{family.__name__}.__init__ must name its arguments (no *args)")
    family.__signature__ = inspect.Signature(own + shared)
    # Dedented, so that the X8bit/X32bit/X classes can put a line of their own in front.
    family.__doc__ = inspect.cleandoc(family.__doc__ or "") + "\n\n" + inspect.cleandoc(SHARED_ARGS_DOC)
    return family
