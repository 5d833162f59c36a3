"""Colour alone must not solve the synthetic task: a colour-histogram baseline stays below MCC 0.6."""
from train.data.colour_baseline import ColourHistogram, colour_baseline, fit_logistic
from train.data.datamodule import RoadworkDataModule
from train.data.synthetic_source import SyntheticSource

import numpy as np
import torch


def test_logistic_baseline_learns_when_colour_does_decide():
    """The baseline itself works: on images whose class *is* their colour it is near perfect."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    images = [np.full((8, 8, 3), (230, 120, 20) if y else (40, 90, 200), np.uint8) +
              rng.integers(0, 20, (8, 8, 3), dtype=np.uint8) for y in labels]
    x = torch.stack([ColourHistogram()(im) for im in images])
    predict = fit_logistic(x[:100], torch.as_tensor(labels[:100]))
    assert ((predict(x[100:]) > 0.5).numpy() == labels[100:]).mean() > 0.95


def test_colour_histogram_baseline_stays_below_mcc_06(data_dir, tmp_path):
    source = SyntheticSource(str(data_dir / "synthetic"), n_scenes=1200, views_per_scene=1, workers=2)
    dm = RoadworkDataModule(source, {"train": 0.6, "meta": 0.1, "val": 0.05, "calib": 0.05, "test": 0.2},
                            num_workers=2)
    dm.build_index(tmp_path)
    result = colour_baseline(dm)
    print("colour baseline:", result)
    assert result["n_test"] >= 200
    assert result["mcc"] < 0.6
