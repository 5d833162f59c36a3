"""The fusion head: the presence mask removes a modality's influence exactly, in every fusion variant; ModDrop; and
task=features -> task=fusion -> export end to end on a copy of the cheap-tiers run (resumable store, an external
file joined by id, a head that learns, calibration, threshold, ONNX parity from the bundle)."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import QUIET, TIERS, compose_config, copy_run

from train.__main__ import run_task
from train.data.feature_store import FeatureStore, load_split
from train.data.splits import scene_groups
from train.export import Bundle
from train.metrics import roadwork_prob
from train.models.fusion import FusionNet, conditions, load_fusion, modality_dropout
from train.tiers.training import build_datamodule

VARIANTS = [{"kind": "bottleneck"}, {"kind": "concat"}, {"kind": "gmu"}, {"kind": "late"},
            {"kind": "bottleneck", "meta": True}, {"kind": "concat", "meta": True}]
DIMS = {"a": 5, "b": 7, "c": 3}
FUSED = ["stage1", "draft", "views", "detector"]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v["kind"] + ("+meta" if v.get("meta") else ""))
def test_presence_mask_removes_a_modalitys_influence(variant, one_thread):
    torch.manual_seed(0)
    net = FusionNet(DIMS, width=16, hidden=32, **variant)
    with torch.no_grad():  # trained-looking weights: every parameter away from its initial value
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    net.eval()
    features = [torch.randn(64, d) for d in DIMS.values()]
    present = torch.rand(64, 3) > 0.4
    present[:4] = torch.tensor([[True, True, True], [False, False, False], [True, False, False], [False, True, True]])
    out = net(features, present)
    for m in range(3):
        changed = [f.clone() for f in features]
        changed[m][~present[:, m]] = torch.randn_like(changed[m][~present[:, m]]) * 1e3  # absent: any values
        assert (net(changed, present) - out).abs().max() <= 1e-6
        moved = [f.clone() for f in features]
        moved[m] += 1.0  # the same change where the modality is present does move the output
        rows = present[:, m]
        assert (net(moved, present) - out)[rows].abs().max() > 1e-3
    assert torch.isfinite(net(features, torch.zeros_like(present))).all()  # nothing present: still defined


def test_modality_dropout_hides_modalities_but_keeps_one_per_row():
    present = torch.ones(20000, 4, dtype=torch.bool)
    present[:, 3] = False
    kept = modality_dropout(present, 0.3, torch.Generator().manual_seed(0))
    assert not (kept & ~present).any() and kept.any(1).all()
    assert 0.6 < kept[:, :3].float().mean() < 0.72  # about 1 - p, a little more for the rescued rows
    assert torch.equal(modality_dropout(present, 0.0), present)


@pytest.fixture(scope="module")
def fusion_run(cheap_tiers, data_dir, tmp_path_factory, one_thread):
    """features (small modalities + an external file) -> fusion -> export on a copy of the cheap-tiers run.

    The tiny run's meta split has 30 images: the fusion there reads the logits / margins only and leaves the colour
    statistics out (on 30 images they are memorised, not learnt); the embedded default fuses everything."""
    run, _ = cheap_tiers
    root = tmp_path_factory.mktemp("fusion")
    run = copy_run(run, root)
    index = pq.read_table(run.artifact("data", "index"))
    ids, labels = np.asarray(index.column("sample_id").to_pylist()), index.column("label").to_numpy()
    rng = np.random.default_rng(0)
    covered = rng.random(len(ids)) < 0.9  # a "detector" that saw 90% of the samples; its score is noisy but
    # informative (built from the label here only to have a controlled signal the head must learn to use)
    signal = np.stack([labels + rng.normal(0, 0.25, len(ids)), rng.normal(size=len(ids))], 1)[covered]
    np.savez(root / "detector.npz", sample_id=ids[covered], features=signal)
    base = [f"paths.root_dir={root}", *QUIET, f"run_dir={run.path}", "debug=tiny", "pipeline=stage1",
            f"paths.data_dir={data_dir}", "features.levels=[0,1]", "features.shard_size=40",
            "features.modalities.views.tiles=[2]", "features.modalities.views.zooms=[0.5]",
            "features.modalities.views.random_zooms=0", f"+features.external.detector={root / 'detector.npz'}",
            *[f"features.modalities.{m}.embedding=false" for m in ("stage1", "draft", "views")],
            "features.modalities.stats.hue_bins=6", "features.modalities.stats.sat_bins=2",
            "features.modalities.stats.value_bins=4", "features.modalities.stats.grid=2",
            f"fusion.modalities=[{','.join(FUSED)}]", "fusion.epochs=30", "fusion.batch_size=16",
            "fusion.bootstrap=200",
            "fusion.module.net.width=32", "fusion.module.net.hidden=64", "fusion.module.moddrop=0.5",
            "fusion.min_accepted=10", "fusion.single_modality=true",
            "+fusion.compare={late:{kind:late},gmu:{kind:gmu}}"]
    run_task(compose_config(*base, "task=features"))
    run_task(compose_config(*base, "task=fusion"))
    cfg = compose_config(*base, "task=export", f"export.models=[{','.join(TIERS)},fusion]")
    run_task(cfg)
    return run, cfg, base


def test_feature_store_holds_every_modality_and_resumes(fusion_run):
    run, _, base = fusion_run
    store = FeatureStore(run.artifact("features", "manifest").parent)
    assert store.modalities == ["stage1", "draft", "views", "stats", "detector"]
    producers = {m: store.manifest["modalities"][m]["producer"] for m in store.modalities}
    assert producers["stage1"]["tier"] == "stage1" and len(producers["draft"]["weights_sha256"]) == 64
    assert producers["detector"]["kind"] == "external"
    meta = store.read_split("meta")
    n_meta = run.read()["tasks"]["features"]["metrics"]
    assert set(meta["level"].tolist()) == {0, 1} and len(meta["label"]) == 2 * len(set(meta["index"].tolist()))
    assert 0 < n_meta["detector/missing/test"] < len(store.read_split("test")["label"])  # counted, stored absent
    assert meta["has_stats"].all() and not meta["has_detector"].all()

    before = store.read_split("calib", ["stats"])["stats"]
    store.shard_path("calib", "stats", 0).unlink()  # an interrupted run: rerunning writes only what is missing
    run_task(compose_config(*base, "task=features"))
    report = json.loads((store.root / "report.json").read_text())
    assert report["modalities"]["stats"]["shards_written"] == {"meta": 0, "calib": 1, "test": 0}
    assert report["modalities"]["stage1"]["shards_written"] == {"meta": 0, "calib": 0, "test": 0}
    np.testing.assert_array_equal(FeatureStore(store.root).read_split("calib", ["stats"])["stats"], before)


def test_fusion_learns_calibrates_and_reports_robustness(fusion_run):
    run, cfg, _ = fusion_run
    report = json.loads(run.artifact("fusion", "report").read_text())
    mcc = report["test_mcc"]
    modalities = report["modalities"]
    assert {f"fusion, without {m}" for m in modalities} | {f"fusion, only {m}" for m in modalities} <= set(mcc)
    assert {"late, all", "gmu, all", "single detector", "stage1 tier alone"} <= set(mcc)
    # the head learns: it uses the informative external signal, far above a constant answer (MCC 0)
    assert mcc["fusion, all"]["all"] > 0.6 and mcc["fusion, only detector"]["all"] > 0.6
    assert mcc["single detector"]["all"] > 0.6 and modalities == FUSED
    cost = report["drop_one_cost"]
    assert cost["detector"] == pytest.approx(mcc["fusion, all"]["all"] - mcc["fusion, without detector"]["all"])
    versus = report["versus_best_single"]
    assert versus["low"] <= versus["delta"] <= versus["high"] and versus["best_single"] in mcc
    calibration = report["calibration"]
    assert calibration["method"] == "temperature" and calibration["n"] == report["n"]["calib"]
    assert calibration["after"]["nll"] <= calibration["before"]["nll"] + 1e-6  # fitted by NLL on calib
    assert run.artifact("fusion", "heatmap").stat().st_size > 5000

    # the saved head reproduces the report from the store
    net, config = load_fusion(run.artifact("fusion", "model"))
    test = load_split(FeatureStore(config["store"]), "test", net.modalities)
    with torch.no_grad():
        probs = roadwork_prob(net(test["features"], test["present"]))
    from torchmetrics.functional.classification import binary_matthews_corrcoef
    assert float(binary_matthews_corrcoef(probs, test["label"])) == pytest.approx(mcc["fusion, all"]["all"], abs=1e-6)
    assert net.temperature == pytest.approx(calibration["params"]["temperature"])


def test_bundle_serves_the_fusion_head(fusion_run):
    run, cfg, _ = fusion_run
    bundle = Bundle(run.artifact("export", "manifest").parent)
    manifest = bundle.manifest
    entry = manifest.models["fusion"]
    assert entry.kind == "classifier" and entry.fusion.modalities == FUSED
    assert set(entry.onnx.inputs) == {*entry.fusion.modalities, "present"} and entry.onnx.parity_max_abs_diff <= 1e-4
    # a model of the bundle, not a cascade tier (docs/guides/fusion.md)
    assert "fusion" not in [t.name for t in manifest.tiers]
    accepted = json.loads(run.artifact("fusion", "report").read_text())["acceptance"]  # a report figure only
    calib = load_split(FeatureStore(run.artifact("features", "manifest").parent), "calib", FUSED)
    scenes = scene_groups(build_datamodule(cfg, run).split("calib"))[calib["index"].numpy()]
    g = accepted["guarantee"]  # Learn-then-Test on one query per scene: independent samples
    assert g["alpha"] == cfg.fusion.alpha and g["n_calibration"] == len(np.unique(scenes)) < len(calib["label"])
    assert "threshold" not in run.read()["tasks"]["fusion"]["artifacts"]
    assert entry.calibration.method == "temperature" and entry.calibration.folded

    net, config = load_fusion(run.artifact("fusion", "model"))
    test = load_split(FeatureStore(config["store"]), "test", net.modalities)
    masks = torch.stack(list(conditions(net.modalities).values()))
    present = test["present"] & masks[torch.arange(len(test["label"])) % len(masks)]
    with torch.no_grad():
        expected = roadwork_prob(net(test["features"], present)).numpy()
    onnx = bundle.fusion()
    got = onnx.probs({m: f.numpy() for m, f in zip(net.modalities, test["features"])}, present.numpy())
    assert np.abs(got - expected).max() <= 1e-4
    without = onnx.probs({m: f.numpy() for m, f in zip(net.modalities, test["features"]) if m != "detector"})
    with torch.no_grad():
        keep = torch.tensor([m != "detector" for m in net.modalities])
        assert np.abs(without - roadwork_prob(net(test["features"], test["present"] & keep)).numpy()).max() <= 1e-4


def test_classifier_column_read_from_the_view_cache_equals_running_the_tier(fusion_run):
    """Where the run's view cache holds Stage-1 on the same queries, the Stage-1 column is its global slot: the same
    values (embedding at float16 precision either way) as running Stage-1 on the queries."""
    from torch.utils.data import DataLoader

    from train.tiers.modalities import ClassifierModality, QueryDataset
    from train.tiers.training import build_datamodule

    run, cfg, _ = fusion_run
    modality = ClassifierModality("stage1", embedding=True)
    modality.setup(run)
    datamodule = build_datamodule(cfg, run, modality.input_spec)
    levels = list(cfg.features.levels)
    cached = modality.dataset(datamodule, "calib", levels, False)
    direct = QueryDataset(datamodule, "calib", levels, False, None)
    assert not isinstance(cached, QueryDataset) and len(cached) == len(direct)

    def column(dataset):
        return torch.cat([modality.encode(batch)[0] for batch in DataLoader(dataset, batch_size=16)])

    read, ran = column(cached), column(direct)
    assert read.shape == ran.shape == (len(direct), modality.dim)
    assert torch.allclose(read[:, -2:], ran[:, -2:], atol=1e-5)  # the logits
    assert torch.allclose(read[:, :-2], ran[:, :-2], rtol=2e-3, atol=1e-4)  # the embedding, float16 precision
