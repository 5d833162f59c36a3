"""The tier interface: every learned part is a registered tier, and adding one takes its folder plus its config file
(the toy tier of ``tests/toy_tier/``, registered from outside the package)."""
import json

import numpy as np
import pytest
import torch
from conftest import QUIET, compose_config, copy_run
from safetensors.numpy import load_file

from train.errors import ConfigError
from train.export import Bundle, load_manifest
from train.export.cascade import TierOutput, route
from train.metrics import roadwork_prob
from train.tiers.base import get_tier, load_tiers
from train.tiers.training import build_datamodule


def test_every_learned_part_is_a_registered_tier_of_a_known_kind():
    tiers = load_tiers()
    assert {n: t.kind for n, t in tiers.items() if n in {"stage1", "apt", "draft", "difficulty", "prm", "fusion"}} == {
        "stage1": "classifier", "apt": "classifier", "draft": "classifier", "difficulty": "router", "prm": "prm",
        "fusion": "fusion"}
    cfg = compose_config()
    assert tiers["difficulty"].needs(cfg) == ["draft", "stage1", "calibrate"] and tiers["fusion"].needs(cfg) == [
        "features"]
    assert tiers["prm"].selection(cfg) == ("val/step_auroc", "max") and tiers["stage1"].selection(cfg) is None
    with pytest.raises(ConfigError, match="no tier named 'nope'"):
        get_tier("nope")


@pytest.fixture(scope="module")
def toy_run(tiny_run, data_dir, tmp_path_factory):
    """The toy tier trained in a copy of the tiny run, then the cascade [toy, stage1] thresholded, exported and
    replayed from its bundle: the stages a tier joins, unchanged."""
    import toy_tier

    from train.__main__ import run_task

    root = tmp_path_factory.mktemp("toy")
    run = copy_run(tiny_run, root)
    cfg = compose_config(f"paths.root_dir={root}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET,
                         f"run_dir={run.path}", f"hydra.searchpath=[file://{toy_tier.CONF}]", "+toy=default",
                         "tier_modules=[toy_tier]",
                         "pipeline=stage1", "pipeline.stages=[toy,thresholds,export,evaluate]", "pipeline.force=true",
                         "cascade.tiers=[toy,stage1]", "cascade.tier_alpha={}", "cascade.alpha=0.3",
                         "cascade.method=crc", "export.models=[toy,stage1]", "evaluate.cascade=true")
    run_task(cfg)
    return run, cfg


def test_a_tier_added_from_outside_trains_and_calibrates_through_the_one_flow(toy_run):
    run, cfg = toy_run
    task = run.read()["tasks"]["toy"]
    assert task["status"] == "complete" and task["tier"] == "toy"
    report = json.loads(run.artifact("toy", "report").read_text())["calibration"]
    assert report["split"] == "calib" and report["method"] == cfg.calibrate.method
    assert report["after"]["nll"] <= report["before"]["nll"] + 1e-6  # temperature scaling fitted on these samples
    model, config = get_tier("toy").load(run)  # the calibrated model, as the thresholds stage and export load it
    assert config["backbone"]["depth"] == 1 and config["calibration"]["method"] == cfg.calibrate.method
    assert "train/nonfinite_steps" in task["metrics"]  # what every tier's fit records


def test_a_tier_added_from_outside_is_exported_and_replayed_as_the_manifest_says(toy_run):
    run, cfg = toy_run
    manifest = load_manifest(run.path / "export")
    assert [(t.name, t.kind) for t in manifest.tiers] == [("toy", "classifier"), ("stage1", "classifier")]
    # the bundle serves the calibrated toy's P(roadwork) (ONNX Runtime against PyTorch on real queries)
    model, config = get_tier("toy").load(run)
    datamodule = build_datamodule(cfg, run, config["input"])
    images = next(iter(datamodule.loader(datamodule.dataset("test", 1))))["image"]
    with torch.no_grad():
        expected = roadwork_prob(model.eval()(images)).numpy()
    assert np.abs(Bundle(run.path / "export").classifier("toy").probs(images.numpy()) - expected).max() <= 1e-4
    # the replay routes every test query as the thresholds stage's PyTorch outputs do under the manifest's thresholds
    torch_out = load_file(str(run.artifact("thresholds", "outputs_test")))
    replay = load_file(str(run.artifact("evaluate", "cascade_test")))
    order = [(t.name, t.kind) for t in manifest.tiers]
    outputs = {n: TierOutput(k, prob=torch_out[f"{n}/prob"]) for n, k in order}
    expected = route(order, outputs, {t.name: t.threshold for t in manifest.tiers})
    assert np.array_equal(replay["answer"], expected.answer) and np.array_equal(replay["exit"], expected.exit)
    assert manifest.tiers[0].guarantee is not None and manifest.tiers[0].guarantee.alpha == 0.3


def test_a_tier_config_is_checked_by_its_schema_before_any_work():
    import toy_tier

    from train.config_checks import check_config

    base = [f"hydra.searchpath=[file://{toy_tier.CONF}]", "+toy=default"]
    check_config(compose_config(*base))
    with pytest.raises(ConfigError, match=r"toy\.epochs='two'"):
        check_config(compose_config(*base, "toy.epochs=two"))
    with pytest.raises(ConfigError, match=r"toy\.epoch: no such key; did you mean \['epochs'\]"):
        check_config(compose_config(*base, "+toy.epoch=2"))
