"""Where samples come from: the synthetic generator, NATIX parquet, an image folder, a CSV.

Every source has ``prepare()`` (make the data available: generate, check paths) and
``samples()`` returning one table in the index schema below. Image bytes stay where they are;
the index says where (``file``, ``row``, ``column``) and :class:`~train.data.images.ImageReader`
reads them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("file", pa.string()),
    ("row", pa.int64()),      # row in a parquet file, -1 for an image file
    ("column", pa.string()),  # image column of a parquet file, "" for an image file
    ("label", pa.int64()),
    ("scene_id", pa.string()),
    ("view", pa.int64()),
    ("difficulty", pa.float32()),  # NaN where the source does not know it
    ("scene_description", pa.string()),
])
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "image_bytes", "bytes")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CLASS_DIRS = {"none": 0, "0": 0, "roadwork": 1, "1": 1}


class DataError(ValueError):
    """Input data that cannot be used as given; the message names the file, column or key."""


def make_index(n: int, **columns) -> pa.Table:
    """Build an index table, filling optional columns with their defaults."""
    defaults = {"row": np.full(n, -1), "column": [""] * n, "view": np.zeros(n, dtype=np.int64),
                "difficulty": np.full(n, np.nan, dtype=np.float32), "scene_description": [""] * n}
    data = {**defaults, **columns}
    if "scene_id" not in data:
        data["scene_id"] = data["sample_id"]
    table = pa.table({f.name: pa.array(data[f.name], type=f.type) for f in INDEX_SCHEMA}, schema=INDEX_SCHEMA)
    check_unique_ids(table)
    return table


def check_labels(labels, where: str) -> np.ndarray:
    """Labels must be 0 (None) or 1 (Roadwork); the error names the rows that are not."""
    arr = np.asarray(labels, dtype=object)
    bad = [i for i, v in enumerate(arr) if v is None or str(v) not in ("0", "1", "0.0", "1.0", "True", "False")]
    if bad:
        shown = ", ".join(f"row {i}: {arr[i]!r}" for i in bad[:5])
        raise DataError(f"{where}: {len(bad)} label(s) outside {{0, 1}} ({shown}); "
                        "labels must be 0 = None, 1 = Roadwork")
    return np.array([int(float(v)) if not isinstance(v, bool) else int(v) for v in arr], dtype=np.int64)


def check_unique_ids(table: pa.Table) -> None:
    """Sample ids must be unique (features, predictions and splits are keyed by them); the error names where the
    first duplicate occurs."""
    ids = table.column("sample_id").to_numpy(zero_copy_only=False).astype(str)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][:5].tolist()
        files, rows = table.column("file").to_pylist(), table.column("row").to_pylist()
        at = [f"{files[i]} row {rows[i]}" if rows[i] >= 0 else files[i] for i in np.flatnonzero(ids == dup[0])[:3]]
        raise DataError(f"{int((counts > 1).sum())} duplicate sample id(s), e.g. {dup}; {dup[0]!r} at: "
                        f"{'; '.join(at)}")


def _require_exists(path: Path, key: str) -> Path:
    if not path.exists():
        raise DataError(f"{key}={path} does not exist")
    return path


class ParquetSource:
    """Parquet files as the NATIX dataset ships them: an image column, ``label``, ``scene_description``.

    The image column is found by name (or set ``image_column``); cells may be raw bytes or the
    Hugging Face ``{"bytes", "path"}`` struct. Optional columns used when present: ``scene_id``,
    ``view``, ``difficulty``, and ``id_column`` for sample ids.
    """

    name = "natix"

    def __init__(self, root: str, image_column: str | None = None, label_column: str = "label",
                 id_column: str | None = None):
        self.root = Path(root)
        self.image_column, self.label_column, self.id_column = image_column, label_column, id_column

    def prepare(self) -> None:
        """Check that ``root`` is or holds parquet files."""
        self.files()

    def files(self) -> list[Path]:
        """The parquet files: ``root`` itself, or every ``*.parquet`` under it, sorted."""
        root = _require_exists(self.root, "data.root")
        files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
        if not files:
            raise DataError(f"data.root={root} holds no .parquet files")
        return files

    def find_image_column(self, schema: pa.Schema, file: Path) -> str:
        """The image column of ``file``: ``image_column`` when set, else a usual name, else the first binary column
        or struct with a ``bytes`` field."""
        if self.image_column:
            if self.image_column not in schema.names:
                raise DataError(f"{file}: image column '{self.image_column}' not found; columns: {schema.names}")
            return self.image_column
        for name in IMAGE_COLUMN_NAMES:
            if name in schema.names:
                return name
        for f in schema:
            if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or (
                    pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0):
                return f.name
        raise DataError(f"{file}: no image column (looked for {list(IMAGE_COLUMN_NAMES)} or a binary column); "
                        f"columns: {schema.names}; set data.source.image_column")

    def samples(self) -> pa.Table:
        """The index rows of every file (sample ids unique across the files)."""
        table = pa.concat_tables([self._file_samples(f) for f in self.files()])
        check_unique_ids(table)  # across files too
        return table

    def _file_samples(self, file: Path) -> pa.Table:
        schema = pq.read_schema(file)
        image_col = self.find_image_column(schema, file)
        if self.label_column not in schema.names:
            raise DataError(f"{file}: label column '{self.label_column}' not found; columns: {schema.names}")
        wanted = [self.label_column, "scene_id", "view", "difficulty", "scene_description", self.id_column]
        meta = pq.read_table(file, columns=[c for c in dict.fromkeys(wanted) if c and c in schema.names])
        n = meta.num_rows
        col = lambda name: meta.column(name).to_pylist() if name in meta.column_names else None  # noqa: E731
        stem = file.relative_to(self.root).with_suffix("").as_posix() if self.root.is_dir() else file.stem
        ids = [str(v) for v in col(self.id_column)] if self.id_column and col(self.id_column) else \
            [f"{stem}:{i}" for i in range(n)]
        extra = {k: v for k, v in {"scene_id": col("scene_id"), "view": col("view"),
                                     "difficulty": col("difficulty"),
                                     "scene_description": col("scene_description")}.items() if v is not None}
        if "scene_id" in extra:
            extra["scene_id"] = [str(s) for s in extra["scene_id"]]
        if "difficulty" in extra:
            extra["difficulty"] = [np.nan if v is None else v for v in extra["difficulty"]]
        return make_index(n, sample_id=ids, file=[str(file.resolve())] * n, row=np.arange(n),
                          column=[image_col] * n, label=check_labels(col(self.label_column), str(file)), **extra)


class ImageFolderSource:
    """Class subfolders ``None/`` and ``Roadwork/`` (or ``0/`` and ``1/``) under ``root``."""

    name = "imagefolder"

    def __init__(self, root: str):
        self.root = Path(root)

    def prepare(self) -> None:
        """Check that ``root`` has both class subfolders."""
        self.class_dirs()

    def class_dirs(self) -> dict[Path, int]:
        """Class subfolder -> label (``None``/``0`` -> 0, ``Roadwork``/``1`` -> 1, in any case); both must be there."""
        root = _require_exists(self.root, "data.root")
        dirs = {d: CLASS_DIRS[d.name.lower()] for d in sorted(root.iterdir())
                if d.is_dir() and d.name.lower() in CLASS_DIRS}
        if sorted(set(dirs.values())) != [0, 1]:
            found = sorted(d.name for d in root.iterdir() if d.is_dir())
            raise DataError(f"data.root={root} needs class subfolders None/ and Roadwork/ (or 0/ and 1/); "
                            f"found {found}")
        return dirs

    def samples(self) -> pa.Table:
        """One index row per image file under the class subfolders; the sample id is its path relative to ``root``."""
        files, labels = [], []
        for d, label in self.class_dirs().items():
            for f in sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
                files.append(f.resolve())
                labels.append(label)
        ids = [str(f.relative_to(self.root.resolve())) for f in files]
        return make_index(len(files), sample_id=ids, file=[str(f) for f in files], label=labels)


class CsvSource:
    """A CSV file with ``path,label`` (optionally ``scene_id``); paths relative to the CSV's folder."""

    name = "csv"

    def __init__(self, root: str, path_column: str = "path", label_column: str = "label"):
        self.root, self.path_column, self.label_column = Path(root), path_column, label_column

    def prepare(self) -> None:
        """Check that the CSV file exists."""
        _require_exists(self.root, "data.root")

    def samples(self) -> pa.Table:
        """One index row per line of the CSV; the sample id is the path as written, and every image must exist."""
        table = pacsv.read_csv(_require_exists(self.root, "data.root"),
                               convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        for c in (self.path_column, self.label_column):
            if c not in table.column_names:
                raise DataError(f"{self.root}: column '{c}' not found; columns: {table.column_names}")
        base = self.root.resolve().parent
        rel = [str(p) for p in table.column(self.path_column).to_pylist()]
        files = [p if Path(p).is_absolute() else base / p for p in map(Path, rel)]
        missing = [f"row {i}: {f}" for i, f in enumerate(files) if not Path(f).is_file()]
        if missing:
            raise DataError(f"{self.root}: {len(missing)} image path(s) do not exist ({'; '.join(missing[:5])})")
        extra = {"scene_id": [str(s) for s in table.column("scene_id").to_pylist()]} \
            if "scene_id" in table.column_names else {}
        return make_index(len(files), sample_id=rel, file=[str(f) for f in files],
                          label=check_labels(table.column(self.label_column).to_pylist(), str(self.root)), **extra)
