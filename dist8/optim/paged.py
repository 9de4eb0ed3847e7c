"""bitsandbytes' paged optimizer names (``PagedAdamW8bit``, ...) and ``is_paged=True``: refused
with the reason and what to use instead.

bitsandbytes' ``Paged*`` classes keep optimizer state in CUDA unified memory, so that it is
evicted to host RAM under GPU memory pressure (QLoRA fine-tuning's ``paged_adamw_8bit``). dist8
has no paging: its 8-bit state is about 2 bytes per parameter, and ShardedOptimizer, FSDP2 or
DeepSpeed ZeRO divide it by the number of ranks. The names are importable (code written for
``bitsandbytes.optim`` imports them before it builds anything, and ``from dist8 import X`` would
lose a module ``__getattr__``'s message), and calling one raises a one-line ValueError.
"""
from __future__ import annotations

from typing import Any, Callable, NoReturn

__all__ = ["PAGED", "PAGED_FAMILIES", "paged_message"]

# bitsandbytes.optim's paged classes: Paged<family>, Paged<family>8bit, Paged<family>32bit
PAGED_FAMILIES = ("Adam", "AdamW", "Lion", "AdEMAMix")


def paged_message(what: str, instead: str) -> str:
    """The one-line refusal of ``what`` (a paged class or ``is_paged=True``), naming ``instead``."""
    return (f"{what}: dist8 has no paged optimizers (bitsandbytes pages their state between GPU and host "
            f"memory); dist8's 8-bit state is about 2 bytes per parameter and ShardedOptimizer, FSDP2 or "
            f"DeepSpeed ZeRO divide it by the number of ranks: use {instead}")


def _refusing(name: str) -> Callable[..., NoReturn]:
    instead = f"dist8.{name[len('Paged'):]}"

    def paged(*args: Any, **kwargs: Any) -> NoReturn:
        raise ValueError(paged_message(f"dist8.{name}", instead))

    paged.__name__ = paged.__qualname__ = name
    paged.__doc__ = f"Not supported: raises ValueError (use {instead}; see dist8.optim.paged)."
    return paged


PAGED: dict[str, Callable[..., NoReturn]] = {
    f"Paged{family}{bits}": _refusing(f"Paged{family}{bits}") for family in PAGED_FAMILIES for bits in ("", "8bit", "32bit")
}
