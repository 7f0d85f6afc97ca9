"""Checkpoints: one `torch.save`d dict, written atomically (temp file, fsync, rename).

Keys: model (state dict, unwrapped from DDP/compile), ema (state dict or None), optimizer,
scheduler, scaler, epoch, step, data_state {epoch, seed, samples (consumed by each rank in
that epoch), batch_size, world_size, workers}, config (asdict), model_name, num_classes,
image_size, class_counts (list), best_top3_err, rng (torch/cuda/numpy/python states) and
metrics (the last validation figures, when there are some). `load_model` rebuilds the
network (with the hierarchy heads when it was trained with a tree) for eval and predict.

Every file is read with `torch.load(weights_only=True)`: unpickling a .pt can otherwise run
any code its author chose, and checkpoints get passed around. So what is saved is kept to
tensors and plain Python values (numpy values are converted on save, the numpy RNG state
included); a file that needs more is refused with one line, never opened.
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imatdata.errors import UserError
from imatdata import storage

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every RNG's state in types `weights_only` loading accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    # Older checkpoints hold the numpy keys as an ndarray, newer ones as a tensor.
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:
            pass  # a different number of GPUs: CUDA streams of randomness restart


def _plain(value: Any) -> Any:
    """`value` with numpy scalars/arrays and paths turned into what `weights_only` loads.

    Containers with nothing to convert are returned as they are: state dicts keep their
    OrderedDict type and the `_metadata` that `load_state_dict` reads."""
    if isinstance(value, dict):
        new = {k: _plain(v) for k, v in value.items()}
        return value if all(new[k] is v for k, v in value.items()) else new
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# Checkpoints written before the switch to weights_only hold the numpy RNG keys as an
# ndarray. Rebuilding a plain ndarray runs no code (torch documents this allow-list), and
# without it every existing checkpoint would be refused.
_reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
_LEGACY_NUMPY = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
                 (_reconstruct, "numpy.core.multiarray._reconstruct")]


def safe_load(path: Path, what: str, hint: str, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`; a refused or unreadable file is a UserError.

    `what` names the file in the message ("checkpoint", "--pretrained"); `hint` says what to
    do when the file holds Python objects."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_LEGACY_NUMPY):
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols: not ours to show
            with storage.open_read(path) as fh:
                return torch.load(fh, map_location=map_location, weights_only=True)
    except Exception as exc:
        # The restricted unpickler names the global (class or function) it refused; other
        # errors mean a file that is not a torch file at all, or a cut-short one.
        found = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise UserError(f"{what} {path} holds Python objects that could run code "
                            f"({found.group(1) or found.group(2)}); imattrain loads only plain "
                            f"tensors and values, so it was not opened: {hint}") from None
        raise UserError(f"{what} {path} cannot be read ({type(exc).__name__}); it is not a "
                        f"torch file or it is damaged") from None


def _shown(value: Any) -> str:
    # A value from an untrusted file, short and on one line.
    text = repr(value) if isinstance(value, (int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Write under a temporary name and rename over `path`: a crash keeps the old file."""
    path = storage.as_location(path)
    with storage.AtomicFile(path) as f, f.open() as fh:
        torch.save(_plain({"format_version": FORMAT_VERSION, **state}), fh)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = storage.as_location(path)
    if not storage.is_file(path):
        raise UserError(f"checkpoint {path} does not exist")
    ckpt = safe_load(path, "checkpoint", "use a checkpoint written by imattrain from a source "
                     "you trust", map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise UserError(f"{path} is not an imattrain checkpoint (no model/model_name)")
    _validate(path, ckpt)
    return ckpt


def _validate(path: Path, ckpt: dict[str, Any]) -> None:
    """The fields eval, predict and --resume rely on, so a bad file fails here in one line."""
    def bad(what: str) -> UserError:
        return UserError(f"checkpoint {path} is not a usable imattrain checkpoint: {what}")

    name = ckpt["model_name"]
    if not isinstance(name, str) or not name:
        raise bad(f"model_name is {_shown(name)}, not a model name")
    n = ckpt.get("num_classes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad(f"num_classes is {_shown(n)}, not a positive whole number")
    for key in ("model", "ema"):
        weights = ckpt.get(key)
        if weights is None and key == "ema":
            continue
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise bad(f"{key} is not a state dict of tensors")
    counts = ckpt.get("class_counts")
    if counts is not None and (not isinstance(counts, (list, tuple, torch.Tensor)) or len(counts) != n):
        raise bad(f"class_counts does not hold one count per class ({n})")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on `device`, checkpoint dict). EMA weights when present and asked."""
    from imattrain.models import build_model

    ckpt = load_checkpoint(path)
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model = build_model(ckpt["model_name"], ckpt["num_classes"], log=lambda _m: None)
    from imattrain.tricks.hierarchy import is_hierarchical_state_dict, rebuild_from_state_dict

    if is_hierarchical_state_dict(state):
        # The leaf -> level table is in the state dict: no tree file needed to rebuild.
        model = rebuild_from_state_dict(model, int(ckpt["num_classes"]), state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not match model {ckpt['model_name']}: "
                        f"{str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return model, ckpt
