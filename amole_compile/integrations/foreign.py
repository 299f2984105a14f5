"""Models another adapter library has adapted already: refused by name.

Discovery would see such a library's own adapter layers as projections (PEFT's `lora_B` feeds q as much as
`q_proj` does) and the transform would freeze their parameters: a second q role adapted on PEFT's LoRA, with no
error. So a model holding modules of a known adapter library is refused, naming the library, the first such
module and the way out.
"""

from __future__ import annotations

from torch import nn

# top-level package -> (library, how to get the plain model back)
LIBRARIES = {
    "peft": ("PEFT", "take the plain base model back with `peft_model.merge_and_unload()` (the LoRA weights merged "
                     "into it) or `peft_model.unload()` (dropped)"),
    "adapters": ("AdapterHub adapters", "use the model without adapters (`model.delete_adapter(...)` for each)"),
    "loralib": ("loralib", "use the model with plain nn.Linear layers (merge the LoRA weights first)"),
}


class ForeignAdaptersError(ValueError):
    """The model was adapted by another adapter library (PEFT, ...)."""


def check_not_adapted_elsewhere(model: nn.Module) -> None:
    """ForeignAdaptersError naming the library and its first adapter layer when `model` holds its modules."""
    found = [(name, mod) for name, mod in model.named_modules()
             if type(mod).__module__.split(".", 1)[0] in LIBRARIES]
    if not found:
        return
    name, mod = next(((n, m) for n, m in found if n), found[0])  # a layer inside rather than a root wrapper
    library, way_out = LIBRARIES[type(mod).__module__.split(".", 1)[0]]
    raise ForeignAdaptersError(
        f"{type(model).__name__} is already adapted by {library} ({type(mod).__name__} at {name or 'the root'}): "
        f"amole_compile would take its adapter layers for projections and freeze them; {way_out}, then "
        "transform it")
