"""What every trainer command shares at run time: the device and precision rules, one
optimiser builder, one training step, evaluation, the weight EMA and console output.

`run`, `lr-find`, the two-stage step, `eval` and `predict` all take these from here, so a
rule (which device `auto` means, where weight decay applies, how a loss is scaled) is
written once.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imatdata.errors import UserError
from imatdata.procs import available_cpus
from imatdata.terminal import Bars
from imattrain import distributed as D

AMPS = ("auto", "none", "bf16", "fp16")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def resolve_device(requested: str = "auto", world: D.World | None = None) -> torch.device:
    """auto, cpu, cuda or cuda:N. Under torchrun, `cuda`/`auto` mean this rank's local GPU."""
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N (got {requested!r})")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {requested} but CUDA is not available here; use --device cpu")
    if requested.startswith("cuda:"):
        try:
            index = int(requested.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--device {requested}: the GPU index must be an integer") from None
    else:
        index = (world.local_rank if world else 0) % torch.cuda.device_count()
    if not 0 <= index < torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None for full precision; 'auto' is bf16 on CUDA and off on CPU (slower there)."""
    if amp not in AMPS:
        raise UserError(f"--amp must be one of {', '.join(AMPS)} (got {amp!r})")
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def cpu_threads(requested: int, workers: int, ranks: int = 1, loader_cores: float = 0.0) -> int:
    """Model threads on a CPU device: `requested`, else this rank's share of the cores this
    process may run on (taskset and container CPU sets count) less the cores its loader
    workers keep busy, `loader_cores` (measured by `LoaderLoad`; at most `workers`), rounded.

    Workers that sleep cost nothing: with 2 workers feeding a ResNet-18 at 64 px they use
    about 0.02-0.1 of a core, and leaving them 2 of 2 cores (the old rule, cores minus
    workers) halved the run's speed. A worker that does keep a core busy does compete:
    OpenMP splits each operation evenly over the threads, so one preempted thread stalls
    the others; that core is left to it. (Importing imattrain also makes idle OpenMP threads
    sleep rather than spin, `OMP_WAIT_POLICY=PASSIVE`, see imattrain/__init__: spinning
    threads on a shared machine slow everything else down, their own partners included.)
    """
    if requested:
        return requested
    busy = min(max(loader_cores, 0.0), float(workers))
    return max(1, available_cpus() // max(1, ranks) - int(busy + 0.5))


class LoaderLoad:
    """How many cores the loader workers keep busy: their CPU seconds per batch (each batch
    carries `cpu_time`) over the main process's wall time per batch, over `window` batches
    after `skip` (start-up: worker launch, first row groups, allocator warm-up)."""

    def __init__(self, skip: int = 5, window: int = 20) -> None:
        self.skip, self.window = skip, window
        self.seen = 0
        self.cpu = 0.0
        self.start: float | None = None
        self.cores: float | None = None  # the measurement, once the window is full

    def add(self, cpu_time: float, now: float) -> bool:
        """Count one batch arriving at time `now`; True when the measurement is complete."""
        if self.cores is not None:
            return False
        self.seen += 1
        if self.seen == self.skip:
            self.start = now
        elif self.seen > self.skip:
            self.cpu += float(cpu_time)
            if self.seen == self.skip + self.window and self.start is not None:
                self.cores = self.cpu / max(now - self.start, 1e-9)
                return True
        return False


def build_optimizer(cfg: Any, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW over the parameters that require grad; no weight decay on norm layers and
    biases (1-d parameters). `cfg` needs optimizer, lr, momentum, nesterov, weight_decay."""
    if hasattr(cfg, "resolved"):
        cfg = cfg.resolved()  # a TrainConfig's auto weight decay
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999))
    raise UserError(f"unknown --optimizer {cfg.optimizer!r}")


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling is needed (and on) only for fp16."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def forward_backward(net: nn.Module, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
                     scaler: torch.amp.GradScaler, scale: float = 1.0) -> torch.Tensor:
    """The one training step's forward and backward; the loss (unscaled, detached)."""
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = loss_fn(net(x), y)
    scaler.scale(loss * scale).backward()
    return loss.detach()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clip_grad: float = 0.0) -> None:
    """Unscale, clip, step and clear, as every trainer loop does after its backward passes."""
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def fine_logits(output: Any) -> torch.Tensor:
    """Class logits from a model output (a tensor, or a (logits, extras) tuple)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict):
        return output["logits"]
    return output


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, amp: str | torch.dtype | None,
             *, num_classes: int | None = None, channels_last: bool = False) -> dict[str, Any]:
    """Top-1/3/5, cross-entropy and per-class accuracy over a loader (summed over DDP ranks).

    Rows with label -1 or without an image are ignored. `amp`: 'auto'/'none'/'bf16'/'fp16'
    or a dtype. Returns top1, top3, top5, top3_err, loss, count, per_class_acc (None where a
    class has no images) and per_class_count.
    """
    dtype = amp if isinstance(amp, torch.dtype) or amp is None else autocast_dtype(amp, device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, n, c1, c3, c5
    per_correct = per_total = None
    if num_classes is not None:
        per_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
        per_total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for batch in loader:
        labels = batch["label"]
        keep = (labels >= 0) & batch.get("has_image", torch.ones_like(labels, dtype=torch.bool))
        if not bool(keep.any()):
            continue
        images, labels = to_device(batch["image"][keep], labels[keep], device, channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = fine_logits(model(images)).float()
        if per_correct is None:
            num_classes = logits.shape[1]
            per_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
            per_total = torch.zeros(num_classes, dtype=torch.float64, device=device)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += labels.numel()
        sums[2] += hit[:, :1].any(1).sum()
        sums[3] += hit[:, :3].any(1).sum()
        sums[4] += hit[:, :5].any(1).sum()
        per_total.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        per_correct.index_add_(0, labels, hit[:, 0].double())
    sums = D.all_sum_tensor(sums)
    if per_correct is not None:
        per_correct, per_total = D.all_sum_tensor(per_correct), D.all_sum_tensor(per_total)
    model.train(was_training)
    n = float(sums[1])
    if n == 0:
        raise UserError("no labelled images to evaluate: check --val-split and --data")
    totals = per_total.cpu().tolist() if per_total is not None else []
    correct = per_correct.cpu().tolist() if per_correct is not None else []
    top3 = float(sums[3]) / n
    return {
        "top1": float(sums[2]) / n, "top3": top3, "top5": float(sums[4]) / n,
        "top3_err": 1.0 - top3, "loss": float(sums[0]) / n, "count": int(n),
        "per_class_acc": [c / t if t else None for c, t in zip(correct, totals)],
        "per_class_count": [int(t) for t in totals],
    }


class ModelEma:
    """Exponential moving average of the weights (and float buffers), as timm's ModelEmaV2,
    with a warm-up so short runs are not dominated by the random init."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = unwrap(model).state_dict()
        floats_e, floats_m = [], []
        for name, e in self.module.state_dict().items():
            m = src[name]
            if e.dtype.is_floating_point:
                floats_e.append(e)
                floats_m.append(m.detach())
            else:
                e.copy_(m)
        torch._foreach_lerp_(floats_e, floats_m, 1.0 - d)


class Console:
    """Rank-0, quiet-aware printing to stderr (stdout stays clean for scripts)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


class EpochProgress:
    """The progress bar of one epoch, with the loss; a no-op when disabled or not on a
    terminal (logs and pipes get the one-line epoch summaries only). It vanishes when closed."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, total: int, done: int) -> None:
        self.name = f"epoch {epoch + 1}/{epochs}"
        # Started here and stopped by close(), not a with-block: the epoch loop leaves from
        # several places (end of data, --max-steps).
        self.bars = Bars(enabled=enabled, fields=("loss {task.fields[loss]}",),
                         initial={"loss": "…"}, transient=True, terminal_only=True).__enter__()
        self.bars.update(self.name, completed=done, total=total)

    def advance(self, loss: float) -> None:
        self.bars.update(self.name, advance=1, loss="…" if math.isnan(loss) else f"{loss:.4f}")

    def close(self) -> None:
        self.bars.close()
