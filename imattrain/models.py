"""Model factory: torchvision classification models by name, timm's when timm is installed.

The classifier head is sized for the class count at construction. `pretrained` is either a
local weights file (a state dict or any checkpoint holding one, read with
`weights_only=True` so that it cannot run code; tensors whose shape does not fit, i.e. the
old head, are skipped with a message) or "torchvision" for torchvision's own
weights (which need a download or a warm torch hub cache).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from imatdata import storage
from imatdata.errors import UserError
from imattrain.checkpoint import safe_load

STRIP_PREFIXES = ("module.", "_orig_mod.")


def torchvision_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm() -> Any | None:
    try:
        import timm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return timm


def available_models() -> list[str]:
    names = torchvision_models()
    timm = _timm()
    if timm is not None:
        names += [n for n in timm.list_models() if n not in names]
    return names


def build_model(name: str, num_classes: int, pretrained: str | None = None,
                log: Any = None) -> nn.Module:
    """A randomly initialised (or `pretrained`) classifier with a `num_classes` head."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if name in torchvision_models():
        if pretrained == "torchvision":
            return _torchvision_pretrained(name, num_classes, say)
        model = _torchvision_model(name, num_classes)
    else:
        timm = _timm()
        if timm is None or name not in timm.list_models():
            close = difflib.get_close_matches(name, available_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            extra = "" if timm is not None else "; timm models need `pip install timm`"
            raise UserError(f"unknown model {name!r}{hint}{extra}")
        if pretrained == "torchvision":
            raise UserError(f"--pretrained torchvision is for torchvision models; {name} is a "
                            f"timm model: give a local weights file instead")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if pretrained:
        load_pretrained(model, Path(pretrained), say)
    return model


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name.startswith(("inception", "googlenet")):
        kwargs["aux_logits"] = False  # auxiliary heads only complicate the loss
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, **kwargs)


def _torchvision_pretrained(name: str, num_classes: int, say: Any) -> nn.Module:
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise UserError(f"torchvision has no pretrained weights for {name}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file() and os.environ.get("IMAT_OFFLINE"):
        raise UserError(f"torchvision's {name} weights are not in the torch hub cache ({cached}) "
                        f"and IMAT_OFFLINE is set: copy the file there or pass --pretrained PATH")
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # URLError, OSError, hash mismatch: all mean "could not fetch"
        raise UserError(f"could not get torchvision's {name} weights ({type(exc).__name__}); "
                        f"no network here: put the file in the torch hub cache or pass "
                        f"--pretrained PATH") from None
    replaced = replace_head(model, num_classes, old_classes=len(weights.meta["categories"]))
    say(f"pretrained: torchvision {weights}; new {num_classes}-class head at {', '.join(replaced)}")
    return model


def replace_head(model: nn.Module, num_classes: int, old_classes: int = 1000) -> list[str]:
    """Swap every final layer producing `old_classes` outputs for a fresh `num_classes` one
    (covers fc / classifier / heads.head / squeezenet's conv / inception's aux head)."""
    replaced = []
    for name, module in list(model.named_modules()):
        new: nn.Module | None = None
        if isinstance(module, nn.Linear) and module.out_features == old_classes:
            new = nn.Linear(module.in_features, num_classes, bias=module.bias is not None)
        elif isinstance(module, nn.Conv2d) and module.out_channels == old_classes:
            new = nn.Conv2d(module.in_channels, num_classes, module.kernel_size,
                            module.stride, module.padding)
        if new is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        replaced.append(name)
    if not replaced:
        raise UserError("could not find the classifier head to replace in this model")
    return replaced


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint of ours, timm's, torchvision's or a bare state dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("no state dict found")
    out = {}
    for key, value in obj.items():
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_pretrained(model: nn.Module, path: Path, say: Any) -> None:
    if not storage.is_file(path):
        raise UserError(f"--pretrained {path}: no such file (give a weights file or 'torchvision')")
    obj = safe_load(path, "--pretrained", "save the weights alone, as a state dict of tensors "
                    "(torch.save(model.state_dict(), PATH)), from a source you trust")
    try:
        state = extract_state_dict(obj)
    except (ValueError, TypeError, AttributeError):
        raise UserError(f"--pretrained {path}: not a weights file (no state dict of tensors "
                        f"found in it)") from None
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if not fitting:
        raise UserError(f"--pretrained {path}: none of its weights fit this model; is it the "
                        f"same architecture?")
    model.load_state_dict(fitting, strict=False)
    missing = [k for k in own if k not in fitting]
    msg = f"pretrained: loaded {len(fitting)}/{len(own)} tensors from {path}"
    if skipped:
        msg += f"; skipped (shape differs, e.g. the old head): {', '.join(skipped[:4])}"
        msg += " ..." if len(skipped) > 4 else ""
    elif missing:
        msg += f"; left at random init: {', '.join(missing[:4])}"
    say(msg)
