"""Checkpoints: one `torch.save`d dict, written atomically (temp file, fsync, rename).

Keys: model (state dict, unwrapped from DDP/compile), ema (state dict or None), optimizer,
scheduler, scaler, epoch, step, data_state {epoch, seed, samples (consumed by each rank in
that epoch), batch_size, world_size, workers}, config (asdict), model_name, num_classes,
image_size, class_counts (list), best_top3_err, rng (torch/cuda/numpy/python states) and
metrics (the last validation figures, when there are some). `load_model` rebuilds the
network (with the hierarchy heads when it was trained with a tree) for eval and predict.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imatdata.errors import UserError
from imatdata.manifest import write_bytes_atomic

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:
            pass  # a different number of GPUs: CUDA streams of randomness restart


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """Serialise in memory, then write under a temporary name and rename over `path`."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    write_bytes_atomic(buffer.getvalue(), Path(path))
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); it is not an "
                        f"imattrain checkpoint or it is damaged") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise UserError(f"{path} is not an imattrain checkpoint (no model/model_name)")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu",
               use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on `device`, checkpoint dict). EMA weights when present and asked."""
    from imattrain.models import build_model

    ckpt = load_checkpoint(path)
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model = build_model(ckpt["model_name"], int(ckpt["num_classes"]), log=lambda _m: None)
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
