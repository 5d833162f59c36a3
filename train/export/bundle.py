"""Writing an export bundle (always anew) and reading one back as the inference stack does.

Writer: :func:`export_classifier` turns one calibrated classifier into its ONNX file (+ the HF folder
for Stage-1) and a manifest entry (with its FLOPs, :mod:`train.export.flops`); :func:`write_bundle` puts
entries, model card, manifest and the manifest's JSON schema into a fresh folder and swaps it in. Reader: :class:`Bundle` validates the manifest, checks every file's
sha256 and serves calibrated P(roadwork) from ONNX Runtime (at full precision or a quantised variant's), applying
what the manifest says the consumer must apply (an isotonic table, a variant's re-fitted calibration).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from train.calibration import CALIBRATORS
from train.data.validator import VALIDATOR_VERSION
from train.export.flops import budget_flops, count_flops, each_image
from train.export.hf import check_hf_folder, save_hf_folder, write_hf_card
from train.export.manifest import (FULL_PRECISION, MODEL_CARD, SCHEMA, AdaptivePatches, BundleError, Calibration,
                                   CodeVersion, Flops, FusionInputs, InputSpec, Manifest, ModelCard, ModelEntry,
                                   OnnxSpec, PRMSearch, Tier, file_entry, load_manifest, write_manifest)
from train.export.onnx import (DEFAULT_OPSET, INPUT, ExportError, OnnxAPTClassifier, OnnxClassifier, OnnxFusion,
                               OnnxOneByOne, OnnxPRM, OnnxRouter, check_parity, export_apt_onnx, export_fusion_onnx,
                               export_onnx, export_prm_onnx, export_router_onnx)
from train.metrics import roadwork_prob
from train.utils.files import atomic_write_json
from train.utils.provenance import code_version, now_utc


def export_classifier(name: str, model: nn.Module, input_spec: dict, calibration: Calibration, bundle: Path,
                      pixels: torch.Tensor, queries: list[np.ndarray] | None = None,
                      metrics: dict[str, dict[str, float]] | None = None, metrics_source: str | None = None,
                      opset: int = DEFAULT_OPSET, parity_atol: float = 1e-4,
                      apt_tokens: dict[str, dict[str, float]] | None = None) -> ModelEntry:
    """Write ``<name>.onnx`` (checked against ``model`` on ``pixels``) and, given ``queries``, ``<name>_hf/``.

    ``model`` is the calibrated plain classifier; ``queries`` are validator queries (uint8 HxWx3)
    on which the HF folder is loaded back through ``pipeline`` and compared with ``model``. An APT model
    is exported at batch 1 with its token selection outside the graph (``apt_tokens``: its measured
    token counts, for the manifest).
    """
    model = model.eval()
    with torch.no_grad():
        torch_probs = roadwork_prob(model(pixels).float()).numpy()
    onnx_path = bundle / f"{name}.onnx"
    apt = adaptive_patches(model, apt_tokens) if hasattr(model, "apt_args") else None
    if apt is not None and queries is not None:
        raise ExportError(f"export.hf_model={name} is an APT model: the miner's HF pipeline cannot choose adaptive "
                          "patches; export the HF folder of a plain classifier (e.g. stage1)")
    if apt is not None:
        signature = export_apt_onnx(model, onnx_path, input_spec["img_size"], opset)
        session = OnnxAPTClassifier(onnx_path, apt, input_spec["mean"], input_spec["std"])
    elif hasattr(model, "export_module"):  # the elastic draft: its token budget is chosen inside the graph
        signature = export_onnx(model.export_module(), onnx_path, input_spec["img_size"], opset, batch=1)
        session = OnnxOneByOne(onnx_path)
    else:
        signature, session = export_onnx(model, onnx_path, input_spec["img_size"], opset), None
    diff = check_parity(torch_probs, onnx_path, pixels, parity_atol, session)
    flops = classifier_flops(model, pixels, session if apt is not None else None)
    files = {"onnx": file_entry(bundle, onnx_path)}
    checks = {}
    if queries is not None:
        folder = bundle / f"{name}_hf"
        for path in save_hf_folder(model, input_spec, folder):
            files[f"hf/{path.name}"] = file_entry(bundle, path)
        checks = check_hf_folder(folder, model, queries, torch_probs)
        if not checks["hf_max_abs_diff"] <= parity_atol:
            raise ExportError(f"{folder.name}: the HF pipeline's Roadwork score differs from the model by "
                              f"{checks['hf_max_abs_diff']:.2e} (limit {parity_atol:.0e})")
    onnx = OnnxSpec(file="onnx", opset=opset, parity_max_abs_diff=diff, parity_n=len(pixels), **signature)
    return ModelEntry(kind="classifier", score=_score_meaning(calibration), files=files, input=InputSpec(**input_spec),
                      calibration=calibration, onnx=onnx, metrics=metrics or {}, metrics_source=metrics_source,
                      checks=checks, backbone=dict(getattr(model, "backbone_args", {})), apt=apt, flops=flops)


PER_IMAGE = "FLOP per image at the input size"
PER_IMAGE_MEAN = f"{PER_IMAGE}, mean over the parity images (the work depends on the image)"


def classifier_flops(model: nn.Module, pixels: torch.Tensor, apt_session: OnnxAPTClassifier | None = None) -> Flops:
    """A classifier's FLOPs per image, counted as its ONNX graph runs: an APT model or the elastic draft one image at a
    time with its own tokens (the mean over ``pixels``, with min/max and the base or per-budget figures)."""
    model = model.eval()
    if apt_session is not None:  # tokens chosen outside the graph, as the bundle reader chooses them
        index = [torch.from_numpy(i) for i in apt_session.token_index(pixels.numpy())]
        each = each_image(model.forward_tokens, pixels, index)
        base = count_flops(model.forward_tokens, pixels[:1], torch.arange(model.base_tokens))
        return Flops(per_call=float(np.mean(each)), unit=PER_IMAGE_MEAN,
                     detail={**_spread(each), "all_base_patches": base})
    if hasattr(model, "export_module"):  # the elastic draft: its selector picks a token budget per image
        elastic, graph = getattr(model, "elastic", model), model.export_module()
        each = each_image(graph, pixels)
        gate = 0.0  # a forced budget skips the gate, which the graph runs to choose
        if elastic.selector == "gate":
            with torch.no_grad():
                gate = count_flops(elastic.gate, elastic.vit.patch_embed(pixels[:1]))
        per_budget = budget_flops(elastic, graph, pixels[:1])
        with torch.no_grad():
            chosen = elastic.select(pixels)
        detail = {f"budget_{b}": f + gate for b, f in zip(elastic.budgets, per_budget)}
        detail.update({f"share_{b}": int((chosen == i).sum()) / len(chosen) for i, b in enumerate(elastic.budgets)})
        return Flops(per_call=float(np.mean(each)), unit=PER_IMAGE_MEAN, detail={**_spread(each), **detail})
    return Flops(per_call=count_flops(model, pixels) / len(pixels), unit=PER_IMAGE)


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "max": max(values), "images": float(len(values))}


def export_router(name: str, router: nn.Module, input_spec: dict, calibration: Calibration, bundle: Path,
                  pixels: torch.Tensor, draft_logits: torch.Tensor, metrics: dict[str, dict[str, float]] | None = None,
                  opset: int = DEFAULT_OPSET, parity_atol: float = 1e-4) -> ModelEntry:
    """Write ``<name>.onnx`` for the difficulty router, checked in ONNX Runtime on real images and draft logits."""
    router = router.eval()
    with torch.no_grad():
        expected = router(pixels, draft_logits).float().sigmoid().numpy()
    onnx_path = bundle / f"{name}.onnx"
    signature = export_router_onnx(router, onnx_path, input_spec["img_size"], opset)
    got = OnnxRouter(onnx_path).scores(pixels.numpy(), draft_logits.numpy())
    diff = float(np.abs(expected - got).max())
    if not diff <= parity_atol:
        raise ExportError(f"{onnx_path.name}: ONNX Runtime disagrees with PyTorch by up to {diff:.2e} in the router's "
                          f"scores (limit {parity_atol:.0e})")
    onnx = OnnxSpec(file="onnx", opset=opset, parity_max_abs_diff=diff, parity_n=len(pixels), **signature)
    flops = Flops(per_call=count_flops(router, pixels, draft_logits) / len(pixels), unit=PER_IMAGE)
    score = (f"calibrated P(wrong answer) of each of {router.targets} (output columns in that order); route the "
             "sample past a tier when its score >= the tier threshold")
    return ModelEntry(kind="router", score=score, files={"onnx": file_entry(bundle, onnx_path)},
                      input=InputSpec(**input_spec), calibration=calibration, onnx=onnx, metrics=metrics or {},
                      backbone={"router": router.router_args}, flops=flops)


FUSION_PRESENCE = ("present[b, m] is True where modality m (input order) was computed for sample b; an absent "
                   "modality's values are ignored (any finite numbers)")


def export_fusion(name: str, net: nn.Module, input_spec: dict, calibration: Calibration, bundle: Path,
                  features: list[torch.Tensor], present: torch.Tensor, producers: dict | None = None,
                  metrics: dict[str, dict[str, float]] | None = None, opset: int = DEFAULT_OPSET,
                  parity_atol: float = 1e-4) -> ModelEntry:
    """Write ``<name>.onnx`` for a fusion head, checked in ONNX Runtime on real feature rows and presence masks."""
    net = net.eval()
    with torch.no_grad():
        expected = roadwork_prob(net(features, present).float()).numpy()
    onnx_path = bundle / f"{name}.onnx"
    signature = export_fusion_onnx(net, onnx_path, opset)
    got = OnnxFusion(onnx_path).probs({m: f.numpy() for m, f in zip(net.modalities, features)}, present.numpy())
    diff = float(np.abs(expected - got).max())
    if not diff <= parity_atol:
        raise ExportError(f"{onnx_path.name}: ONNX Runtime disagrees with PyTorch by up to {diff:.2e} in the fusion "
                          f"head's P(roadwork) (limit {parity_atol:.0e})")
    onnx = OnnxSpec(file="onnx", opset=opset, parity_max_abs_diff=diff, parity_n=len(present), **signature)
    flops = Flops(per_call=count_flops(net, features, present) / len(present), unit="FLOP per sample")
    fusion = FusionInputs(modalities=net.modalities, dims=net.fusion_args["dims"], presence=FUSION_PRESENCE,
                          producers=producers or {})
    return ModelEntry(kind="classifier", score=_score_meaning(calibration),
                      files={"onnx": file_entry(bundle, onnx_path)}, input=InputSpec(**input_spec),
                      calibration=calibration, onnx=onnx, metrics=metrics or {}, backbone={"fusion": net.fusion_args},
                      fusion=fusion, flops=flops)


PRM_PROCEDURE = ("a trace starts with the global view (slot 0); step t adds one view: its embedding and logit margin "
                 "(logit_roadwork - logit_none) from views_model, the running belief over the trace's margins; the PRM "
                 "scores every step (P(continuing ends right)). The pool: the global view + budget-1 others, the first "
                 "available ones in `order` (pool=ordered) or random ones. beam: the pool is evaluated "
                 "a few views per step over `length` steps, every beam is extended by each evaluated view it lacks, the "
                 "`beam` best by aggregated score are kept (ties: the earlier candidate, in beam then view order); stop early when the best beam's last step scores >= "
                 "stop_threshold; answer roadwork when the best beam's belief > 0. best_of_n: n random traces of "
                 "`length` views from the pool, the best aggregated score answers (weighted: the answer with the larger "
                 "score sum)")


def export_prm(name: str, prm: nn.Module, input_spec: dict, search: dict, bundle: Path, example: tuple,
               metrics: dict[str, dict[str, float]] | None = None, opset: int = DEFAULT_OPSET,
               parity_atol: float = 1e-4) -> ModelEntry:
    """Write ``<name>.onnx`` for the process reward model, checked in ONNX Runtime on real traces (``example``: its
    four inputs), with the search settings the inference stack needs."""
    prm = prm.eval()
    with torch.no_grad():
        expected = prm(*example).float().sigmoid().numpy()
    onnx_path = bundle / f"{name}.onnx"
    signature = export_prm_onnx(prm, onnx_path, opset)
    diff = float(np.abs(expected - OnnxPRM(onnx_path).scores(*(t.numpy() for t in example))).max())
    if not diff <= parity_atol:
        raise ExportError(f"{onnx_path.name}: ONNX Runtime disagrees with PyTorch by up to {diff:.2e} in the PRM's "
                          f"step scores (limit {parity_atol:.0e})")
    onnx = OnnxSpec(file="onnx", opset=opset, parity_max_abs_diff=diff, parity_n=int(np.prod(expected.shape)),
                    **signature)
    traces, steps = expected.shape
    flops = Flops(per_call=count_flops(prm, *example) / (traces * steps), unit="FLOP per trace step scored",
                  detail={"traces": traces, "steps": steps})
    return ModelEntry(kind="prm", score="per step: P(continuing this trace to the budget ends with the right answer)",
                      files={"onnx": file_entry(bundle, onnx_path)}, input=InputSpec(**input_spec),
                      calibration=Calibration(method="none", folded=False), onnx=onnx, metrics=metrics or {},
                      backbone={"prm": prm.config}, search=PRMSearch(**search, procedure=PRM_PROCEDURE), flops=flops)


APT_PROCEDURE = ("per image: gray = gray_weights . RGB on 0-255; for k = len(thresholds) .. 1, a patch_sizes[k] patch "
                 "(whole patches only, grid from the top-left corner) is chosen where the base-2 entropy of its "
                 "bins-bin histogram is below thresholds[k-1] and no larger chosen patch covers it; base patches "
                 "fill the rest")
APT_TOKEN_TABLE = ("rows: the base-patch grid row-major, then the 2p grid row-major, then 4p, ...; token_index lists "
                   "the chosen rows in that order")


def adaptive_patches(model: nn.Module, tokens: dict[str, dict[str, float]] | None = None) -> AdaptivePatches:
    """The manifest's record of how an APT model's tokens are chosen outside its graph."""
    from train.models.apt.selection import BINS, GRAY_WEIGHTS

    return AdaptivePatches(patch_sizes=[model.patch << k for k in range(len(model.thresholds) + 1)],
                           thresholds=model.thresholds, gray_weights=list(GRAY_WEIGHTS), bins=BINS,
                           base_tokens=model.base_tokens, procedure=APT_PROCEDURE, token_table=APT_TOKEN_TABLE,
                           tokens=tokens or {})


def _score_meaning(calibration: Calibration) -> str:
    if calibration.method == "none":
        return "P(Roadwork), uncalibrated"
    if calibration.folded:
        return "calibrated P(Roadwork)"
    return "P(Roadwork) before calibration: apply calibration.consumer_applies to get the calibrated one"


def write_bundle(out_dir: Path, build, card: ModelCard, config: dict, run: str | None = None,
                 tiers: list[dict] | None = None) -> Path:
    """Build a bundle in a fresh sibling folder, then swap it in for ``out_dir`` (never edited in place).

    ``build(folder) -> dict[name, ModelEntry]`` writes the models' files into ``folder``; ``tiers`` (the thresholds
    stage's cascade, in order: :class:`Tier` fields) become the manifest's tiers; without them every model except
    a fusion head is listed as a tier with no threshold.
    """
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        models = build(staging)
        atomic_write_json(staging / MODEL_CARD, card.model_dump())
        atomic_write_json(staging / SCHEMA, Manifest.model_json_schema())  # the manifest's contract, machine-readable
        for path in staging.rglob("*"):  # readable by the inference stack's user, whoever wrote them
            path.chmod(0o755 if path.is_dir() else 0o644)
        manifest = Manifest(created=now_utc(), run=run, code_version=CodeVersion(**code_version()),
                            validator=VALIDATOR_VERSION,
                            models=models, tiers=[Tier(**t) for t in tiers] if tiers is not None else
                            [Tier(name=name, model=name, kind=entry.kind) for name, entry in models.items()
                             if entry.fusion is None],
                            files={"model_card": file_entry(staging, staging / MODEL_CARD),
                                   "schema": file_entry(staging, staging / SCHEMA)}, config=config)
        for name, entry in manifest.models.items():  # each HF folder's Hub model card (README.md), listed in it
            if "hf/config.json" in entry.files:
                readme = write_hf_card(manifest, name, staging / Path(entry.files["hf/config.json"].path).parent, card)
                readme.chmod(0o644)
                entry.files[f"hf/{readme.name}"] = file_entry(staging, readme)
        write_manifest(staging, manifest)
        load_manifest(staging)  # what we wrote reads back and verifies
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


class BundleClassifier:
    """One classifier of a bundle in ONNX Runtime: ``probs(pixel_values)`` -> calibrated P(roadwork), applying what
    the manifest says the consumer must apply (a calibration not folded into the graph). ``precision`` picks one of
    the entry's ``variants`` (default: the full-precision graph)."""

    def __init__(self, bundle: Path, entry: ModelEntry, threads: int | None = None, precision: str = FULL_PRECISION):
        self.entry, self.precision = entry, precision
        files, cal = entry.files, entry.calibration
        if precision != FULL_PRECISION:
            if precision not in entry.variants:
                raise BundleError(f"bundle {bundle} has no {precision!r} variant of this model (it has "
                                  f"{sorted(entry.variants)}; task=quantize makes them)")
            files, cal = entry.variants[precision].files, entry.variants[precision].calibration
        self.path = bundle / files[entry.onnx.file].path
        if entry.apt is not None:
            self.session = OnnxAPTClassifier(self.path, entry.apt, entry.input.mean, entry.input.std, threads)
        elif entry.onnx.inputs[INPUT].shape[0] == 1:
            self.session = OnnxOneByOne(self.path, threads)
        else:
            self.session = OnnxClassifier(self.path, threads)
        nothing_to_apply = cal.folded or cal.method == "none"
        self.calibrator = None if nothing_to_apply else CALIBRATORS[cal.method].from_params(cal.params)

    def probs(self, pixel_values: np.ndarray) -> np.ndarray:
        """Calibrated P(roadwork) ``(B,)`` of ``pixel_values``, with any calibration the consumer must apply."""
        if self.calibrator is None:
            return self.session.probs(pixel_values)
        logits, _ = self.session.logits_and_probs(pixel_values)
        return self.calibrated(logits)

    def calibrated(self, logits: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
        """P(roadwork) as :meth:`probs` gives it, from the graph's outputs."""
        if self.calibrator is None:
            return probs[:, 1]
        return self.calibrator.probs(torch.from_numpy(logits)).numpy().astype(np.float32)

    def probs_and_embeddings(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(:meth:`probs`, logits, pooled embeddings) in one run of the graph (``session.embeds`` graphs only)."""
        logits, probs, embeddings = self.session.all_outputs(pixel_values)
        return self.calibrated(logits, probs), logits, embeddings


class Bundle:
    """An export bundle read as the inference stack reads it: manifest validated, files verified."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.manifest = load_manifest(self.path, verify)

    def router(self, name: str = "difficulty", threads: int | None = None) -> OnnxRouter:
        """The router ``name`` in ONNX Runtime (a ``BundleError`` when the bundle has no such router)."""
        entry = self.manifest.models.get(name)
        if entry is None or entry.kind != "router":
            raise BundleError(f"bundle {self.path} has no router {name!r}")
        return OnnxRouter(self.path / entry.files[entry.onnx.file].path, threads)

    def fusion(self, name: str = "fusion", threads: int | None = None) -> OnnxFusion:
        """The fusion head ``name`` in ONNX Runtime (a ``BundleError`` when the bundle has no such head)."""
        entry = self.manifest.models.get(name)
        if entry is None or entry.fusion is None:
            raise BundleError(f"bundle {self.path} has no fusion head {name!r}")
        return OnnxFusion(self.path / entry.files[entry.onnx.file].path, threads)

    def prm(self, name: str = "prm", threads: int | None = None) -> OnnxPRM:
        """The process reward model; its search settings are ``manifest.models[name].search``."""
        entry = self.manifest.models.get(name)
        if entry is None or entry.kind != "prm":
            raise BundleError(f"bundle {self.path} has no process reward model {name!r}")
        return OnnxPRM(self.path / entry.files[entry.onnx.file].path, threads)

    def classifier(self, name: str, threads: int | None = None, precision: str = FULL_PRECISION) -> BundleClassifier:
        """The image classifier ``name`` at ``precision`` (full precision or one of its variants); a ``BundleError`` for
        a missing model or a fusion head."""
        if name not in self.manifest.models:
            raise BundleError(f"bundle {self.path} has no model {name!r} (it has {sorted(self.manifest.models)})")
        if self.manifest.models[name].fusion is not None:
            raise BundleError(f"{name!r} is a fusion head (its inputs are features, not images): use Bundle.fusion")
        return BundleClassifier(self.path, self.manifest.models[name], threads, precision)
