"""The bad-data corpus end to end: every case is converted, skipped and counted (in train.log and summary.json), or
stops with a message naming the file and row, never a trace from inside a worker."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from bad_images import bomb_png, jpeg, unusable, usable
from conftest import QUIET, compose_config
from train.__main__ import USER_ERRORS, run_task
from train.data.datamodule import ImageDataset
from train.data.feature_store import FeatureStoreError, read_external
from train.data.images import BadImageError
from train.data.sources import CsvSource, DataError, ParquetSource
from train.data.transforms import ModelInput
from train.runs import Run


def write_corpus(path, n_good=300):
    """Good JPEGs, the odd-but-usable images and the unusable ones (a decompression bomb among them), one parquet."""
    good = [jpeg(seed=i) for i in range(n_good)] + list(usable().values())
    bad = [data for data, _ in unusable().values()] + [bomb_png()]
    cells = [{"bytes": b, "path": None} for b in good + bad]
    pq.write_table(pa.table({"image": cells, "label": [i % 2 for i in range(len(cells))]}), path)
    return len(good)


def test_bad_images_are_counted_in_the_log_and_the_summary(tmp_path):
    (tmp_path / "natix").mkdir()
    n_good = write_corpus(tmp_path / "natix" / "corpus.parquet")
    run_task(compose_config(f"paths.root_dir={tmp_path}", *QUIET, "task=data", "data=natix",
                            f"data.root={tmp_path / 'natix'}", "data.num_workers=0", "data.max_bad_fraction=0.05"))
    (path,) = (tmp_path / "checkpoints").iterdir()
    summary = json.loads((path / "summary.json").read_text())["tasks"]["data"]
    expected = {"empty": 1, "undecodable": 2, "too_small": 1, "too_large": 1}
    assert summary["skipped"] == expected and summary["skipped_total"] == 5 and summary["total"] == n_good
    log = (path / "train.log").read_text()
    assert "skipped 5 bad image(s)" in log and f"corpus.parquet row {n_good + 4}: image too large to decode" in log
    assert Run.open(path).metrics("data")["skipped"] == expected


def test_a_bad_image_in_a_loader_worker_names_file_and_row_without_a_trace(tmp_path):
    """Images that changed after indexing (or data.verify_images=false) reach the loader: a clear error."""
    pq.write_table(pa.table({"image": [jpeg(seed=0), b"", jpeg(seed=1)], "label": [0, 1, 0]}), tmp_path / "x.parquet")
    index = ParquetSource(str(tmp_path)).samples()
    loader = DataLoader(ImageDataset(index, ModelInput(32), level=0), batch_size=3, num_workers=1)
    with pytest.raises(BadImageError) as err:
        next(iter(loader))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'x.parquet'} row 1: empty image") and "Traceback" not in message
    assert BadImageError in USER_ERRORS


def test_duplicate_ids_across_files_name_both_and_default_ids_stay_unique(tmp_path):
    for folder in ("a", "b"):  # the same file name in two folders: default ids from the relative path
        (tmp_path / folder).mkdir()
        pq.write_table(pa.table({"image": [jpeg(), jpeg(seed=1)], "label": [0, 1], "id": ["s1", f"{folder}2"]}),
                       tmp_path / folder / "part-0.parquet")
    ids = ParquetSource(str(tmp_path)).samples().column("sample_id").to_pylist()
    assert ids == ["a/part-0:0", "a/part-0:1", "b/part-0:0", "b/part-0:1"]
    with pytest.raises(DataError, match=r"1 duplicate sample id\(s\), e.g. \['s1'\]; 's1' at: .*a/part-0\.parquet "
                                        r"row 0; .*b/part-0\.parquet row 0"):
        ParquetSource(str(tmp_path), id_column="id").samples()


@pytest.mark.parametrize("label", ["nan", "", "2", "roadwork"])
def test_csv_labels_outside_0_1_name_the_row(label, tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "l.csv").write_text(f"path,label\na.jpg,1\na.jpg,{label}\n")
    with pytest.raises(DataError, match=r"l\.csv: 1 label\(s\) outside \{0, 1\} \(row 1: "):
        CsvSource(str(tmp_path / "l.csv")).samples()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", ["parquet", "npz"])
def test_nan_or_inf_features_name_the_file_and_rows(bad, fmt, tmp_path):
    values = np.ones((5, 3), np.float32)
    values[3, 1] = bad
    ids = np.array([f"s{i}" for i in range(5)])
    path = tmp_path / f"det.{fmt}"
    if fmt == "npz":
        np.savez(path, sample_id=ids, features=values)
    else:
        pq.write_table(pa.table({"sample_id": ids, **{f"f{k}": values[:, k] for k in range(3)}}), path)
    with pytest.raises(FeatureStoreError, match=rf"det\.{fmt}: features hold NaN or inf \(rows \[3\]\)"):
        read_external(path)
