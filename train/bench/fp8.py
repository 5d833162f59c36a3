"""``python -m train.bench fp8 --run-dir checkpoints/<run>``: a run's calibrated tiers in FP8 (e4m3,
:mod:`train.export.fp8`) against themselves in fp32, in PyTorch on the run's test queries.

The FP8 twin is recalibrated on calib with the fp32 calibration's method, split and levels (the calibrate stage's
:func:`~train.tiers.calibration.fit_on`); reported per validator level: MCC and ECE of both, the FP8 answers' agreement
with fp32, and latency per image (batches of ``--batch``, the device synchronised around each; on a GPU with float8
tensor cores the Linear layers run in ``torch._scaled_mm``, elsewhere the simulation, which says nothing of speed).
"""
from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from train.bench.timing import synchronize
from train.calibration import CALIBRATORS
from train.calibration.metrics import score_probs
from train.configs import config_dir
from train.export.fp8 import Float8Linear, native_fp8, to_float8
from train.metrics import roadwork_prob, with_mean
from train.predictions import predict_split
from train.runs import Run
from train.tiers.calibration import fit_on, load_calibrated
from train.tiers.training import build_datamodule

CONF_DIR = config_dir()


def calibrated(logits: torch.Tensor, calibration: dict) -> torch.Tensor:
    """P(roadwork) as the calibration record says (folded: the model's own softmax)."""
    if calibration["folded"] or calibration["method"] == "none":
        return roadwork_prob(logits.float())
    return CALIBRATORS[calibration["method"]].from_params(calibration["params"]).probs(logits).float()


def compare(model, cfg, datamodule, calibration: dict, device: torch.device) -> dict:
    """fp32 and FP8 on the test queries at ``data.test_levels`` (batches of ``data.eval_batch_size``): metrics per
    level, agreement, latency."""
    models = {"fp32": model.to(device).eval(), "fp8": to_float8(model).to(device)}
    calib = predict_split(models["fp8"], datamodule, calibration["split"], calibration["levels"], device=device)
    _, fp8_calibration, _ = fit_on(calibration["method"], calib, calibration["split"], cfg.calibrate.n_bins)
    records = {"fp32": calibration, "fp8": {**fp8_calibration, "folded": False}}
    seconds = dict.fromkeys(models, 0.0)

    def each(images):
        out = {}
        for name, m in models.items():
            synchronize(device)
            start = time.perf_counter()
            out[name] = m(images).float()
            synchronize(device)
            seconds[name] += time.perf_counter() - start
        return out

    test = predict_split(each, datamodule, "test", cfg.data.test_levels, device=device)
    n = sum(len(p["label"]) for p in test.values())
    probs = {lv: {k: calibrated(p[k], records[k]) for k in models} for lv, p in test.items()}
    linears = [m for m in models["fp8"].modules() if isinstance(m, Float8Linear)]
    return {
        "metrics": {k: with_mean({f"L{lv}": score_probs(probs[lv][k], p["label"], cfg.calibrate.n_bins)
                                  for lv, p in test.items()}) for k in models},
        "agreement_with_fp32": {f"L{lv}": float(((probs[lv]["fp8"] > 0.5) == (probs[lv]["fp32"] > 0.5)).float().mean())
                                for lv in probs},
        "latency_ms_per_image": {k: 1e3 * s / n for k, s in seconds.items()},
        "fp8_calibration": {k: fp8_calibration[k] for k in ("method", "params", "n", "before", "after")},
        "fp8_linears": len(linears), "fp8_linears_native": sum(m.native_calls > 0 for m in linears),
        "weights_bytes": {"fp32": sum(p.numel() * 4 for p in model.parameters()),
                          "fp8": sum(b.numel() * b.element_size() for m in linears for b in m.buffers())
                          + sum(p.numel() * 4 for p in models["fp8"].parameters())}}


def run(argv: list[str] | None = None) -> dict:
    """The ``fp8`` benchmark: :func:`compare` for each of ``--models`` of ``--run-dir``, with the device, whether it
    runs FP8 natively, the torch version and the run."""
    parser = argparse.ArgumentParser(prog="python -m train.bench fp8")
    parser.add_argument("--run-dir", required=True, help="a run whose calibrate stage is complete")
    parser.add_argument("--models", nargs="+", default=["stage1"], help="calibrated classifiers of the run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides (e.g. data.num_workers=8)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in fp32
    run_ = Run.open(args.run_dir)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run_.path}", "print_config=false",
                                            f"data.eval_batch_size={args.batch}", *args.override])
    out = {}
    for name in args.models:
        model, config, report = load_calibrated(run_, name)
        datamodule = build_datamodule(cfg, run_, config["input"])
        out[name] = compare(model, cfg, datamodule, report, device)
        print(name, {k: {lv: round(m["mcc"], 3) for lv, m in v.items()} for k, v in out[name]["metrics"].items()},
              "agreement", out[name]["agreement_with_fp32"], "ms/image", out[name]["latency_ms_per_image"])
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "native_fp8": native_fp8(device), "torch": torch.__version__, "run": str(run_.path), "models": out}
