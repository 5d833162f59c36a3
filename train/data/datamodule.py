"""The LightningDataModule every image task uses: one index, five splits, validator levels."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, Dataset

from train.data.gpu_augment import GpuAugment
from train.data.images import ImageReader, decode_rgb, loader_worker_init
from train.data.index import build_index, where
from train.data.queries import ResizedQueries, query_store
from train.data.sampling import EpochSampler
from train.data.shards import ShardDataset, as_batch
from train.data.sources import DataError
from train.data.splits import SPLITS
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ModelInput, TrainTransform, ValidatorQuery, decode_query
from train.utils.files import atomic_write_json

log = logging.getLogger(__name__)
BALANCE = ("none", "sampler", "class_weights")
TRAIN_SOURCES = ("jpeg", "shards")


class ImageDataset(Dataset):
    """Samples of one split: ``{"image": tensor, "label": int, "index": position}``, plus whatever
    ``fields(image)`` adds (per-sample work a task moves into the loader workers, e.g. APT's patch selection).

    ``level=None``: ``transform(source image, position, seed)`` (training). A validator ``level``:
    ``transform(query image)``, the query as :meth:`query` gives it.
    """

    def __init__(self, index: pa.Table, transform, decode_side: int | None = 256, fields=None, level: int | None = None,
                 eval_seed: int = 0, queries: dict | None = None):
        self.files = index.column("file").to_pylist()
        self.rows = index.column("row").to_numpy()
        self.columns = index.column("column").to_pylist()
        self.labels = index.column("label").to_numpy()
        self.transform, self.decode_side, self.fields = transform, decode_side, fields
        self.level, self.eval_seed = level, eval_seed
        self.queries = dict(queries or {})  # level -> QueryStore (the run's rendered queries)
        self.resized: ResizedQueries | None = None  # the ``level`` queries as model inputs, before normalising
        self.reader = ImageReader()
        self._validator: dict[int, ValidatorQuery] = {}
        self._resized_at: dict[int, ResizedQueries | None] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key`` is a position, or ``(position, augmentation seed)`` from :class:`EpochSampler`."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        if self.level is None:
            image = self.transform(self.image(i), i, seed)
        elif self.resized is not None:  # the query decoded and resized once per run
            image = self.transform.normalized(self.resized[i])
        else:
            image = self.transform(self.query(i, self.level))
        extra = self.fields(image) if self.fields is not None else {}
        return {"image": image, "label": int(self.labels[i]), "index": i, **extra}

    def image(self, i: int, full: bool = False) -> np.ndarray:
        """Sample ``i`` decoded to RGB, before any transform (``full``: at its own resolution, as the validator
        reads it, instead of ``decode_side``)."""
        file, row = self.files[i], int(self.rows[i])
        data = self.reader.read(file, row, self.columns[i])
        return decode_rgb(data, max_side=None if full else self.decode_side, where=where(file, row))

    def model_input(self, i: int, level: int) -> torch.Tensor:
        """Sample ``i``'s query at ``level`` as the model's normalised input (a query split's ``transform`` is its
        :class:`ModelInput`): read from the run's resized queries when an earlier reader wrote them for that level,
        decoded and resized here otherwise (the same values either way)."""
        if level == self.level and self.resized is not None:
            resized = self.resized
        else:
            if level not in self._resized_at:
                store = self.queries.get(level)
                self._resized_at[level] = None if store is None else ResizedQueries.existing(store, self.transform)
            resized = self._resized_at[level]
        if resized is None:
            return self.transform(self.query(i, level))
        return self.transform.normalized(resized[i])

    def query(self, i: int, level: int) -> np.ndarray:
        """Sample ``i`` as the validator's 224 px query at ``level`` (RGB): read from the run's rendered queries when
        they hold this level, rendered here otherwise (the same pixels either way)."""
        store = self.queries.get(level)
        if store is not None:
            return decode_query(store[i], i)
        if level not in self._validator:
            self._validator[level] = ValidatorQuery(level, self.eval_seed)
        return self._validator[level](self.image(i), i)


class RoadworkDataModule(pl.LightningDataModule):
    """Builds the run's sample index from a source, then serves each split.

    ``val_levels`` / ``test_levels`` are validator augmentation levels: each gets its own
    dataloader, so every metric is reported per level. ``sample_fields``, when a task sets it, is a
    picklable ``image -> dict`` whose entries are added to every sample (in the loader workers).
    ``train_source=shards`` trains from the run's decode-once shards (``shards_path``, written by ``task=prepare``)
    with ``gpu_augment`` (a partial of :class:`GpuAugment`) applied on the device. ``copy_stream``: batches go to a
    CUDA device on a side stream (:meth:`transfer_batch_to_device`). ``augment_draws``: each training sample's
    augmentations cycle through that many draws over the epochs (:class:`EpochSampler`; None: new ones every epoch).
    """

    def __init__(self, source, splits: dict, split_seed: int = 0, verify_images: bool = True,
                 max_bad_fraction: float = 0.02, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 2, balance: str = "none", img_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 train_transforms: Sequence = (), val_levels: Sequence[int] = (0,),
                 test_levels: Sequence[int] = (0, 1, 2, 3), eval_seed: int = 0, query_cache: bool = True,
                 index_path: str | None = None, root: str | None = None, seed: int = 0, train_source: str = "jpeg",
                 gpu_augment=None, pin_memory: bool = True, shards_path: str | None = None,
                 copy_stream: bool = True, augment_draws: int | None = None, validator_augment: float = 0.0):
        super().__init__()
        if balance not in BALANCE:
            raise ValueError(f"data.balance={balance!r}; allowed: {list(BALANCE)}")
        if train_source not in TRAIN_SOURCES:
            raise ValueError(f"data.train_source={train_source!r}; allowed: {list(TRAIN_SOURCES)}")
        if validator_augment and train_source == "shards":
            raise ValueError("data.validator_augment crops the validator's queries from the full source image, which "
                             "the shards (a downscaled centre square) do not keep: use data.train_source=jpeg")
        self.source, self.splits, self.split_seed = source, dict(splits), split_seed
        self.verify_images, self.max_bad_fraction = verify_images, max_bad_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.balance, self.img_size = num_workers, balance, img_size
        self.mean, self.std, self.train_transforms = tuple(mean), tuple(std), list(train_transforms)
        self.val_levels, self.test_levels, self.eval_seed = list(val_levels), list(test_levels), eval_seed
        self.query_cache = query_cache  # render each split's validator queries once per run (train/data/queries.py)
        self.seed = seed  # training order and augmentation draws, per epoch (see EpochSampler)
        self.index_path = Path(index_path) if index_path else None
        self.index: pa.Table | None = None
        self.sample_fields = None
        self.train_source, self.pin_memory, self.shards_path = train_source, pin_memory, shards_path
        self.copy_stream, self._streams = copy_stream, {}
        self.augment_draws = augment_draws
        self.validator_augment = validator_augment  # probability a training image is the validator's exact query
        self.resume_epoch = self.resume_skip = 0  # set from a checkpoint (load_state_dict)
        self.gpu_augment = (gpu_augment or GpuAugment)(img_size=self.img_size, mean=self.mean, std=self.std)

    # --- building the index (the `data` stage) ---------------------------------------------
    def prepare_data(self) -> None:
        if self.index_path is None:  # once indexed, the source is not touched again
            self.source.prepare()

    def build_index(self, out_dir: Path) -> tuple[Path, dict]:
        """Write ``index.parquet`` and ``data_stats.json`` into ``out_dir``; returns (path, stats)."""
        self.source.prepare()
        index, stats = build_index(self.source.samples(), self.splits, self.split_seed, self.verify_images,
                                   self.max_bad_fraction, workers=max(1, self.num_workers))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "index.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(index, tmp)
        tmp.replace(path)
        atomic_write_json(out_dir / "data_stats.json", {"source": getattr(self.source, "name", ""), **stats})
        self.index_path, self.index = path, index
        return path, stats

    # --- serving splits ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.index is None:
            if self.index_path is None:
                raise DataError("no sample index: run the data stage first (`python -m train task=data`) "
                                "or pass index_path")
            self.index = pq.read_table(self.index_path)

    def split(self, name: str) -> pa.Table:
        """The index's rows of split ``name`` as a pyarrow table; an unknown or empty split is an error."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {list(SPLITS)}")
        self.setup()
        table = self.index.filter(pc.equal(self.index.column("split"), name))
        if table.num_rows == 0:
            raise DataError(f"split '{name}' is empty in {self.index_path}")
        return table

    def class_counts(self, name: str = "train") -> np.ndarray:
        """Samples of each label (0, 1) in split ``name``."""
        return np.bincount(self.split(name).column("label").to_numpy(), minlength=2)

    @property
    def class_weights(self) -> torch.Tensor | None:
        """Inverse-frequency loss weights when ``balance=class_weights``, else None."""
        if self.balance != "class_weights":
            return None
        counts = self.class_counts().astype(np.float64)
        return torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32)

    def dataset(self, name: str, level: int | None = None) -> ImageDataset:
        """Split ``name`` with training augmentation (``level=None``) or as validator ``level`` queries."""
        if level is None:  # training crops end at img_size: decoding at 2x that is enough (JPEG draft mode), unless
            # some samples are the validator's queries, which it crops from the full image
            transform = TrainTransform(self.train_transforms, self.img_size, self.mean, self.std,
                                       self.validator_augment)
            side = None if self.validator_augment else 2 * self.img_size
            return ImageDataset(self.split(name), transform, decode_side=side, fields=self.sample_fields)
        return self.queries(name, [level], level=level)

    def queries(self, name: str, levels: Sequence[int], level: int | None = None) -> ImageDataset:
        """Split ``name`` whose :meth:`ImageDataset.query` serves each of ``levels`` (rendered once per run when
        ``query_cache``); its items are the model inputs of the ``level`` queries (default: the first of ``levels``)."""
        level = levels[0] if level is None else level
        images = ImageDataset(self.split(name), ModelInput(self.img_size, self.mean, self.std),
                              decode_side=None, fields=self.sample_fields, level=level,
                              eval_seed=self.eval_seed)  # the validator crops from the full image
        if self.query_cache and self.index_path is not None:
            images.queries = {int(lv): query_store(images, self.index_path.parent / "queries", name, int(lv),
                                                   self.eval_seed, self.num_workers) for lv in dict.fromkeys(levels)}
            if level in images.queries:
                images.resized = ResizedQueries(images.queries[level], images.transform, self.num_workers)
        return images

    def loader(self, dataset: ImageDataset, sampler=None, batch_size: int | None = None):
        """In order (evaluation), or in the sampler's order (training)."""
        return DataLoader(dataset, batch_size=batch_size or self.eval_batch_size,
                          sampler=sampler, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, worker_init_fn=loader_worker_init,
                          generator=torch.Generator().manual_seed(self.seed), drop_last=False)

    def train_dataloader(self) -> DataLoader:
        if self.train_source == "shards":
            if self.sample_fields is None:
                return self.shard_loader()
            log.info("data.train_source=shards: this task adds per-sample fields to the final image, so it "
                     "trains from the JPEG path")
        ds = self.dataset("train")
        return self.loader(ds, sampler=self.train_sampler(ds.labels), batch_size=self.batch_size)

    def train_sampler(self, labels: np.ndarray) -> EpochSampler:
        """The training order (class-balanced draws with ``balance=sampler``), from the resumed epoch (and batch) on
        resume."""
        weights = (1.0 / np.maximum(self.class_counts(), 1))[labels] if self.balance == "sampler" else None
        return EpochSampler(len(labels), self.seed, weights, epoch=self.resume_epoch, skip=self.resume_skip,
                            draws=self.augment_draws)

    def state_dict(self) -> dict:
        """Saved in checkpoints: the epoch whose order the training sampler draws next, and the samples of it already
        trained on when the checkpoint was saved inside the epoch (preemption). A resumed fit makes its train
        loader's iterator (the workers prefetch from it) before Lightning calls ``set_epoch``, so the sampler must
        start there."""
        if not self.trainer:
            return {}
        loop = self.trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.processed
        inside = 0 < done < self.trainer.num_training_batches
        if inside and self.trainer.world_size > 1:
            log.warning("a checkpoint inside an epoch under %d processes: a resume restarts that epoch's order",
                        self.trainer.world_size)
        skip = done * self.batch_size if inside and self.trainer.world_size == 1 else 0
        return {"sampler_epoch": loop.epoch_progress.current.processed, "sampler_skip": skip}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_epoch = int(state_dict.get("sampler_epoch", 0))
        self.resume_skip = int(state_dict.get("sampler_skip", 0))

    def val_dataloader(self) -> list[DataLoader]:
        return [self.loader(self.dataset("val", level)) for level in self.val_levels]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.loader(self.dataset("test", level)) for level in self.test_levels]

    # --- training from decode-once shards (data.train_source=shards) -------------------------
    def shard_loader(self) -> DataLoader:
        """uint8 batches of the train split's shard in :class:`EpochSampler`'s order, with each sample's augmentation
        drawn from its seed in the workers; :meth:`on_after_batch_transfer` applies it on the device."""
        if self.shards_path is None:
            raise DataError("data.train_source=shards: this run has no shards; run "
                            "`python -m train task=prepare run_dir=<run>` first")
        ds = ShardDataset(self.shards_path, "train", self.gpu_augment)
        labels = self.split("train").column("label").to_numpy()
        if not np.array_equal(ds.labels, labels):
            raise DataError(f"the shards in {Path(self.shards_path).parent} do not match the run's train split: "
                            "rerun task=prepare")
        # sampler + batch_size (not a batch_sampler): under DDP Lightning wraps the sampler and keeps the batch size;
        # the fetcher hands each batch's keys to ShardDataset.__getitems__ at once
        return DataLoader(ds, sampler=self.train_sampler(labels), batch_size=self.batch_size, collate_fn=as_batch,
                          num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, worker_init_fn=loader_worker_init,
                          generator=torch.Generator().manual_seed(self.seed))

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """To a CUDA device on a side stream (one per device): the copy (a shard batch of 256 is 50 MB) then runs
        beside the kernels of the step before, which the host has queued ahead, instead of holding up the compute
        stream; that stream waits for the copy only from here on."""
        if not self.copy_stream or device.type != "cuda":
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        compute, side = torch.cuda.current_stream(device), self._streams[device]
        with torch.cuda.stream(side):
            batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        compute.wait_stream(side)
        # allocated on the side stream: freed memory is reused only once the compute stream is done with it
        apply_to_collection(batch, torch.Tensor, lambda t: t.record_stream(compute) if t.is_cuda else None)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Shard batches (uint8 + augmentation parameters) are augmented and normalised here, on the device."""
        if isinstance(batch, dict) and "augment" in batch:
            images = self.gpu_augment(batch["image"], batch.pop("augment"))
            if self.trainer is not None and not isinstance(self.trainer.precision_plugin, MixedPrecision):
                # Lightning converted the batch before the transfer, when it was uint8: a model in bf16 (DeepSpeed's
                # bf16, "bf16-true") wants bf16 images; under autocast ("*-mixed") float32 stays as measured
                images = self.trainer.precision_plugin.convert_input(images)
            batch["image"] = images
        return batch
