"""Quantised tiers (task=quantize) on a copy of the shared cheap-tiers run (the default Stage-1 architecture, vit_tiny
at 64 px, trained 4 epochs on the tiny data; its draft): a two-tier cascade [draft, stage1] gets its thresholds, the
bundle is exported, both tiers are quantised (static INT8 and the dynamic baseline), then evaluated at int8."""
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import QUIET, compose_config, copy_run

from train.__main__ import run_task
from train.calibration.cascade import select_cascade
from train.data.views import GLOBAL_ONLY
from train.export import Bundle, load_manifest
from train.export.cascade import TierOutput
from train.export.manifest import Manifest
from train.export.replay import BundleCascade
from train.predictions import read_predictions
from train.tasks.quantize import recorded_rules
from train.tiers.cascade import one_per_scene
from train.tiers.replay import replay_split
from train.tiers.training import build_datamodule


@pytest.fixture(scope="module")
def quant_run(cheap_tiers, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    run = copy_run(cheap_tiers[0], root)
    # conformal risk control at alpha 0.3: the draft's threshold is one of its calib confidences (Learn-then-Test on
    # ~24 independent calib queries accepts nothing), so it moves when the draft's scores move
    base = [f"paths.root_dir={root}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET, f"run_dir={run.path}",
            "pipeline=stage1", "cascade.tiers=[draft,stage1]", "cascade.method=crc", "cascade.alpha=0.3",
            "export.models=[draft,stage1]", "quantize.models=[draft,stage1]", "evaluate.precision=int8",
            "evaluate.cascade=true"]
    for task in ("thresholds", "export", "quantize", "evaluate"):
        run_task(compose_config(*base, f"task={task}"))
    return run, compose_config(*base, "task=quantize")


def _queries(cfg, run, bundle, level=0):
    datamodule = build_datamodule(cfg, run, bundle.manifest.models["stage1"].input.model_dump())
    batches = list(datamodule.loader(datamodule.dataset("test", level)))
    return torch.cat([b["image"] for b in batches]).numpy()


def test_int8_stage1_is_3x_smaller_loads_and_agrees_with_fp32_at_level_0(quant_run):
    run, cfg = quant_run
    bundle = Bundle(run.path / "export")  # sha256 of every file, variants included, verified
    entry = bundle.manifest.models["stage1"]
    int8 = entry.variants["int8"]
    fp32_file, int8_file = (bundle.path / f.path for f in (entry.files["onnx"], int8.files["onnx"]))
    assert int8_file.name == "stage1.int8.onnx" and int8.size_bytes == int8_file.stat().st_size
    assert fp32_file.stat().st_size / int8_file.stat().st_size >= 3.0
    graph = onnx.load(str(int8_file)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, weights stored as int8
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer) >= 4 * 4  # 4 blocks x qkv/proj/fc1/fc2
    assert any("(input_layer)" in k for k in int8.quantization.kept_float)
    assert int8.quantization.calibration_method == "MinMax" and int8.quantization.per_channel
    pixels = _queries(cfg, run, bundle)
    p32 = bundle.classifier("stage1").probs(pixels)
    p8 = bundle.classifier("stage1", precision="int8").probs(pixels)
    assert len(pixels) >= 40 and 0.05 < (p32 > 0.5).mean() < 0.95  # a split with both answers
    assert 0 < np.abs(p8 - p32).max() < 0.05  # really another graph, and close: only answers this near 0.5 can flip
    assert ((p8 > 0.5) == (p32 > 0.5)).mean() >= 0.95
    assert int8.agreement["L0"] == pytest.approx(((p8 > 0.5) == (p32 > 0.5)).mean())
    dynamic = entry.variants["int8_dynamic"]
    assert dynamic.quantization.mode == "dynamic" and dynamic.size_ratio >= 3.0
    dynamic_graph = onnx.load(str(bundle.path / dynamic.files["onnx"].path)).graph
    assert "DynamicQuantizeLinear" in {n.op_type for n in dynamic_graph.node}


def test_variants_are_recalibrated_on_their_own_calib_outputs(quant_run):
    run, _ = quant_run
    manifest = load_manifest(run.path / "export")
    for name in ("draft", "stage1"):
        fp32 = manifest.models[name].calibration
        for variant in manifest.models[name].variants.values():
            cal = variant.calibration
            assert (cal.method, cal.split, cal.levels, cal.n) == (fp32.method, fp32.split, fp32.levels, fp32.n)
            assert not cal.folded and cal.consumer_applies and cal.params["temperature"] != 1.0
            assert cal.before != fp32.after  # the variant's own logits, not the fp32 figures copied
    # Bundle applies the re-fitted temperature to the variant graph's logits
    bundle = Bundle(run.path / "export")
    served = bundle.classifier("stage1", precision="int8")
    pixels = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    logits, _ = served.session.logits_and_probs(pixels)
    t = manifest.models["stage1"].variants["int8"].calibration.params["temperature"]
    assert np.allclose(served.probs(pixels), torch.softmax(torch.from_numpy(logits) / t, -1)[:, 1].numpy(), atol=1e-6)


def test_int8_thresholds_are_derived_from_its_own_calib_scores(quant_run):
    """Replaying calib at int8 and choosing the thresholds again gives the manifest's int8 thresholds; swapping the
    fp32 draft's scores in gives the fp32 threshold instead, which differs."""
    run, cfg = quant_run
    bundle = Bundle(run.path / "export")
    tiers = {t.name: t for t in bundle.manifest.tiers}
    assert tiers["draft"].precisions["int8"].variant == "int8" and tiers["draft"].threshold is not None
    datamodule = build_datamodule(cfg, run, bundle.manifest.models["stage1"].input.model_dump())
    calib = {}
    for precision in ("fp32", "int8"):
        cascade = BundleCascade(bundle, precision=precision)
        calib[precision] = replay_split(cascade, datamodule, "calib", GLOBAL_ONLY, cfg.cascade.levels, 64, 0)
    order = [(t.name, t.kind) for t in bundle.manifest.tiers]
    rows = one_per_scene(cfg, run, "calib", calib["int8"][1]["index"])
    rules, label = recorded_rules(cfg, bundle.manifest), calib["int8"][1]["label"]

    def thresholds(outputs):
        return {c.name: c.threshold for c in select_cascade(order, outputs, label, rules, cfg.cascade.reference, rows)}

    int8 = thresholds(calib["int8"][0])
    assert int8["draft"] == tiers["draft"].precisions["int8"].threshold
    assert int8["draft"] in calib["int8"][0]["draft"].confidence  # a calib score of the int8 draft
    swapped = {**calib["int8"][0], "draft": TierOutput("classifier", prob=calib["fp32"][0]["draft"].prob)}
    assert thresholds(swapped)["draft"] != int8["draft"]
    assert thresholds(calib["fp32"][0])["draft"] == pytest.approx(tiers["draft"].threshold)
    g = tiers["draft"].precisions["int8"].guarantee
    assert (g.method, g.alpha, g.risk) == (tiers["draft"].guarantee.method, tiers["draft"].guarantee.alpha,
                                           tiers["draft"].guarantee.risk)


def test_manifest_with_variants_matches_its_json_schema_and_old_bundles_still_load(quant_run, tiny_run):
    import jsonschema

    run, _ = quant_run
    raw = json.loads((run.path / "export" / "manifest.json").read_text())
    schema = json.loads((run.path / "export" / "manifest.schema.json").read_text())
    jsonschema.validate(raw, schema)
    assert set(raw["models"]["stage1"]["variants"]) == {"int8", "int8_dynamic"}
    bad = json.loads(json.dumps(raw))
    bad["models"]["stage1"]["variants"]["int8"]["precision"] = "int4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    for model in raw["models"].values():  # a bundle written before variants existed
        model.pop("variants")
    for tier in raw["tiers"]:
        tier.pop("precisions")
    assert Manifest.model_validate(raw).models["stage1"].variants == {}
    assert load_manifest(tiny_run.path / "export").models["stage1"].variants == {}


def test_evaluate_and_replay_at_int8_next_to_fp32(quant_run):
    run, cfg = quant_run
    report = json.loads(run.artifact("evaluate", "report").read_text())
    assert report["precision"] == "int8" and set(report["precisions"]) == {"fp32", "int8"}
    fp32, int8 = report["precisions"]["fp32"], report["precisions"]["int8"]
    assert fp32["size_bytes"] / int8["size_bytes"] >= 3 and int8["latency_ms_per_image"] > 0
    assert set(int8["metrics"]) == {"L0", "L1", "L2", "L3", "mean"} and "ece" in int8["metrics"]["L0"]
    assert report["metrics"] == int8["metrics"] and fp32["agreement_with_fp32"]["mean"] == 1.0
    # the predictions written are the int8 variant's, served from the bundle
    bundle = Bundle(run.path / "export")
    written = read_predictions(run.artifact("evaluate", "predictions"))[0]["prob"]
    assert np.allclose(written, bundle.classifier("stage1", precision="int8").probs(_queries(cfg, run, bundle)),
                       atol=1e-6)
    cascade = json.loads(run.artifact("evaluate", "cascade").read_text())
    tiers = {t.name: t for t in bundle.manifest.tiers}
    assert cascade["precision"] == "int8"
    assert [t["threshold"] for t in cascade["tiers"]] == [tiers[n].precisions["int8"].threshold for n in tiers]
    compare = cascade["compare"]["fp32"]
    assert [t["threshold"] for t in compare["tiers"]] == [tiers[n].threshold for n in tiers]
    assert set(compare["metrics"]["cascade"]) == set(cascade["metrics"]["cascade"])


def test_fp8_simulation_keeps_stage1s_answers(quant_run):
    """The FP8 (e4m3) twin on the CPU (the dequantise simulation): every Linear converted, logits moved but close, the
    test queries' answers kept."""
    from train.export.fp8 import Float8Linear, to_float8
    from train.tiers.calibration import load_calibrated

    run, cfg = quant_run
    model, _, _ = load_calibrated(run, "stage1")
    pixels = torch.from_numpy(_queries(cfg, run, Bundle(run.path / "export")))
    fp8 = to_float8(model)
    with torch.no_grad():
        ref, got = model.eval()(pixels), fp8(pixels)
    linears = [m for m in fp8.modules() if isinstance(m, Float8Linear)]
    assert len(linears) == 4 * 4 + 1 and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in fp8.modules())
    assert 0 < (got - ref).abs().max() < 0.1 * ref.abs().max()
    p, q = ref.softmax(-1)[:, 1], got.softmax(-1)[:, 1]
    assert ((p > 0.5) == (q > 0.5)).float().mean() >= 0.95
