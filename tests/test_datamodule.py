"""The DataModule over a run's index: levels, class balance, bad images at load time."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate

from train.data.images import BadImageError


@pytest.fixture
def datamodule(tiny_run, tiny_config):
    """The JPEG training path (the default job trains from shards: test_prepare.py)."""
    return instantiate(tiny_config("data.train_source=jpeg").data, index_path=str(tiny_run.artifact("data", "index")))


def test_levels_give_different_queries_of_the_same_images(datamodule):
    l0, l1 = datamodule.dataset("test", 0), datamodule.dataset("test", 1)
    assert len(l0) == len(l1) > 0
    a, b = l0[0], l1[0]
    assert a["image"].shape == b["image"].shape == (3, datamodule.img_size, datamodule.img_size)
    assert a["label"] == b["label"] and not torch.equal(a["image"], b["image"])
    assert torch.equal(l1[3]["image"], datamodule.dataset("test", 1)[3]["image"])  # seeded per sample


def test_loaders_per_level_and_batches(datamodule):
    loaders = datamodule.test_dataloader()
    assert len(loaders) == len(datamodule.test_levels)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[1:] == (3, datamodule.img_size, datamodule.img_size)
    assert set(batch["label"].tolist()) <= {0, 1}


def test_class_weights_and_weighted_sampler(tiny_run, tiny_config):
    index = str(tiny_run.artifact("data", "index"))
    weighted = instantiate(tiny_config("data.balance=class_weights", "data.train_source=jpeg").data, index_path=index)
    counts = weighted.class_counts()
    w = weighted.class_weights
    assert torch.allclose(w * torch.tensor(counts, dtype=torch.float32), torch.full((2,), counts.sum() / 2))
    sampled = instantiate(tiny_config("data.balance=sampler", "data.batch_size=64", "data.train_source=jpeg").data,
                          index_path=index)
    labels = torch.cat([b["label"] for b in sampled.train_dataloader()])
    assert counts[1] / counts.sum() > 0.7 and 0.3 < labels.float().mean() < 0.7  # rebalanced toward 50:50
    with pytest.raises(Exception, match=r"data.balance='oversample'; allowed: \['none', 'sampler', 'class_weights'\]"):
        instantiate(tiny_config("data.balance=oversample").data)


def test_a_bad_image_at_load_time_names_file_and_row(tiny_run, tiny_config, tmp_path):
    """With verification off, a corrupt image still fails with its file and row, not a bare decoder error."""
    table = pq.read_table(tiny_run.artifact("data", "index"))
    files = np.array(table.column("file").to_pylist())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    files[table.column("split").to_numpy(zero_copy_only=False) == "test"] = str(broken)
    rows = np.where(np.array(table.column("split").to_pylist()) == "test", -1, table.column("row").to_numpy())
    patched = table.set_column(table.schema.get_field_index("file"), "file", [files.tolist()])
    patched = patched.set_column(patched.schema.get_field_index("row"), "row", [rows.tolist()])
    pq.write_table(patched, tmp_path / "index.parquet")
    dm = instantiate(tiny_config().data, index_path=str(tmp_path / "index.parquet"))
    with pytest.raises(BadImageError, match="broken.jpg: cannot decode"):
        dm.dataset("test", 0)[0]


def test_validator_queries_are_rendered_once_per_run_and_read_back_pixel_for_pixel(tiny_run, tiny_config, tmp_path):
    (tmp_path / "index.parquet").write_bytes(tiny_run.artifact("data", "index").read_bytes())
    index = str(tmp_path / "index.parquet")
    cached = instantiate(tiny_config().data, index_path=index)
    rendered = instantiate(tiny_config("data.query_cache=false").data, index_path=index)
    images = cached.queries("test", [0, 2])
    files = sorted((tmp_path / "queries").glob("test-L*.parquet"))
    assert [f.name[:7] for f in files] == ["test-L0", "test-L2"]
    assert pq.read_metadata(files[0]).num_rows == len(images)
    direct = rendered.queries("test", [0, 2])
    for i in (0, len(images) // 2, len(images) - 1):
        for level in (0, 2):
            assert np.array_equal(images.query(i, level), direct.query(i, level))
    # the model inputs come from the resized-query cache (decoded and resized once), equal to decoding each query
    inputs, direct_inputs = cached.dataset("test", 2), rendered.dataset("test", 2)
    assert inputs.resized is not None and direct_inputs.resized is None
    for i in range(len(inputs)):
        assert torch.equal(inputs[i]["image"], direct_inputs[i]["image"])
    resized = sorted((tmp_path / "queries").glob("test-L2-*px.npy"))
    assert len(resized) == 1 and np.load(resized[0]).shape == (len(images), cached.img_size, cached.img_size, 3)
    stamps = [f.stat().st_mtime_ns for f in files + resized]
    cached.queries("test", [0, 2])
    cached.dataset("test", 2)
    assert [f.stat().st_mtime_ns for f in files + resized] == stamps  # read back, not rendered again
    # a query at another level reads that level's resized queries once some reader wrote them, else decodes it
    k, three = len(images) // 3, cached.queries("test", [0, 2, 3])
    assert torch.equal(three.model_input(k, 2), direct_inputs[k]["image"])  # level 2: its resized rows
    assert torch.equal(three.model_input(k, 3), rendered.dataset("test", 3)[k]["image"])
    assert three._resized_at[2] is not None and three._resized_at[3] is None
    assert not list((tmp_path / "queries").glob("test-L3-*px.npy"))  # level 3 decoded: no resized file written
    reseeded = instantiate(tiny_config("data.eval_seed=1").data, index_path=index).queries("test", [2])
    assert len(list((tmp_path / "queries").glob("test-L2-*.parquet"))) == 2
    assert not np.array_equal(reseeded.query(0, 2), images.query(0, 2))
    assert not list(tmp_path.glob("queries/.*.tmp"))
