"""task=prepare's decode-once shards and the training path that reads them (data.train_source=shards); the
data_run fixture (conftest) is a run with only its data stage: 64 px model input, so 73 px shards."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import pytorch_lightning as pl
import torch
from conftest import QUIET, compose_config, copy_run

from train.__main__ import run_task
from train.data.datamodule import ImageDataset
from train.data.transforms import ShardImage
from train.errors import RunError
from train.runs import Run
from train.tasks.registry import get_task
from train.tiers.training import build_datamodule


def config(run: Run, *overrides: str):
    return compose_config(f"run_dir={run.path}", "debug=tiny", *QUIET, *overrides)


def test_shards_round_trip_and_a_rerun_skips(data_run, tmp_path):
    run = copy_run(data_run, tmp_path)
    run_task(config(run, "task=prepare", "prepare.splits=[train,val]"))
    manifest = json.loads(run.artifact("prepare", "shards").read_text())
    size = round(64 * 8 / 7)
    assert manifest["size"] == size and set(manifest["splits"]) == {"train", "val"}
    datamodule = build_datamodule(config(run), run)
    for split in ("train", "val"):
        table = datamodule.split(split)
        images = np.load(run.path / "prepare" / f"{split}.npy", mmap_mode="r")
        samples = pq.read_table(run.path / "prepare" / f"{split}.parquet")
        assert images.shape == (table.num_rows, size, size, 3) and images.dtype == np.uint8
        assert samples.column("position").to_pylist() == list(range(table.num_rows))
        assert samples.column("label").to_pylist() == table.column("label").to_pylist()
        assert samples.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
        decoded = ImageDataset(table, ShardImage(size), decode_side=size)
        for i in (0, table.num_rows // 2, table.num_rows - 1):
            assert np.array_equal(images[i], ShardImage(size)(decoded.image(i)))
    written = (run.path / "prepare" / "train.npy").stat().st_mtime_ns
    finished = run.read()["tasks"]["prepare"]["finished"]
    run_task(config(run, "task=prepare", "prepare.splits=[train,val]"))
    assert (run.path / "prepare" / "train.npy").stat().st_mtime_ns == written
    assert run.read()["tasks"]["prepare"]["finished"] == finished
    run_task(config(run, "task=prepare", "prepare.size=48"))  # other settings: written anew
    assert json.loads(run.artifact("prepare", "shards").read_text())["splits"]["train"]["shape"][1:] == [48, 48, 3]


def test_shard_batches_are_seeded_and_augmented_on_the_device_hook(data_run, tmp_path):
    run = copy_run(data_run, tmp_path)
    run_task(config(run, "task=prepare"))
    datamodule = build_datamodule(config(run, "data.train_source=shards", "data.batch_size=8"), run)

    def first_batch(epoch: int) -> dict:
        loader = datamodule.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(epoch)
        return next(iter(loader))

    batch = first_batch(0)
    assert batch["image"].shape == (8, 73, 73, 3) and batch["image"].dtype == torch.uint8
    assert batch["augment"].shape == (8, 9)
    assert torch.equal(batch["label"], torch.from_numpy(datamodule.split("train").column("label").to_numpy())[
        batch["index"]])
    again, other = first_batch(0), first_batch(1)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(batch["index"], other["index"])
    out = datamodule.on_after_batch_transfer(dict(batch), 0)
    assert out["image"].shape == (8, 3, 64, 64) and out["image"].dtype == torch.float32 and "augment" not in out
    # under a precision that converts inputs (DeepSpeed's bf16, "bf16-true"), the augmented images are converted
    # too: Lightning converted the batch before the transfer, while it was still uint8
    datamodule.trainer = pl.Trainer(precision="bf16-true", logger=False, enable_checkpointing=False)
    half = datamodule.on_after_batch_transfer(dict(batch), 0)["image"]
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), out["image"], atol=0.05, rtol=0.01)
    datamodule.trainer = pl.Trainer(precision="bf16-mixed", logger=False, enable_checkpointing=False)
    assert datamodule.on_after_batch_transfer(dict(batch), 0)["image"].dtype == torch.float32  # autocast casts


def test_stage1_trains_from_shards_and_prepares_them_first(data_run, tmp_path):
    run = copy_run(data_run, tmp_path)
    run_task(config(run, "task=stage1", "data.train_source=shards", "debug=fast_dev_run", "model.bootstrap=0"))
    assert run.is_complete("prepare") and run.is_complete("stage1")


def test_a_missing_data_stage_is_named(tmp_path):
    run = Run.create(tmp_path, "empty")
    with pytest.raises(RunError, match=r"stage 'prepare' reads the outputs of \['data'\]"):
        run_task(config(run, "task=prepare"))
    with pytest.raises(RunError, match="no completed 'data' stage"):  # the task itself, called without the check
        get_task("prepare")(config(run, "task=prepare"), run)


@pytest.mark.parametrize("source", ["shards", "jpeg"])
def test_resume_with_loader_workers_is_exact(source, data_run, tmp_path):
    """Two epochs straight == stopped after the first, then resumed from last.ckpt: the order and the augmentation
    draws are functions of seed and epoch, also when the resumed loader's worker prefetches before set_epoch."""
    common = ["task=stage1", f"data.train_source={source}", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
              "model.bootstrap=0", "model.img_size=32", "model.backbone.patch_size=8", "model.backbone.depth=1",
              "model.backbone.embed_dim=32", "model.backbone.num_heads=2", "data.test_levels=[0]",
              "model.backbone.pretrained=false",
              "data.num_workers=1"]
    straight, broken = copy_run(data_run, tmp_path / "a"), copy_run(data_run, tmp_path / "b")
    run_task(config(straight, *common))
    run_task(config(broken, *common, "+callbacks.stop._target_=interrupt.StopAfterEpoch", "+callbacks.stop.epoch=0"))
    run_task(config(broken, *common, "ckpt_path=last"))
    a, b = (torch.load(r.artifact("stage1", "last"), map_location="cpu", weights_only=True) for r in (straight, broken))
    assert (a["global_step"], b["global_step"]) == (6, 6)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
