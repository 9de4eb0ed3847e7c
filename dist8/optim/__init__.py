"""dist8's optimizers: drop-in replacements for ``bitsandbytes.optim`` with block-wise 8-bit state."""
from dist8.optim.adam import Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit, AdamW32bit
from dist8.optim.ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit
from dist8.optim.base import Optimizer8bit, ParamSettings
from dist8.optim.lamb import LAMB, LAMB8bit, LAMB32bit
from dist8.optim.manager import GlobalOptimManager
from dist8.optim.lion import Lion, Lion8bit, Lion32bit
from dist8.optim.paged import PAGED, paged_message
from dist8.optim.rmsprop import Adagrad, Adagrad8bit, Adagrad32bit, RMSprop, RMSprop8bit, RMSprop32bit
from dist8.optim.sgd import LARS, SGD, LARS8bit, LARS32bit, SGD8bit, SGD32bit

OPTIMIZERS = {
    cls.__name__: cls
    for cls in (Adam, Adam8bit, Adam32bit, AdamW, AdamW8bit, AdamW32bit, SGD, SGD8bit, SGD32bit, RMSprop, RMSprop8bit,
                RMSprop32bit, Adagrad, Adagrad8bit, Adagrad32bit, Lion, Lion8bit, Lion32bit, LAMB, LAMB8bit, LAMB32bit,
                LARS, LARS8bit, LARS32bit, AdEMAMix, AdEMAMix8bit, AdEMAMix32bit)
}


def get_optimizer_class(name: str) -> type[Optimizer8bit]:
    """Optimizer class by name (``"AdamW8bit"``, ``"dist8.AdamW8bit"``; case-insensitive).

    Args:
        name: a key of :data:`OPTIMIZERS`; only the part after the last ``.`` is looked up, ignoring case.

    Raises ValueError for an unknown name, listing the valid ones (for bitsandbytes' ``Paged*``
    names: naming the dist8 class to use instead).
    """
    key = name.split(".")[-1].lower()
    for cls_name, cls in OPTIMIZERS.items():
        if cls_name.lower() == key:
            return cls
    plain = next((n for n in OPTIMIZERS if f"paged{n.lower()}" == key), None)
    if plain is not None:  # bitsandbytes' PagedAdamW8bit etc.
        raise ValueError(paged_message(repr(name), f"dist8.{plain}"))
    raise ValueError(f"unknown dist8 optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")


# bitsandbytes' PagedAdamW8bit etc.: importable, calling one raises ValueError naming the class to use
globals().update(PAGED)

__all__ = ["GlobalOptimManager", "OPTIMIZERS", "Optimizer8bit", "ParamSettings", "get_optimizer_class", *OPTIMIZERS]
