"""The feature store: shards round-trip exactly, resume, notice changes; external files join by id with clear errors."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.data.feature_store import FeatureStore, FeatureStoreError, join_external, read_external
from train.tiers.modalities import ImageStats


def keys(n: int, start: int = 0) -> dict[str, np.ndarray]:
    index = np.arange(start, start + n)
    return {"sample_id": np.array([f"s{i}" for i in index]), "level": (index % 4).astype(np.int8), "index": index,
            "label": (index % 2).astype(np.int8)}


def fill(store: FeatureStore, modality: str, values: np.ndarray, present: np.ndarray, shard: int = 4) -> None:
    for k, (a, b) in enumerate(store.plan("meta", len(values), shard)):
        store.write_shard("meta", modality, k, keys(b - a, a), values[a:b], present[a:b])


def test_round_trip_is_exact_and_absent_rows_hold_zeros(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 3)).astype(np.float32), rng.normal(size=(10, 5)).astype(np.float32)
    present = np.arange(10) % 3 != 0
    store = FeatureStore(tmp_path)
    store.declare("a", 3, {"kind": "test"})
    store.declare("b", 5, {"kind": "test"})
    fill(store, "a", a, np.ones(10, bool))
    fill(store, "b", b, present)
    assert len(list((tmp_path / "meta").glob("a-*.parquet"))) == 3  # 10 rows in shards of 4
    got = FeatureStore(tmp_path).read_split("meta")  # a fresh reader: everything comes from disk
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"][present], b[present])
    assert (got["b"][~present] == 0).all() and (got["has_b"] == present).all() and got["has_a"].all()
    assert got["sample_id"].tolist() == keys(10)["sample_id"].tolist()
    np.testing.assert_array_equal(got["label"], keys(10)["label"])


def test_resume_keeps_finished_shards_and_notices_changes(tmp_path):
    store = FeatureStore(tmp_path)
    store.declare("a", 2, {"model": "v1"})
    fill(store, "a", np.ones((10, 2)), np.ones(10, bool))
    assert store.complete("meta", "a")
    store.shard_path("meta", "a", 1).unlink()  # an interrupted run
    assert not store.complete("meta", "a") and store.has_shard("meta", "a", 0) and not store.has_shard("meta", "a", 1)
    with pytest.raises(FeatureStoreError, match="incomplete"):
        store.read_split("meta")
    table = pq.read_table(store.shard_path("meta", "a", 2))  # a shard altered on disk is not trusted
    pq.write_table(table.set_column(4, "a", pa.array([[9.0, 9.0]] * 2, pa.list_(pa.float32(), 2))),
                   store.shard_path("meta", "a", 2))
    assert not store.has_shard("meta", "a", 2)
    fill(store, "a", np.ones((10, 2)), np.ones(10, bool))
    assert store.complete("meta", "a")
    store.declare("a", 2, {"model": "v2"})  # another producer: its old shards no longer count
    assert not store.has_shard("meta", "a", 0)
    with pytest.raises(FeatureStoreError, match="no modality"):
        store.read_split("meta", ["nope"])


def test_external_join_names_unknown_ids_and_counts_missing(tmp_path):
    path = tmp_path / "det.parquet"
    pq.write_table(pa.table({"sample_id": ["s1", "s3"], "cones": [2, 0], "conf": [0.9, 0.1]}), path)
    ids, values = read_external(path)
    assert values.shape == (2, 2) and values.dtype == np.float32
    features, present, missing = join_external(ids, values, ["s0", "s1", "s2", "s3"], np.array(["s0", "s1", "s3"]), "t")
    assert present.tolist() == [False, True, True] and missing == 1
    np.testing.assert_array_equal(features, np.float32([[0, 0], [2, 0.9], [0, 0.1]]))
    with pytest.raises(FeatureStoreError, match=r"1 of 2 sample ids match no sample.*'s3'"):
        join_external(ids, values, ["s0", "s1"], np.array(["s0"]), "t")

    npz = tmp_path / "vlm.npz"
    np.savez(npz, sample_id=np.array(["s0", "s0"]), features=np.zeros((2, 4)))
    with pytest.raises(FeatureStoreError, match=r"duplicate sample ids \['s0'\]"):
        read_external(npz)
    np.savez(npz, ids=np.array(["s0"]), features=np.zeros((1, 4)))
    with pytest.raises(FeatureStoreError, match="'sample_id' and 'features'"):
        read_external(npz)
    pq.write_table(pa.table({"sample_id": ["s0"], "label": [1]}), path)
    with pytest.raises(FeatureStoreError, match="'label' is not a feature"):
        read_external(path)
    with pytest.raises(FeatureStoreError, match="not found"):
        read_external(tmp_path / "missing.parquet")


def test_image_stats_are_fractions_and_see_edges():
    stats = ImageStats(hue_bins=6, sat_bins=2, value_bins=4, grid=2)
    flat = np.full((32, 32, 3), 120, np.uint8)
    half = flat.copy()
    half[:, 16:] = 250
    a, b = stats(flat).numpy(), stats(half).numpy()
    assert a.shape == (stats.dim,) and np.isclose(a[:12].sum(), 1) and np.isclose(a[12:16].sum(), 1)
    assert a[16] == 0 and b[16] > 0  # edge density: none on a flat image, some at the step
