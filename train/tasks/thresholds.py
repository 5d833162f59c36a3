"""``task=thresholds``: every cascade tier's threshold, chosen together on the calib split.

The tiers of ``cascade.tiers`` (models of the run: the router, the draft, Stage-1/APT, the PRM) are evaluated in
PyTorch on the same validator queries as the view cache holds (calib and test, one level per image, in turn); the
thresholds are chosen tier by tier in order on calib (:func:`train.calibration.cascade.select_cascade`, one query
per scene so the samples are independent), then the cascade is previewed on test against the reference tier alone.
Writes ``thresholds.json`` (what the export stage puts into the manifest's tiers), ``report.json`` and the tier
outputs (``outputs_<split>.safetensors``) that the replay evaluator's test compares against.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.numpy import save_file
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_matthews_corrcoef

from train.calibration.cascade import select_cascade
from train.data.views import GLOBAL_ONLY, ViewSet, cached_view_outputs, query_plan, view_dataset
from train.errors import RunError
from train.export.cascade import Costs, TierOutput, beam_calls, route
from train.export.flops import count_flops
from train.metrics import paired_bootstrap_mcc
from train.models.search import TraceScorer, beam_search, view_pool
from train.models.traces import margins
from train.predictions import cached_queries, outputs_cache
from train.runs import Run
from train.tasks.registry import register_task
from train.tiers.base import get_tier
from train.tiers.calibration import calibrated
from train.tiers.cascade import one_per_scene, tier_record, tier_rules
from train.tiers.training import build_datamodule
from train.utils.console import cost_ratio
from train.utils.files import atomic_write_json

log = logging.getLogger(__name__)
SPLITS = ("calib", "test")


def cascade_order(cfg: DictConfig, run: Run) -> list[tuple[str, str]]:
    """``cascade.tiers`` as (name, kind) pairs, each a model the run recorded."""
    order = []
    for name in cfg.cascade.tiers:
        if not run.is_complete(name) and not (run.is_complete("calibrate") and name in cfg.calibrate.tiers):
            raise RunError(f"cascade.tiers has {name!r}, which run {run.path.name} has not trained (add its stage, "
                             f"or remove it from cascade.tiers)")
        order.append((name, get_tier(name).kind))  # no fusion head: config_checks.check_cascade refuses it
    return order


def _prm_output(net, config: dict, views: dict, index: np.ndarray, levels: np.ndarray) -> tuple[TierOutput, float]:
    """The deployed search on a split's view outputs: a :class:`TierOutput` per step, and the PRM's FLOPs per step."""
    s = config["search"]
    if s["method"] != "beam" or s["pool"] != "ordered":
        raise ValueError(f"the cascade routes through a PRM with method=beam and pool=ordered (the replay rebuilds "
                         f"that search exactly); the PRM has method={s['method']}, pool={s['pool']}")
    if not (np.array_equal(views["index"].numpy(), index) and np.array_equal(views["level"].numpy(), levels)):
        raise ValueError("the PRM's view outputs hold other queries than cascade.levels make: set cascade.levels to "
                         "prm.levels")
    scorer = TraceScorer(net, views["embeddings"], margins(views["logits"]), s["belief"])
    pool = view_pool(views["mask"], s["budget"], 0, s["order"])
    trace = beam_search(scorer, pool, s["beam"], s["length"], s["aggregation"])
    example = scorer.inputs(torch.arange(4), pool[:4, :s["length"]])
    per_step = count_flops(net, *example) / example[1].numel()
    calls = beam_calls(s["budget"], s["beam"], s["length"])
    out = TierOutput("prm", score=trace.best_score.numpy(), answer=trace.answer.numpy(), views=trace.views.numpy(),
                     prm_flops=np.tile(calls * per_step, (len(index), 1)))
    return out, per_step


@torch.no_grad()
def tier_outputs(cfg: DictConfig, run: Run, order, splits) -> tuple[dict, dict, dict]:
    """Every tier's PyTorch outputs on each split's queries, the models loaded once: ({split: {tier: TierOutput}},
    {split: {"label", "index", "level"}}, FLOPs per call). A classifier's logits come from the run's outputs cache
    when an earlier stage kept them for these queries (calibrate and the draft run every level of calib and test);
    the rest run here, in one pass over the queries."""
    loaded = {n: get_tier(n).load(run) for n, _ in order}
    if any(k == "router" for _, k in order) and "draft" not in loaded:
        loaded["draft"] = get_tier("draft").load(run)  # a router reads the draft's logits
    kinds = {n: get_tier(n).kind for n in loaded}
    classifiers = {n: model for n, (model, _) in loaded.items() if kinds[n] == "classifier"}
    routers = {n: model for n, (model, _) in loaded.items() if kinds[n] == "router"}
    prms = {n: loaded[n] for n in loaded if kinds[n] == "prm"}
    specs = {json.dumps(loaded[n][1]["input"], sort_keys=True) for n in classifiers}
    if len(specs) > 1:
        raise ValueError(f"the cascade's classifiers take different inputs ({sorted(specs)}); they must share one")
    datamodule = build_datamodule(cfg, run, json.loads(specs.pop()))
    outputs, meta, flops = {}, {}, {}
    for split in splits:
        index, level = query_plan(datamodule.split(split).num_rows, cfg.cascade.levels, every_level=False)
        labels = datamodule.split(split).column("label").to_numpy().astype(np.int64)
        meta[split] = {"label": labels[index], "index": index, "level": level}
        logits = {n: cached_queries(outputs_cache(run), m, datamodule, split, index, level)
                  for n, m in classifiers.items()}
        logits, scores = _global_pass(cfg, datamodule, split, classifiers, routers, logits)
        outputs[split] = {n: TierOutput("classifier", prob=lg.softmax(-1)[:, 1].numpy()) for n, lg in logits.items()}
        outputs[split].update({n: TierOutput("router", score=sc.numpy()) for n, sc in scores.items()})
        for n, (net, config) in prms.items():  # the views the PRM stage computed (calib, test), else computed here
            name = config["views_model"]
            views_model = classifiers[name] if name in classifiers else get_tier(name).load(run)[0]
            views, _ = cached_view_outputs(run, views_model, datamodule, split,
                                           ViewSet.from_description(config["views"]), cfg.cascade.levels)
            outputs[split][n], flops[n] = _prm_output(net, config, views, index, level)
    # FLOPs per image: the mean over a batch of queries (an elastic draft's tokens vary per image)
    queries = view_dataset(datamodule, splits[-1], GLOBAL_ONLY, cfg.cascade.levels)
    pixels = torch.stack([queries[k]["views"][0] for k in range(min(cfg.cascade.batch_size, len(queries)))])
    b = len(pixels)
    flops.update({n: count_flops(m, pixels) / b for n, m in classifiers.items()})
    flops.update({n: count_flops(r, pixels, logits["draft"][:b]) / b for n, r in routers.items()})
    return outputs, meta, flops


def _global_pass(cfg: DictConfig, datamodule, split: str, classifiers: dict, routers: dict,
                 known: dict[str, torch.Tensor | None]) -> tuple[dict, dict]:
    """Each classifier's logits (those ``known`` kept as they are) and each router's score on the split's global
    queries: one pass over them when anything is left to run."""
    todo = {n: m for n, m in classifiers.items() if known[n] is None}
    if not todo and not routers:
        return dict(known), {}
    loader = DataLoader(view_dataset(datamodule, split, GLOBAL_ONLY, cfg.cascade.levels),
                        batch_size=cfg.cascade.batch_size, num_workers=cfg.data.num_workers)
    ran, scores, start = {n: [] for n in todo}, {n: [] for n in routers}, 0
    for batch in loader:
        pixels = batch["views"][:, 0]
        end = start + len(pixels)
        logits = {n: lg[start:end] for n, lg in known.items() if lg is not None}
        for n, model in todo.items():
            logits[n] = model.eval()(pixels).float()
            ran[n].append(logits[n])
        for n, router in routers.items():
            scores[n].append(router.eval()(pixels, logits["draft"])[:, router.targets.index("draft")].sigmoid())
        start = end
    return {**known, **{n: torch.cat(v) for n, v in ran.items()}}, {n: torch.cat(v) for n, v in scores.items()}


def costs_of(order, flops: dict[str, float], prm_views_model: str = "stage1") -> Costs:
    """The cascade's :class:`Costs` from ``flops`` per call: the PRM tiers left out (their FLOPs count per step), each
    router needing the draft."""
    needs = {n: ["draft"] for n, k in order if k == "router"}
    return Costs({n: f for n, f in flops.items() if n not in {m for m, k in order if k == "prm"}}, needs,
                 prm_views_model)


def save_outputs(path, outputs: dict[str, TierOutput], meta: dict) -> None:
    """Write a split's tier outputs (``<tier>/<field>``) and its query metadata into one safetensors file."""
    tensors = {f"{n}/{field}": np.ascontiguousarray(getattr(o, field)) for n, o in outputs.items()
               for field in ("prob", "score", "answer", "views", "prm_flops") if getattr(o, field) is not None}
    save_file({**tensors, **{k: np.ascontiguousarray(v) for k, v in meta.items()}}, str(path))


def choose_alpha(cfg: DictConfig, order, outputs: dict, meta: dict, rows: np.ndarray,
                 costs: Costs) -> tuple[float, list[dict]]:
    """The operating point (``cascade.operating_point``): at each alpha of ``cascade.sweep``, every threshold chosen
    on calib, then the cascade run on the held-out split. Returns the cheapest alpha whose MCC there is at least the
    baseline's minus ``max_mcc_drop`` (the strictest alpha when none is), and the rows of that comparison."""
    op, c = cfg.cascade.operating_point, cfg.cascade
    held, baseline = meta[op.split], c.baseline
    label = held["label"]
    rows_out = []
    for alpha in sorted(float(a) for a in c.sweep):
        chosen = select_cascade(order, outputs["calib"], meta["calib"]["label"], tier_rules(cfg, order, alpha),
                                c.reference, rows)
        routed = route(order, outputs[op.split], {ch.name: ch.threshold for ch in chosen}, costs)
        mcc_cascade = float(binary_matthews_corrcoef(torch.from_numpy(routed.answer), torch.from_numpy(label)))
        mcc_base = float(binary_matthews_corrcoef(torch.from_numpy(outputs[op.split][baseline].decision),
                                                  torch.from_numpy(label)))
        rows_out.append({"alpha": alpha, "mcc": mcc_cascade, "mcc_baseline": mcc_base,
                         "flops_ratio": costs.per_call[baseline] / float(routed.flops.mean()),
                         "eligible": mcc_cascade >= mcc_base - float(op.max_mcc_drop)})
    eligible = [r for r in rows_out if r["eligible"]]
    best = max(eligible, key=lambda r: (r["flops_ratio"], r["mcc"])) if eligible else rows_out[0]
    return best["alpha"], rows_out


def preview(order, outputs, meta, thresholds, costs: Costs, reference: str) -> dict:
    """The cascade on test against the reference tier alone: exits, MCC (paired bootstrap), mean FLOPs."""
    routed = route(order, outputs, thresholds, costs)
    label = torch.from_numpy(meta["label"])
    ref = outputs[reference]
    diff = paired_bootstrap_mcc(torch.from_numpy(ref.decision).float(), torch.from_numpy(routed.answer).float(), label,
                                groups=torch.from_numpy(meta["index"]))
    ref_flops = costs.per_call[reference]
    return {"exit_fraction": {n: float((routed.exit == k).mean()) for k, (n, _) in enumerate(order)},
            "mcc_cascade": diff["mcc_b"], "mcc_reference": diff["mcc_a"],
            "mcc_difference": {k: diff[k] for k in ("delta", "low", "high")},
            "mean_flops": float(routed.flops.mean()), "reference_flops": ref_flops,
            "flops_ratio": ref_flops / float(routed.flops.mean()), "mean_views": float(routed.views.mean())}


def _needs(cfg: DictConfig) -> list[str]:
    """The cascade's tiers (the classifiers calibrated); a router reads the draft's answers."""
    needs = [stage for tier in cfg.cascade.tiers for stage in calibrated(cfg, tier)]
    return needs + (["draft"] if "difficulty" in cfg.cascade.tiers else [])


@register_task("thresholds", needs=_needs)
def run_thresholds(cfg: DictConfig, run: Run) -> dict:
    """``task=thresholds``: choose every cascade tier's threshold on calib (at the operating point's alpha when set),
    preview the cascade on test and write ``thresholds.json``; returns alpha and the test figures."""
    task_dir, c = run.task_dir("thresholds"), cfg.cascade
    order = cascade_order(cfg, run)
    op = c.get("operating_point")
    splits = SPLITS + ((op.split,) if op is not None else ())
    outputs, meta, flops = tier_outputs(cfg, run, order, splits)
    for split in SPLITS:
        save_outputs(task_dir / f"outputs_{split}.safetensors", outputs[split], meta[split])
    rows = one_per_scene(cfg, run, "calib", meta["calib"]["index"])
    costs = costs_of(order, flops)
    alpha, candidates = choose_alpha(cfg, order, outputs, meta, rows, costs) if op is not None else (c.alpha, None)
    rules = tier_rules(cfg, order, alpha)
    chosen = select_cascade(order, outputs["calib"], meta["calib"]["label"], rules, c.reference, rows)
    names = [n for n, _ in order]
    tiers = {ch.name: tier_record(ch) for ch in chosen}
    thresholds = {n: t["threshold"] for n, t in tiers.items()}
    operating = None if op is None else {"split": op.split, "max_mcc_drop": float(op.max_mcc_drop), "alpha": alpha,
                                         "baseline": c.baseline, "candidates": candidates}
    report = {"order": names, "reference": c.reference, "alpha": alpha, "operating_point": operating,
              "n_calibration_independent": int(len(rows)), "tiers": tiers, "flops_per_call": flops,
              "test": preview(order, outputs["test"], meta["test"], thresholds, costs, c.baseline)}
    atomic_write_json(task_dir / "thresholds.json", {"order": names, "kinds": dict(order), "reference": c.reference,
                                                     "alpha": alpha, "operating_point": operating, "tiers": tiers})
    atomic_write_json(task_dir / "report.json", report)
    if operating is not None:
        log.info("operating point on %s: alpha %g (the cheapest of %s whose %s MCC is >= %s's - %g)", op.split, alpha,
                 [r["alpha"] for r in candidates], op.split, c.baseline, op.max_mcc_drop)
    t = report["test"]
    log.info("cascade on test (PyTorch): MCC %.3f vs %s alone %.3f (difference %+.3f [%+.3f, %+.3f]); mean FLOPs "
             "%.3g = %s; exits %s", t["mcc_cascade"], c.baseline, t["mcc_reference"],
             t["mcc_difference"]["delta"], t["mcc_difference"]["low"], t["mcc_difference"]["high"], t["mean_flops"],
             cost_ratio(t["flops_ratio"]), {k: round(v, 3) for k, v in t["exit_fraction"].items()})
    for n, tier in tiers.items():
        log.info("tier %-10s threshold %s (%s)", n, tier["threshold"], tier["risk"])
    metrics = {"alpha": alpha, "test/mcc_cascade": t["mcc_cascade"], "test/mcc_reference": t["mcc_reference"],
               "test/flops_ratio": t["flops_ratio"], **{f"test/exit/{k}": v for k, v in t["exit_fraction"].items()}}
    run.record("thresholds", artifacts={"thresholds": task_dir / "thresholds.json", "report": task_dir / "report.json",
                                        **{f"outputs_{s}": task_dir / f"outputs_{s}.safetensors" for s in SPLITS}},
               metrics=metrics)
    return metrics
