"""Per-sample prediction files: round trip, and padded duplicates from distributed samplers dropped; a model's
outputs on a split cached across stages."""
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from train.predictions import (cache_outputs, cached_queries, collect_outputs, predict_split, read_predictions,
                               unique_rows, write_predictions)


def test_predictions_round_trip_in_index_order(tmp_path):
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    write_predictions(tmp_path / "p.parquet", {0: {"logits": logits, "label": [1, 0, 1], "index": [2, 0, 1]},
                                               3: {"logits": logits[:2], "label": [1, 0], "index": [1, 0]}})
    back = read_predictions(tmp_path / "p.parquet")
    assert set(back) == {0, 3}
    assert back[0]["index"].tolist() == [0, 1, 2] and back[0]["label"].tolist() == [0, 1, 1]
    np.testing.assert_array_equal(back[0]["logits"], logits[[1, 2, 0]].numpy())
    np.testing.assert_array_equal(back[3]["logits"], logits[[1, 0]].numpy())


def test_unique_rows_drops_repeated_samples():
    index = torch.tensor([3, 1, 2, 0, 1, 3])  # a padded, gathered test set
    rows = unique_rows(index)
    assert index[rows].tolist() == [0, 1, 2, 3] and rows.tolist() == [3, 1, 2, 0]


class Queries:
    """The part of the datamodule that :func:`collect_outputs` reads: ten 8 px queries per level."""
    img_size, mean, std, eval_seed = 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0

    def dataset(self, split: str, level: int) -> list[dict]:
        return [{"image": torch.full((3, 8, 8), float(i + 10 * level)), "label": i % 2, "index": i} for i in range(10)]

    def loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=4)

    def split(self, name: str) -> pa.Table:
        return pa.table({"label": [i % 2 for i in range(10)]})


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.images = torch.nn.Linear(3 * 8 * 8, 2), 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return self.head(images.flatten(1))


def test_collect_outputs_reads_a_models_cached_outputs_instead_of_running_it(tmp_path):
    queries, model, other = Queries(), Counting(), Counting()
    first = collect_outputs({"a": model, "mean": lambda x: x.mean((1, 2, 3))}, queries, "calib", [0, 2], tmp_path)
    assert model.images == 20 and first["level"].tolist() == [0] * 10 + [2] * 10
    again = collect_outputs({"a": model, "b": other, "mean": lambda x: x.mean((1, 2, 3))}, queries, "calib", [0, 2],
                            tmp_path)
    assert model.images == 20 and other.images == 20  # a read back, b run (and cached in turn)
    for key in ("a", "mean", "label", "index", "level"):
        assert torch.equal(again[key], first[key])
    assert torch.allclose(again["b"], other.head(torch.stack([q["image"] for lv in (0, 2)
                                                              for q in queries.dataset("calib", lv)]).flatten(1)))
    only_cached = collect_outputs({"a": model, "b": other}, queries, "calib", [0, 2], tmp_path)
    assert model.images == 20 and other.images == 20 and torch.equal(only_cached["b"], again["b"])
    with torch.no_grad():
        model.head.bias += 1  # other weights: run again
    changed = collect_outputs({"a": model}, queries, "calib", [0, 2], tmp_path)
    assert model.images == 40 and torch.allclose(changed["a"], first["a"] + 1)
    collect_outputs({"a": model}, queries, "test", [0, 2], tmp_path)  # another split: run again
    assert model.images == 60


def test_outputs_handed_on_by_a_stage_are_read_instead_of_running_the_model(tmp_path):
    queries, model = Queries(), Counting()
    computed = predict_split(model, queries, "calib", [0, 2])  # what a stage computed anyway (e.g. calibrate)
    assert cache_outputs(tmp_path, model, queries, "calib", computed) is not None and model.images == 20
    read = collect_outputs({"a": model}, queries, "calib", [0, 2], tmp_path)
    assert model.images == 20  # not run again
    direct = collect_outputs({"a": model}, queries, "calib", [0, 2])
    for key in ("a", "label", "index", "level"):
        assert torch.equal(read[key], direct[key])
    partial = {lv: {k: v[:6] for k, v in p.items()} for lv, p in computed.items()}  # a test capped at 6 samples
    assert cache_outputs(tmp_path, model, queries, "test", partial) is None and not list(tmp_path.glob("test-*"))
    assert cache_outputs(tmp_path, model, queries, "test", {}) is None and not list(tmp_path.glob("test-*"))


def test_one_level_per_image_is_read_from_outputs_kept_for_every_level(tmp_path):
    """A stage that asks each image at one level (the thresholds) reads the rows a stage that ran every level kept;
    other weights, another split or a level not kept give None (the caller runs the model)."""
    queries, model = Queries(), Counting()
    collect_outputs({"a": model}, queries, "calib", [0, 1, 2, 3], tmp_path)
    index, level = np.arange(10), np.arange(10) % 4
    got = cached_queries(tmp_path, model, queries, "calib", index, level)
    images = torch.stack([queries.dataset("calib", int(lv))[i]["image"] for i, lv in zip(index, level)])
    assert model.images == 40 and torch.allclose(got, model.head(images.flatten(1)))
    assert cached_queries(tmp_path, Counting(), queries, "calib", index, level) is None
    assert cached_queries(tmp_path, model, queries, "test", index, level) is None
    collect_outputs({"a": model}, queries, "test", [0, 2], tmp_path)
    assert cached_queries(tmp_path, model, queries, "test", index, level) is None
    assert torch.equal(cached_queries(tmp_path, model, queries, "test", index, index % 2 * 2),
                       cached_queries(tmp_path, model, queries, "calib", index, index % 2 * 2))
