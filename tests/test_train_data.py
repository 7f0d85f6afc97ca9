"""The shard loader: plan (rank x worker split, padding, shuffle), resume, spawn, corrupt rows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imatdata.errors import UserError
from imattrain.config import TrainConfig
from imattrain.data import (
    PlanSpec,
    batches_per_epoch,
    build_loader,
    decode_image,
    infer_num_classes,
    scan_split,
    validate_labels,
    worker_rows,
)
from imattrain.tricks.sampling import class_repeat_factors
from imattrain.transforms import build_eval_transform, build_train_transform
from train_shards import make_dataset, make_rows, write_split

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 classes x 10 = 40 ok rows (2 of them corrupt) + 3 failed rows, row groups of 6.
    return make_dataset(tmp_path_factory.mktemp("clean"), train_per_class=10, val_per_class=3,
                        corrupt=2, failed=3, row_group_rows=6, size=36)


def spec(**kw: object) -> PlanSpec:
    base = dict(seed=0, batch_size=4, rank=0, world_size=1, num_workers=1, train=True,
                include_missing=False, shuffle_buffer=8)
    base.update(kw)
    return PlanSpec(**base)  # type: ignore[arg-type]


def test_plan_splits_ranks_and_workers_without_overlap_and_with_equal_counts(data: Path) -> None:
    index = scan_split(data, "train")
    assert index.num_rows == 43 and int(index.usable.sum()) == 40 and len(index.units) > 4
    parts = {(r, w): worker_rows(index, spec(rank=r, world_size=2, num_workers=2), 3, w, None)
             for r in range(2) for w in range(2)}
    sizes = {len(p) for p in parts.values()}
    assert sizes == {12}  # 40 rows -> 20 per rank -> 10 per worker -> 3 full batches of 4
    everything = np.concatenate(list(parts.values()))
    usable = set(np.flatnonzero(index.usable).tolist())
    assert set(everything.tolist()) == usable  # every usable row, nothing else
    # Padding repeats as few rows as needed (48 slots for 40 rows), across ranks.
    assert len(everything) - len(set(everything.tolist())) == 8
    rank0 = set(np.concatenate([parts[0, 0], parts[0, 1]]).tolist())
    rank1 = set(np.concatenate([parts[1, 0], parts[1, 1]]).tolist())
    assert len(rank0 & rank1) <= 8
    assert batches_per_epoch(index, spec(rank=1, world_size=2, num_workers=2), None) == 6
    # Deterministic per (seed, epoch); a new epoch is a new order.
    again = worker_rows(index, spec(rank=0, world_size=2, num_workers=2), 3, 0, None)
    assert np.array_equal(again, parts[0, 0])
    other = worker_rows(index, spec(rank=0, world_size=2, num_workers=2), 4, 0, None)
    assert not np.array_equal(other, parts[0, 0])
    # Evaluation: every row exactly once over the ranks, no padding, file order.
    ev = [worker_rows(index, spec(rank=r, world_size=2, num_workers=2, train=False,
                                  include_missing=True), 0, w, None)
          for r in range(2) for w in range(2)]
    assert sorted(np.concatenate(ev).tolist()) == list(range(43))


def test_corrupt_rows_are_skipped_and_counted_missing_rows_yielded_for_predict(data: Path) -> None:
    cfg = TrainConfig(image_size=32)
    loader = build_loader(data, "train", transform=build_train_transform(cfg), batch_size=4,
                          workers=0, train=True)
    batches = list(loader)
    assert [b["batch_index"] for b in batches] == list(range(10))
    assert sum(b["corrupt"] for b in batches) == 2
    assert sum(len(b["id"]) for b in batches) == 38
    first = batches[0]
    assert first["image"].dtype == torch.float32 and first["image"].shape[1:] == (3, 32, 32)
    assert first["label"].dtype == torch.long and first["has_image"].all()
    # include_missing: every row once, corrupt and failed ones with a zero image.
    ev = build_loader(data, "train", transform=build_eval_transform(32), batch_size=8,
                      workers=0, train=False, include_missing=True)
    rows = [(i, bool(h), img) for b in ev for i, h, img in zip(b["id"], b["has_image"], b["image"])]
    assert len(rows) == 43 and len({r[0] for r in rows}) == 43
    missing = [r for r in rows if not r[1]]
    assert len(missing) == 5 and all(float(r[2].abs().sum()) == 0 for r in missing)
    assert sum(1 for r in missing if "failed" in r[0]) == 3


def test_resume_mid_epoch_under_spawn_workers_continues_the_same_order(data: Path) -> None:
    cfg = TrainConfig(image_size=32)
    loader = build_loader(data, "train", transform=build_train_transform(cfg), batch_size=4,
                          workers=2, train=True, seed=5, multiprocessing_context="spawn")
    loader.dataset.set_epoch(1)
    full = [b for b in loader]
    assert [b["batch_index"] for b in full] == list(range(10))
    # Resume after 3 batches (so worker 1 holds the next one); same ids, same crops.
    loader.dataset.set_epoch(1, start_sample=3 * 4)
    rest = [b for b in loader]
    assert [b["batch_index"] for b in rest] == list(range(3, 10))
    for a, b in zip(full[3:], rest):
        assert a["id"] == b["id"]
        assert torch.equal(a["image"], b["image"])
    loader.dataset.set_epoch(2)
    nxt = [i for b in loader for i in b["id"]]
    ids1 = [i for b in full for i in b["id"]]
    assert sorted(nxt) == sorted(ids1) and nxt != ids1


def test_repeat_factors_balance_classes_with_a_fixed_epoch_length(tmp_path: Path) -> None:
    rows = [r for r in make_rows("train", 2, size=16, labels=(0, 1)) if r["label"] == 1]
    rows += make_rows("train", 18, size=16, labels=(0,), seed=1)
    write_split(tmp_path, "train", rows, row_group_rows=5)  # 18 of class 0, 2 of class 1
    index = scan_split(tmp_path, "train")
    counts = index.class_counts(2)
    assert counts.tolist() == [18, 2]
    factors = class_repeat_factors(counts, "balanced")
    labels_by_epoch = []
    for epoch in range(4):
        seq = worker_rows(index, spec(batch_size=1, shuffle_buffer=0), epoch, 0, factors)
        labels_by_epoch.append(index.labels[seq])
    assert {len(x) for x in labels_by_epoch} == {20}  # same number of steps every epoch
    share = np.mean([np.mean(x == 1) for x in labels_by_epoch])
    assert 0.35 <= share <= 0.65  # was 0.1 without re-sampling
    again = worker_rows(index, spec(batch_size=1, shuffle_buffer=0), 0, 0, factors)
    assert np.array_equal(index.labels[again], labels_by_epoch[0])
    ones = class_repeat_factors(counts, "instance")
    plain = worker_rows(index, spec(batch_size=1, shuffle_buffer=0), 0, 0, ones)
    assert sorted(plain.tolist()) == list(range(20))


def test_labels_are_validated_against_the_class_count(data: Path, tmp_path: Path) -> None:
    index = scan_split(data, "train")
    assert infer_num_classes(index) == 4
    validate_labels(index, 4, "train")
    with pytest.raises(UserError, match="label 3 but the model has 3 classes"):
        validate_labels(index, 3, "train")
    write_split(tmp_path, "train", make_rows("train", 2, size=16, unlabelled=True))
    with pytest.raises(UserError, match="without a label"):
        validate_labels(scan_split(tmp_path, "train"), 4, "train")
    with pytest.raises(UserError, match="no shards for split 'nope'"):
        scan_split(tmp_path, "nope")


def test_draft_decoding_scales_jpeg_down_but_not_below_the_target() -> None:
    img = Image.new("RGB", (512, 384), (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    assert decode_image(buf.getvalue(), 224).size == (512, 384)  # 192 would be too small
    assert decode_image(buf.getvalue(), 96).size == (128, 96)  # 1/4: short side just fits
    assert decode_image(buf.getvalue(), 150).size == (256, 192)
    assert decode_image(buf.getvalue(), 40).size == (64, 48)
    assert decode_image(buf.getvalue(), None).size == (512, 384)
    png = io.BytesIO()
    img.save(png, format="PNG")
    assert decode_image(png.getvalue(), 40).size == (512, 384)  # draft is JPEG-only


def test_raw_bytes_batches_decode_in_batch_and_augment_as_tensors(data: Path) -> None:
    """The --gpu-decode path, exercised on the CPU: workers ship bytes, the batch is decoded
    together (non-JPEG and corrupt bytes handled) and augmented as uint8 tensors."""
    from imattrain.data import gpu_decode_batch
    from imattrain.transforms import build_gpu_train_transform

    loader = build_loader(data, "train", transform=None, batch_size=8, workers=0, train=True,
                          raw_bytes=True)
    batch = next(iter(loader))
    assert batch["image"] is None and len(batch["data"]) == 8
    assert all(t.dtype == torch.uint8 and t.ndim == 1 for t in batch["data"])
    png = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 200, 0)).save(png, format="PNG")
    extra = [torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8),
             torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0broken"), dtype=torch.uint8)]
    decoded = gpu_decode_batch(list(batch["data"]) + extra, torch.device("cpu"))
    assert decoded[-1] is None  # corrupt: dropped and counted by the engine
    assert decoded[-2].shape == (3, 20, 30)  # PNG: decoded by the fallback
    corrupt_in_batch = sum(d is None for d in decoded[:-2])
    assert all(d.shape[0] == 3 for d in decoded[:-2] if d is not None)
    transform = build_gpu_train_transform(TrainConfig(image_size=24))
    out = torch.stack([transform(d) for d in decoded if d is not None])
    assert out.shape == (9 - corrupt_in_batch, 3, 24, 24) and out.dtype == torch.float32
    assert -3 < float(out.mean()) < 3
