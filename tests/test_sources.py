"""Sources, the sample index and splits: real layouts work, bad input fails clearly or is counted."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bad_images import jpeg, unusable, usable
from train.data.index import build_index
from train.data.sources import CsvSource, DataError, ImageFolderSource, ParquetSource
from train.data.splits import assign_splits

SPLITS = {"train": 0.5, "meta": 0.1, "val": 0.1, "calib": 0.15, "test": 0.15}


def natix_parquet(path, n=40, labels=None, image_column="image", struct=True, extra=None):
    images = [jpeg(seed=i) for i in range(n)]
    cells = [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)] if struct else images
    table = pa.table({image_column: cells, "label": labels if labels is not None else [i % 2 for i in range(n)],
                      "scene_description": [f"scene {i}" for i in range(n)], **(extra or {})})
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("struct", [True, False])
def test_natix_parquet_image_column_found_and_read(tmp_path, struct):
    natix_parquet(tmp_path / "train-0.parquet", n=30, image_column="jpg" if not struct else "image", struct=struct)
    source = ParquetSource(str(tmp_path))
    samples = source.samples()
    assert samples.num_rows == 30
    assert samples.column("label").to_pylist() == [i % 2 for i in range(30)]
    index, stats = build_index(samples, SPLITS, workers=1)
    assert stats["skipped_total"] == 0 and sum(s["n"] for s in stats["splits"].values()) == 30


def test_parquet_without_image_column_names_file_and_columns(tmp_path):
    pq.write_table(pa.table({"label": [0, 1], "text": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet: no image column.*\['label', 'text'\]"):
        ParquetSource(str(tmp_path)).samples()


def test_labels_outside_0_1_name_file_and_rows(tmp_path):
    natix_parquet(tmp_path / "bad.parquet", n=6, labels=[0, 1, 2, 1, -1, 0])
    with pytest.raises(DataError, match=r"bad\.parquet: 2 label\(s\) outside \{0, 1\} \(row 2: 2, row 4: -1\)"):
        ParquetSource(str(tmp_path)).samples()


def test_missing_label_column_and_missing_root(tmp_path):
    pq.write_table(pa.table({"image": [jpeg()]}), tmp_path / "nolabel.parquet")
    with pytest.raises(DataError, match="label column 'label' not found"):
        ParquetSource(str(tmp_path)).samples()
    with pytest.raises(DataError, match="data.root=.*nowhere does not exist"):
        ParquetSource(str(tmp_path / "nowhere")).prepare()


def test_duplicate_ids_are_an_error(tmp_path):
    natix_parquet(tmp_path / "d.parquet", n=4, extra={"id": ["a", "b", "a", "c"]})
    with pytest.raises(DataError, match=r"1 duplicate sample id\(s\), e.g. \['a'\]"):
        ParquetSource(str(tmp_path), id_column="id").samples()


def test_bad_images_are_skipped_and_counted(tmp_path):
    good = [jpeg(seed=i) for i in range(200)] + list(usable().values())
    bad = [data for data, _ in unusable().values()]
    cells = [{"bytes": b, "path": None} for b in good + bad]
    pq.write_table(pa.table({"image": cells, "label": [i % 2 for i in range(len(cells))]}), tmp_path / "m.parquet")
    index, stats = build_index(ParquetSource(str(tmp_path)).samples(), SPLITS, workers=1, max_bad_fraction=0.05)
    assert stats["skipped"] == {"empty": 1, "undecodable": 2, "too_small": 1}
    assert index.num_rows == len(good) and stats["skipped_total"] == 4


def test_too_many_bad_images_abort_naming_files(tmp_path):
    cells = [{"bytes": jpeg(seed=i), "path": None} for i in range(20)] + [{"bytes": b"", "path": None}] * 5
    pq.write_table(pa.table({"image": cells, "label": [0, 1] * 12 + [0]}), tmp_path / "many.parquet")
    with pytest.raises(DataError, match=r"(?s)5 of 25 images are unusable.*many\.parquet row 20: empty image"):
        build_index(ParquetSource(str(tmp_path)).samples(), SPLITS, workers=1, max_bad_fraction=0.02)


def test_empty_split_is_an_error(tmp_path):
    natix_parquet(tmp_path / "few.parquet", n=3)
    with pytest.raises(DataError, match="split '.*' is empty"):
        build_index(ParquetSource(str(tmp_path)).samples(), SPLITS, workers=1)


def test_imagefolder_layouts(tmp_path):
    for cls, n in (("None", 3), ("Roadwork", 4)):
        (tmp_path / "a" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "a" / cls / f"{i}.jpg").write_bytes(jpeg(seed=i))
    samples = ImageFolderSource(str(tmp_path / "a")).samples()
    assert sorted(samples.column("label").to_pylist()) == [0, 0, 0, 1, 1, 1, 1]
    (tmp_path / "b" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match=r"needs class subfolders None/ and Roadwork/.*\['cats'\]"):
        ImageFolderSource(str(tmp_path / "b")).samples()


def test_csv_source_and_missing_paths(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(seed=i))
    (tmp_path / "labels.csv").write_text("path,label,scene_id\n" + "".join(f"img/{i}.jpg,{i % 2},s{i // 2}\n" for i in range(4)))
    samples = CsvSource(str(tmp_path / "labels.csv")).samples()
    assert samples.column("scene_id").to_pylist() == ["s0", "s0", "s1", "s1"]
    (tmp_path / "broken.csv").write_text("path,label\nimg/0.jpg,1\nimg/missing.jpg,0\n")
    with pytest.raises(DataError, match=r"1 image path\(s\) do not exist \(row 1: .*missing\.jpg\)"):
        CsvSource(str(tmp_path / "broken.csv")).samples()
    (tmp_path / "nolabel.csv").write_text("path\nimg/0.jpg\n")
    with pytest.raises(DataError, match="column 'label' not found"):
        CsvSource(str(tmp_path / "nolabel.csv")).samples()


def test_splits_are_scene_disjoint_deterministic_and_proportional():
    scenes = [f"s{i // 3}" for i in range(6000)]  # 2000 scenes x 3 views
    split = assign_splits(scenes, SPLITS, seed=1)
    assert (split == assign_splits(scenes, SPLITS, seed=1)).all()
    assert not (split == assign_splits(scenes, SPLITS, seed=2)).all()
    per_scene = {}
    for s, name in zip(scenes, split):
        per_scene.setdefault(s, set()).add(name)
    assert all(len(v) == 1 for v in per_scene.values())
    for name, fraction in SPLITS.items():
        assert abs((split == name).mean() - fraction) < 0.01


@pytest.mark.parametrize("bad,message", [({"train": 0.5, "test": 0.4}, "sum to 1"),
                                         ({"train": 0.9, "tset": 0.1}, r"unknown split\(s\) \['tset'\]")])
def test_split_fractions_are_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        assign_splits(["a", "b"], bad)


def test_index_stats_written(tmp_path):
    natix_parquet(tmp_path / "s.parquet", n=60)
    from train.data.datamodule import RoadworkDataModule
    dm = RoadworkDataModule(ParquetSource(str(tmp_path / "s.parquet")), SPLITS, num_workers=0)
    path, stats = dm.build_index(tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    assert on_disk["total"] == 60 and pq.read_table(path).num_rows == 60
    assert set(np.unique(pq.read_table(path).column("split").to_pylist())) == set(SPLITS)
