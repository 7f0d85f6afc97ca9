"""Two-process DDP on gloo (CPU): disjoint, equal shares of the data, one run folder."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from train_shards import make_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, data: str, out: str, report: str) -> None:
    """One torchrun-like rank: env:// rendezvous on loopback, then the real engine."""
    import torch.distributed as dist

    from imattrain import distributed as D
    from imattrain.config import TrainConfig
    from imattrain.data import build_loader
    from imattrain.engine import train
    from imattrain.transforms import build_train_transform

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = D.env_world()
    D.init(world, torch.device("cpu"))
    cfg = TrainConfig(data=data, out=out, model="mobilenet_v3_small", image_size=32, epochs=1,
                      batch_size=4, workers=0, lr=0.01, quiet=True, device="cpu",
                      val_split="val", threads=1)
    loader = build_loader(data, "train", transform=build_train_transform(cfg), batch_size=4,
                          workers=0, train=True, rank=rank, world_size=2, seed=cfg.seed)
    ids = [i for batch in loader for i in batch["id"]]
    gathered: list[list[str] | None] = [None, None]
    dist.all_gather_object(gathered, ids)
    result = train(cfg)  # joins the existing group; shuts it down at the end
    if rank == 0:
        Path(report).write_text(json.dumps({"ids": gathered, "steps": result.steps}))


def test_two_ranks_split_the_data_and_train_together(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "clean", train_per_class=9, val_per_class=3, size=32)
    out, report = tmp_path / "run", tmp_path / "report.json"
    mp.spawn(_rank_main, args=(_free_port(), str(data), str(out), str(report)), nprocs=2,
             join=True)
    got = json.loads(report.read_text())
    rank0, rank1 = got["ids"]
    assert len(rank0) == len(rank1) == 20  # 36 images -> 18 per rank -> padded to 5 batches of 4
    assert len(set(rank0) | set(rank1)) == 36  # every image is seen ...
    assert len(set(rank0) & set(rank1)) <= 4  # ... and only the padding repeats
    assert got["steps"] == 5
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    assert metrics[0]["train_images"] == 40  # summed over both ranks
    assert metrics[0]["val_images"] == 12  # each val image counted once across ranks
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "config.toml").is_file()
