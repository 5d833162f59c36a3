"""Calibrate, export and evaluate: the bundle contract (HF folder, ONNX parity, manifest) end to end."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from train.__main__ import run_task
from train.calibration import TemperatureScaling, apply_isotonic_table, fold_into_head
from train.export import Bundle, BundleError, Calibration, ExportError, Manifest, ModelCard, load_manifest
from train.export.bundle import export_classifier, export_fusion, export_prm, export_router, write_bundle
from train.export.flops import count_flops
from train.export.hf import save_hf_folder
from train.export.manifest import SCHEMA
from train.export.onnx import check_parity, export_onnx
from train.metrics import roadwork_prob
from train.models import create_backbone
from train.models.saving import load_classifier
from train.predictions import predict_split, read_predictions
from train.runs import Run
from train.tasks.export import model_card
from train.tiers.training import build_datamodule
from train.utils.files import sha256_file

SPEC = {"img_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "area"}


def tiny_timm():
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)


def tiny_convnext():  # a head inside a head module (head.fc) and no class token
    return create_backbone("convnext_atto")


def tiny_transformers():
    from transformers import ViTConfig

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    return create_backbone("tiny-vit", library="transformers", hf_config=config.to_dict())


def calibrated(model, temperature=3.0):
    """``model`` with a known temperature folded into its head."""
    torch.manual_seed(0)
    cal = TemperatureScaling.from_params({"temperature": temperature})
    return fold_into_head(model.eval(), cal)


@pytest.mark.parametrize("make", [tiny_timm, tiny_convnext, tiny_transformers],
                         ids=["timm", "convnext", "transformers"])
def test_hf_folder_loads_in_the_miners_pipeline_with_calibrated_scores(make, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    torch.manual_seed(0)
    model = calibrated(make())
    save_hf_folder(model, SPEC, tmp_path / "hf")
    hf_model = AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    classify = pipeline("image-classification", model=hf_model, feature_extractor=processor, device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(4)]
    outputs = classify(images, top_k=2)
    assert all({o["label"] for o in out} == {"None", "Roadwork"} for out in outputs)
    scores = torch.tensor([next(o["score"] for o in out if o["label"] == "Roadwork") for out in outputs])
    with torch.no_grad():
        expected = model(processor(images, return_tensors="pt")["pixel_values"]).softmax(-1)[:, 1]
    assert torch.allclose(scores, expected, atol=1e-5)
    assert (expected - 0.5).abs().max() > 1e-4  # a real spread of scores, not all 0.5


def test_onnx_parity_and_its_failure(tmp_path):
    torch.manual_seed(0)
    model = calibrated(tiny_timm())
    export_onnx(model, tmp_path / "m.onnx", 32)
    images = torch.randn(9, 3, 32, 32)  # any batch size: the batch axis is dynamic
    with torch.no_grad():
        probs = roadwork_prob(model(images)).numpy()
        other = roadwork_prob(calibrated(tiny_timm(), temperature=0.5)(images)).numpy()
    assert check_parity(probs, tmp_path / "m.onnx", images) < 1e-5
    with pytest.raises(ExportError, match="ONNX Runtime disagrees with PyTorch"):
        check_parity(other, tmp_path / "m.onnx", images)


def test_default_pipeline_writes_a_valid_bundle(tiny_run):
    bundle = tiny_run.artifact("export", "manifest").parent
    assert bundle == tiny_run.path / "export"
    manifest = load_manifest(bundle)
    entry = manifest.models["stage1"]
    assert {"onnx", "hf/config.json", "hf/model.safetensors"} <= set(entry.files)
    assert entry.calibration.method == "temperature" and entry.calibration.folded
    assert entry.calibration.after["nll"] <= entry.calibration.before["nll"] + 1e-6  # NLL is what T minimises
    assert entry.onnx.parity_max_abs_diff <= 1e-4 and entry.checks["hf_max_abs_diff"] <= 1e-4
    assert {"L0", "L1", "mean"} <= set(entry.metrics) and "ece" in entry.metrics["L0"]
    assert entry.input.img_size == 64 and manifest.tiers[0].model == "stage1"
    assert manifest.config["export"]["onnx"]["opset"] == entry.onnx.opset
    card = json.loads((bundle / "model_card.json").read_text())
    assert set(card) == {"model_name", "description", "version", "submitted_by", "submission_time"}
    assert (tiny_run.path / "calibrate" / "stage1_reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in bundle.rglob("*") if p.is_file())  # others may read it



def test_hf_folder_has_a_hub_model_card_from_the_manifest(tiny_run):
    """``stage1_hf/README.md``: the Hub's metadata header (model-index = the run's recorded per-level test figures),
    labels and input spec as the folder's config and the manifest have them; listed and verified by the manifest."""
    from huggingface_hub import ModelCard as HubModelCard
    from transformers import AutoConfig

    from train import LABELS
    from train.export.hf import CARD_METRICS

    bundle = tiny_run.path / "export"
    entry = load_manifest(bundle).models["stage1"]  # verifies README.md's sha256 with the other files
    assert entry.files["hf/README.md"].path == "stage1_hf/README.md"
    card = HubModelCard.load(bundle / "stage1_hf" / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
    recorded = tiny_run.metrics("calibrate")  # the calibrated model's test figures, per level
    levels = [lv for lv in entry.metrics if lv != "mean"]
    expected = {(lv, hub): recorded[f"stage1/test/{lv}/after/{ours}"]
                for lv in levels for ours, (hub, _) in CARD_METRICS.items()}
    assert levels and set(levels) == {k.split("/")[2] for k in recorded if k.startswith("stage1/test/")}
    assert {(r.dataset_config, r.metric_type): r.metric_value
            for r in card.data.eval_results} == pytest.approx(expected, abs=1e-6)
    assert all(r.task_type == "image-classification" and r.dataset_split == "test" for r in card.data.eval_results)
    assert AutoConfig.from_pretrained(bundle / "stage1_hf").id2label == LABELS  # as the miner's pipeline reads them
    assert all(f"| {i} | {label} |" in card.text for i, label in LABELS.items())
    spec = entry.input
    assert f"size: {spec.img_size} x {spec.img_size}" in card.text and f"mean {spec.mean}, std {spec.std}" in card.text
    assert entry.calibration.method in card.text and entry.metrics_source in card.text


def test_manifest_rejects_tampering(tiny_run, tmp_path):
    bundle = shutil.copytree(tiny_run.path / "export", tmp_path / "bundle")
    raw = json.loads((bundle / "manifest.json").read_text())
    with open(bundle / "stage1.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"sha256 mismatch\): .*stage1.onnx"):
        Bundle(bundle)
    (bundle / "manifest.json").write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(BundleError, match="does not match the manifest schema"):
        load_manifest(bundle, verify=False)
    (bundle / "manifest.json").write_text(json.dumps({**raw, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        load_manifest(bundle)


def calibrated_torch_probs(cfg, run: Run, levels) -> dict:
    """The calibrated PyTorch model (calibrate stage) on the test split at ``levels``: P(roadwork)."""
    model, config = load_classifier(run.artifact("calibrate", "stage1_model"))
    out = predict_split(model, build_datamodule(cfg, run, config["input"]), "test", levels)
    return {lv: o["logits"].softmax(-1)[:, 1].numpy() for lv, o in out.items()}


def test_evaluate_agrees_with_the_calibrated_pytorch_model(tiny_config, tiny_run):
    evaluated = read_predictions(tiny_run.artifact("evaluate", "predictions"))
    expected = calibrated_torch_probs(tiny_config(), tiny_run, list(evaluated))
    for level, cols in evaluated.items():
        agree = np.mean((cols["prob"] > 0.5) == (expected[level] > 0.5))
        assert agree >= 0.995, f"level {level}: bundle and PyTorch agree on {agree:.3%}"
        assert np.abs(cols["prob"] - expected[level]).max() < 1e-4
    report = json.loads(tiny_run.artifact("evaluate", "report").read_text())
    assert set(report["metrics"]) == {"L0", "L1", "L2", "L3", "mean"}
    assert {"mcc", "acc", "reward", "ece"} <= set(report["metrics"]["L2"])
    assert (tiny_run.path / "evaluate" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_other_calibrators_flow_through_the_bundle(method, tiny_config, tiny_run, tmp_path):
    run = Run.open(shutil.copytree(tiny_run.path, tmp_path / "run"))
    run_task(tiny_config(f"run_dir={run.path}", "pipeline=stage1", "pipeline.stages=[calibrate,export,evaluate]",
                         "pipeline.force=true",
                         f"calibrate.method={method}", "evaluate.levels=[0]"))
    entry = load_manifest(run.path / "export").models["stage1"]
    assert entry.calibration.method == method and entry.calibration.folded == (method == "platt")
    evaluated = read_predictions(run.artifact("evaluate", "predictions"))[0]["prob"]
    model, _ = load_classifier(run.artifact("calibrate", "stage1_model"))
    datamodule = build_datamodule(tiny_config(), run, entry.input.model_dump())
    with torch.no_grad():
        p = torch.cat([model(b["image"]).softmax(-1)[:, 1] for b in datamodule.loader(datamodule.dataset("test", 0))])
    if method == "isotonic":  # the consumer applies the manifest's table to the model's P(roadwork)
        assert "numpy.interp" in entry.calibration.consumer_applies
        p = torch.from_numpy(apply_isotonic_table(p.numpy(), entry.calibration.params))
    assert np.abs(evaluated - p.numpy()).max() < 1e-4


def test_export_from_a_plain_checkpoint_then_evaluate_the_bundle_alone(tiny_config, tiny_run, tmp_path):
    ckpt = tiny_run.artifact("stage1", "best")
    run_task(tiny_config("task=export", f"ckpt={ckpt}", "run_name=from_ckpt"))
    (run_path,) = (tmp_path / "checkpoints").iterdir()
    manifest = load_manifest(run_path / "export")
    assert manifest.models["stage1"].calibration.method == "none"
    run_task(tiny_config("task=evaluate", f"bundle={run_path / 'export'}", "evaluate.levels=[0]",
                         "run_name=eval_only"))
    (eval_run,) = (p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("eval_only"))
    report = json.loads((eval_run / "evaluate" / "report.json").read_text())
    # the uncalibrated checkpoint's decisions are Stage-1's: same test accuracy at level 0
    assert report["metrics"]["L0"]["acc"] == pytest.approx(tiny_run.metrics("stage1")["test/L0/acc"], abs=1e-6)


def test_bad_export_inputs_fail_clearly(tiny_config, tmp_path):
    cfg = tiny_config("export.natix_submission=true")
    run = Run.create(tmp_path / "checkpoints", "card")
    with pytest.raises(ExportError, match="needs export.model_card.submitted_by"):
        model_card(cfg, run)
    card = model_card(tiny_config("export.natix_submission=true", "export.model_card.submitted_by=5Fhotkey"), run)
    assert card.submitted_by == "5Fhotkey" and card.model_name == f"roadwork-{run.path.name}"
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        run_task(tiny_config("task=export", f"ckpt={tmp_path / 'none.ckpt'}"))
    with pytest.raises(BundleError, match="is not an export bundle"):
        run_task(tiny_config("task=evaluate", f"bundle={tmp_path}"))


# --- FLOPs and the manifest's schema ------------------------------------------------------------------

class Latents(torch.nn.Module):
    """A view of a parameter fed to a submodule (as a fusion head's latents): trips the counter's module tracker
    under no_grad unless the parameters are frozen while counting."""

    def __init__(self):
        super().__init__()
        self.z, self.lin = torch.nn.Parameter(torch.randn(2, 8)), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.z.expand(len(x), -1, -1))


def test_count_flops_matches_hand_counts(one_thread):
    assert count_flops(torch.nn.Linear(8, 4), torch.randn(3, 8)) == 2 * 8 * 4 * 3 == 192  # 2 per multiply-add
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    assert count_flops(conv, torch.randn(2, 3, 6, 6)) == 2 * (2 * 5 * 6 * 6) * (3 * 3 * 3) == 19440
    latents = Latents()
    assert count_flops(latents, torch.randn(3, 1)) == 2 * (3 * 2) * 8 * 4 == 384
    assert all(p.requires_grad for p in latents.parameters())  # restored after counting


def test_bundle_records_flops_and_carries_its_schema(tiny_run, tmp_path):
    bundle = tiny_run.path / "export"
    manifest = load_manifest(bundle)
    assert manifest.models and all(m.flops is not None and m.flops.per_call > 0 for m in manifest.models.values())
    flops = manifest.models["stage1"].flops
    assert flops.unit == "FLOP per image at the input size" and flops.counted_with.endswith("FlopCounterMode")
    model, config = load_classifier(tiny_run.artifact("calibrate", "stage1_model"))
    one = count_flops(model.eval(), torch.randn(1, 3, config["input"]["img_size"], config["input"]["img_size"]))
    assert flops.per_call == pytest.approx(one, rel=1e-6)
    assert tiny_run.metrics("export")["stage1/flops"] == flops.per_call
    # the schema: written from the pydantic model, listed with its sha256, covered by the verification
    schema = json.loads((bundle / SCHEMA).read_text())
    assert schema == Manifest.model_json_schema()
    assert manifest.files["schema"].path == SCHEMA and manifest.files["schema"].sha256 == sha256_file(bundle / SCHEMA)
    objects = [schema, *schema["$defs"].values()]
    assert all(d.get("additionalProperties") is False for d in objects if "properties" in d)  # unknown fields fail
    assert set(schema["$defs"]["Flops"]["required"]) == {"per_call", "unit"}
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["models"]["stage1"]["flops"]["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        Manifest.model_validate(raw)
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    with open(copy / SCHEMA, "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match=r"sha256 mismatch\): .*manifest.schema.json"):
        load_manifest(copy)


def test_every_kind_of_model_gets_its_flops(one_thread, tmp_path):
    """APT and the elastic draft: the mean over the parity images of what their batch-1 graphs cost; router and
    fusion head per sample; the PRM per trace step."""
    from train.models.apt.model import APTViT
    from train.models.difficulty import DifficultyRouter
    from train.models.draft import ElasticDraft
    from train.models.elastic import elastic_vit
    from train.models.fusion import FusionNet
    from train.models.prm import ProcessRewardModel

    torch.manual_seed(0)
    pixels = torch.randn(6, 3, 32, 32)
    pixels[::2] = 0  # flat images: the APT model merges them into one 4p patch
    none = Calibration(method="none", folded=False)
    apt = APTViT(tiny_timm(), [1.0, 1.0], SPEC["mean"], SPEC["std"]).eval()
    draft = ElasticDraft(elastic_vit(tiny_timm(), budgets=(0.25, 0.5, 1.0), selector="gate")).eval()
    with torch.no_grad():
        for p in draft.elastic.gate.parameters():
            p.copy_(torch.randn_like(p))  # as if trained: the gate picks different budgets
    router, logits = DifficultyRouter(in_size=16, width=4, hidden=8).eval(), torch.randn(6, 2)
    prm = ProcessRewardModel(embed_dim=8, n_slots=4, width=16, layers=1, heads=2, max_steps=4).eval()
    traces = (torch.randn(5, 3, 8), torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 4, (5, 3)))
    fusion = FusionNet({"a": 6, "b": 4}, width=8, hidden=16).eval()
    features, present = [torch.randn(7, 6), torch.randn(7, 4)], torch.tensor([[1, 1], [1, 0], [0, 1]] * 2 + [[1, 1]])
    search = dict(views_model="apt", views={}, belief="mean", method="beam", aggregation="min", n=4, beam=2, length=3,
                  budget=4, stop_threshold=None, pool="ordered", order=[0, 1, 2, 3])

    def build(folder):
        return {"apt": export_classifier("apt", apt, SPEC, none, folder, pixels),
                "draft": export_classifier("draft", draft, SPEC, none, folder, pixels),
                "router": export_router("router", router, SPEC, none, folder, pixels, logits),
                "prm": export_prm("prm", prm, SPEC, search, folder, traces),
                "fusion": export_fusion("fusion", fusion, SPEC, none, folder, features, present.bool())}

    card = ModelCard(model_name="m", description="d", version="1", submitted_by="", submission_time="now")
    models = load_manifest(write_bundle(tmp_path / "bundle", build, card, {})).models
    flops = {name: m.flops for name, m in models.items()}
    assert all(f.per_call > 0 for f in flops.values())
    a = flops["apt"]  # 3 flat images (one token) and 3 noisy ones (every base patch)
    assert a.detail["images"] == 6 and a.detail["min"] < a.detail["max"] == a.detail["all_base_patches"]
    assert a.per_call == pytest.approx((a.detail["min"] + a.detail["max"]) / 2, rel=1e-9)
    d = flops["draft"]  # the mean over images = the budgets' FLOPs (the gate's own included) weighted by their shares
    budgets = {b: d.detail[f"budget_{b}"] for b in (0.25, 0.5, 1.0)}
    shares = {b: d.detail[f"share_{b}"] for b in budgets}
    assert sum(share > 0 for share in shares.values()) >= 2 and sum(shares.values()) == pytest.approx(1)
    assert budgets[0.25] < budgets[0.5] < budgets[1.0] and {d.detail["min"], d.detail["max"]} <= set(budgets.values())
    assert d.per_call == pytest.approx(sum(budgets[b] * shares[b] for b in budgets), rel=1e-9)
    assert flops["router"].per_call == pytest.approx(count_flops(router, pixels[:1], logits[:1]), rel=1e-6)
    assert flops["prm"].unit == "FLOP per trace step scored" and flops["prm"].detail == {"traces": 5, "steps": 3}
    assert flops["prm"].per_call == pytest.approx(count_flops(prm, *(x[:1] for x in traces)) / 3, rel=1e-6)
    one = count_flops(fusion, [f[:1] for f in features], present[:1].bool())
    assert flops["fusion"].unit == "FLOP per sample" and flops["fusion"].per_call == pytest.approx(one, rel=1e-6)
