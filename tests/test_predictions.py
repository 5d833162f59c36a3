"""Per-sample prediction files: round trip, and padded duplicates from distributed samplers dropped."""
import numpy as np
import torch

from train.predictions import read_predictions, unique_rows, write_predictions


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
