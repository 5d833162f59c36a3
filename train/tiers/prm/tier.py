"""``task=prm``: the process reward model and PRM-guided test-time search over multi-view inspection traces.

1. **Views**: the calibrated Stage-1 (``prm.views_model``) runs once over every view of every query of the
   meta, calib and test splits (:func:`train.data.views.cached_view_outputs`: once per run, in ``<run>/views/``,
   shared with the feature store and reused on a rerun with the same model and settings).
2. **Traces and step labels** (Math-Shepherd): ``traces.per_query`` random traces of ``traces.budget`` views
   per query, each prefix labelled by ``traces.rollouts`` random continuations (``traces_<split>.safetensors``).
3. **Training** on meta (Stage-1 never saw it), per-step BCE against the ``traces.label`` labels; model
   selection by the step AUROC on a held-out part of meta (whole images).
4. **Search** on test at each view budget: PRM best-of-N, weighted best-of-N and beam search against the
   global view alone, the mean of the pool's margins and majority vote, overall and on the hard subset (the
   lowest Stage-1 confidence decile); ``search_curve.png``; what an early-stop threshold chosen on calib with
   Learn-then-Test would give (error among early answers <= alpha with probability 1 - delta). The deployed stop
   threshold is the thresholds stage's, when the PRM is a cascade tier (the export writes it into the search).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pydantic import Field, model_validator
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc, binary_matthews_corrcoef

from train.calibration.risk_control import ltt_from_counts, one_per_group
from train.config_schema import Built, Group, Levels, Positive, Probability, RiskControl, Selection
from train.data.splits import scene_groups, split_by_image
from train.data.views import ViewSet, cached_view_outputs
from train.export.bundle import export_prm
from train.metrics import paired_bootstrap_mcc
from train.models.prm import ProcessRewardModel, load_prm, save_prm
from train.models.search import TraceScorer, beam_search, best_of_n, greedy_view_order, pool_mean, pool_vote, view_pool
from train.models.traces import margins, rollout_labels, running_belief, sample_traces
from train.runs import Run, cached_tensors
from train.tiers.base import Fit, Outcome, Tier, register_tier, reseed
from train.tiers.calibration import calibrated, load_calibrated
from train.tiers.prm.module import PRMModule, TraceDataset, batched
from train.tiers.training import build_datamodule

log = logging.getLogger(__name__)
SPLITS = ("meta", "calib", "test")
STOP_GRID = np.round(np.linspace(1.0, 0.0, 201), 3)  # early-stop candidates, fixed before seeing any data


def split_traces(cfg: DictConfig, run: Run, views: dict, views_file, split: str, seed: int) -> dict:
    """Traces and step labels of a split, cached; ``views_file`` (the view cache, named by its fingerprint) ties them
    to the exact view outputs they were computed from."""
    tcfg, rule = cfg.prm.traces, cfg.prm.belief
    fingerprint = {**OmegaConf.to_container(tcfg), "belief": rule, "seed": seed, "views": views_file.name}

    def make() -> dict:
        traces = sample_traces(views["mask"], tcfg.per_query, tcfg.budget, seed)
        hard, soft = rollout_labels(margins(views["logits"]), views["mask"], views["label"], traces, tcfg.rollouts,
                                    tcfg.budget, rule, seed + 1)
        return {"traces": traces, "hard": hard, "soft": soft}

    return cached_tensors(run.task_dir("prm") / f"traces_{split}.safetensors", fingerprint, make)


def _flat(views: dict, traces: dict, queries: torch.Tensor, label: str, rule: str) -> TraceDataset:
    """The traces of the given queries, one row per trace."""
    k = traces["traces"].shape[1]
    rows = queries.repeat_interleave(k)
    flat = {name: traces[name][queries].flatten(0, 1) for name in ("traces", "hard", "soft")}
    return TraceDataset(views, rows, flat["traces"], flat[label], flat["hard"], rule)


@torch.no_grad()
def step_auroc(net: ProcessRewardModel, views: dict, traces: dict, rule: str) -> dict:
    """AUROC of the PRM's step scores against the hard step labels of held-out traces, next to the baseline of the
    running belief's own confidence (its magnitude), and the Brier score against the soft labels."""
    scorer = TraceScorer(net, views["embeddings"], margins(views["logits"]), rule)
    q, k, t = traces["traces"].shape
    rows, flat = torch.arange(q).repeat_interleave(k), traces["traces"].flatten(0, 1)
    scores = scorer(rows, flat).reshape(q, k, t)
    belief = running_belief(scorer.margin[rows.unsqueeze(1), flat], rule).abs().reshape(q, k, t)
    hard = traces["hard"].long()
    return {"step_auroc": float(binary_auroc(scores.flatten(), hard.flatten())),
            "step_auroc_last": float(binary_auroc(scores[..., -1].flatten(), hard[..., -1].flatten())),
            "belief_confidence_auroc": float(binary_auroc(belief.flatten(), hard.flatten())),
            "soft_brier": float(((scores - traces["soft"]) ** 2).mean()),
            "positive_rate": float(hard.float().mean())}


# ------------------------------------------------------------------------------------------------ search

BASELINES, SEARCHES, POOLS = ("mean", "vote"), ("best_of_n", "weighted_best_of_n", "beam"), ("ordered", "random")


def search_table(scorer: TraceScorer, mask: torch.Tensor, scfg: DictConfig, order: list[int],
                 seed: int) -> dict[str, dict[int, tuple]]:
    """``{"method@pool": {budget: (answers, views evaluated)}}`` on one split's cached queries, plus ``global``.

    At each budget both pools are searched: the views in the learnt inspection ``order`` and random views."""
    margin, out = scorer.margin, {"global": {}}
    available = int(mask.sum(-1).min())
    for budget in [b for b in scfg.budgets if b <= available]:
        for pool_name in POOLS:
            pool = view_pool(mask, budget, seed + budget, order if pool_name == "ordered" else None)
            if budget == 1:
                out["global"][1] = _entry(pool_mean(margin, pool, scorer.rule))
                break
            length = min(scfg.length, budget)
            results = {"mean": pool_mean(margin, pool, scorer.rule), "vote": pool_vote(margin, pool),
                       "best_of_n": best_of_n(scorer, pool, scfg.n, length, scfg.aggregation, False, seed),
                       "weighted_best_of_n": best_of_n(scorer, pool, scfg.n, length, scfg.aggregation, True, seed),
                       "beam": beam_search(scorer, pool, scfg.beam, length, scfg.aggregation).stopped(None)}
            for method, r in results.items():
                out.setdefault(f"{method}@{pool_name}", {})[budget] = _entry(r)
    return {m: v for m, v in out.items() if v}


def _entry(result) -> tuple[torch.Tensor, torch.Tensor]:
    return result.answer, result.views.float()


def mcc(answer: torch.Tensor, label: torch.Tensor) -> float:
    """MCC of 0/1 ``answer`` against ``label``."""
    return float(binary_matthews_corrcoef(answer.float(), label.long(), threshold=0.5))


def hard_subset(views: dict, fraction: float) -> torch.Tensor:
    """The queries in the lowest ``fraction`` of Stage-1's confidence on the global view."""
    confidence = margins(views["logits"][:, 0]).abs()
    return confidence <= torch.quantile(confidence, fraction)


def search_figures(table: dict, label: torch.Tensor, hard: torch.Tensor) -> dict:
    """MCC (all queries and the ``hard`` subset) and mean views evaluated per method and budget of a search table."""
    return {method: {str(b): {"mcc": mcc(a, label), "mcc_hard": mcc(a[hard], label[hard]), "views": float(v.mean())}
                     for b, (a, v) in by_budget.items()} for method, by_budget in table.items()}


def stop_threshold(trace, label: torch.Tensor, groups: np.ndarray, pcfg: DictConfig, seed: int):
    """Learn-then-Test over :data:`STOP_GRID`: stop at the first step (before the last) whose best beam scores >= t;
    the risk is the error rate among the queries answered early (one query per scene: independent samples)."""
    rows = torch.from_numpy(one_per_group(groups, seed))
    best, answer = trace.best_score[rows, :-1], trace.answer[rows, :-1]
    wrong = (answer != label[rows, None]).float()
    n, loss = [], []
    for t in STOP_GRID:
        hit = best >= t
        stopped = hit.any(1)
        first = hit.float().argmax(1)
        n.append(int(stopped.sum()))
        loss.append(float(wrong.gather(1, first[:, None])[:, 0][stopped].sum()))
    scfg = pcfg.search.stop
    return ltt_from_counts(STOP_GRID, n, loss, len(rows), scfg.alpha, scfg.delta, min_accepted=scfg.min_accepted)


def plot_search(path, figures: dict, stopped: dict, title: str) -> None:
    """Write the search curve to ``path``: MCC against views evaluated per method, on all test queries and the hard
    subset, the early stop starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    bases = sorted({m.split("@")[0] for m in figures}, key=list(("global",) + BASELINES + SEARCHES).index)
    colours = {b: plt.get_cmap("tab10")(k) for k, b in enumerate(bases)}
    for ax, key, name in ((axes[0], "mcc", "all test queries"), (axes[1], "mcc_hard", "hard subset")):
        for method, by_budget in figures.items():
            xs = [v["views"] for v in by_budget.values()]
            ax.plot(xs, [v[key] for v in by_budget.values()], marker="o", ms=4, label=method,
                    color=colours[method.split("@")[0]], linestyle="--" if method.endswith("@random") else "-")
        if stopped:
            ax.scatter([stopped["views"]], [stopped[key]], marker="*", s=120, c="k", label="beam + early stop")
        ax.set_xlabel("views evaluated per query")
        ax.set_ylabel("MCC")
        ax.set_title(name, fontsize=9)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{title}; solid: views in the learnt order, dashed: random views", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_prm(cfg: DictConfig, net: ProcessRewardModel, views: dict, traces: dict, calib_groups) -> dict:
    """Held-out step AUROC, the search table on test, the deployed search's early-stop threshold (calib) and its
    test figures, and the hard-subset comparison with the best baseline at every budget."""
    pcfg, scfg, seed = cfg.prm, cfg.prm.search, cfg.seed
    held_out = {s: step_auroc(net, views[s], traces[s], pcfg.belief) for s in ("calib", "test")}
    scorers = {s: TraceScorer(net, views[s]["embeddings"], margins(views[s]["logits"]), pcfg.belief)
               for s in ("calib", "test")}
    label, hard = views["test"]["label"], hard_subset(views["test"], pcfg.hard_fraction)
    order = greedy_view_order(margins(views["meta"]["logits"]), views["meta"]["mask"], views["meta"]["label"],
                              pcfg.belief)
    table = search_table(scorers["test"], views["test"]["mask"], scfg, order, seed)
    deployed = min(scfg.budget, *(int(views[s]["mask"].sum(-1).min()) for s in ("calib", "test")))
    length = min(scfg.length, deployed)
    deployed_order = order if scfg.pool == "ordered" else None
    beams = {s: beam_search(scorers[s], view_pool(views[s]["mask"], deployed, seed + deployed, deployed_order),
                            scfg.beam, length, scfg.aggregation) for s in ("calib", "test")}
    choice = stop_threshold(beams["calib"], views["calib"]["label"], calib_groups, pcfg, seed)
    stop = choice.threshold if scfg.method == "beam" else None
    stopped = beams["test"].stopped(stop)
    return {"held_out": held_out, "search": search_figures(table, label, hard),
            "early_stop": {"mcc": mcc(stopped.answer, label), "mcc_hard": mcc(stopped.answer[hard], label[hard]),
                           "views": float(stopped.views.float().mean()), "budget": deployed},
            "comparison": compare_at_budgets(table, label, hard, views["test"]["index"]),
            "hard_subset": {"fraction": pcfg.hard_fraction, "n": int(hard.sum())},
            "settings": {"method": scfg.method, "aggregation": scfg.aggregation, "n": scfg.n, "beam": scfg.beam,
                         "length": length, "budget": deployed, "belief": pcfg.belief, "stop_threshold": stop,
                         "pool": scfg.pool, "order": order},
            "stop_choice": choice}


class Views(Group):
    """``prm.views``: the views of each query (:class:`~train.data.views.ViewSet`'s arguments)."""
    tiles: list[Positive]
    zooms: list[Annotated[float, Field(gt=0, le=1)]]
    random_zooms: Annotated[int, Field(ge=0)]
    random_scale: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2, max_length=2)]
    cameras: Annotated[int, Field(ge=0)]
    seed: int


class Traces(Group):
    """``prm.traces``: random traces per query, views per trace, rollouts labelling each step, the label kind."""
    per_query: Positive
    budget: Positive
    rollouts: Positive
    label: Literal["soft", "hard"]


class Search(Group):
    """``prm.search``: the budgets compared, the deployed search and the risk control of its reported early stop."""
    budgets: list[Positive]
    method: Literal["beam", "best_of_n", "weighted_best_of_n"]
    budget: Positive
    pool: Literal["ordered", "random"]
    length: Positive
    n: Positive
    beam: Positive
    aggregation: Literal["min", "prod", "last"]
    stop: RiskControl


class Settings(Group):
    """``prm``: the views model and views, the traces, training and the search; the trace budget must fit the views."""
    views_model: str
    views: Views
    levels: Levels
    every_level: list[Literal["meta", "calib", "test"]]
    batch_size_views: Positive
    belief: Literal["mean", "max"]
    traces: Traces
    val_fraction: Probability
    epochs: Positive
    batch_size: Positive
    selection: Selection
    hard_fraction: Probability
    search: Search
    module: Built

    @model_validator(mode="after")
    def _budget_within_the_views(self) -> Settings:
        n = ViewSet(**self.views.model_dump()).n_crops
        if not 1 <= self.traces.budget <= n:
            raise ValueError(f"traces.budget={self.traces.budget} must be in [1, {n}]: the views every query has "
                             "(global, tiles, zooms; other cameras may be missing), see prm.views")
        return self


@dataclass
class Inputs:
    """What the PRM reads: the views and the views model's outputs on them, the traces with step labels per split, and
    the calib queries' scenes."""
    view_set: ViewSet
    spec: dict  # the views model's input
    views: dict[str, dict]  # split -> the views model's outputs on every view of every query
    view_files: dict[str, Path]
    traces: dict[str, dict]  # split -> traces and their step labels
    calib_groups: np.ndarray  # the calib queries' scenes


@register_tier
class PRMTier(Tier, name="prm", kind="prm", schema=Settings):
    """The process reward model over multi-view inspection traces, and the search it guides."""

    def needs(self, cfg: DictConfig) -> list[str]:
        return calibrated(cfg, cfg.prm.views_model)

    def inputs(self, cfg: DictConfig, run: Run, task_dir: Path) -> Inputs:
        pcfg = cfg.prm
        view_set = ViewSet(**OmegaConf.to_container(pcfg.views))
        model, config, _ = load_calibrated(run, pcfg.views_model)
        datamodule = build_datamodule(cfg, run, config["input"])
        views, view_files = {}, {}
        for s in SPLITS:
            views[s], view_files[s] = cached_view_outputs(run, model, datamodule, s, view_set, pcfg.levels,
                                                          s in pcfg.every_level, pcfg.batch_size_views)
        traces = {s: split_traces(cfg, run, views[s], view_files[s], s, cfg.seed + k) for k, s in enumerate(SPLITS)}
        calib_groups = scene_groups(datamodule.split("calib"))[views["calib"]["index"].numpy()]
        reseed(cfg)  # the same PRM whether the views and traces were computed or read back
        return Inputs(view_set, config["input"], views, view_files, traces, calib_groups)

    def module(self, cfg: DictConfig, run: Run, inputs: Inputs, task_dir: Path) -> PRMModule:
        return instantiate(cfg.prm.module, embed_dim=inputs.views["meta"]["embeddings"].shape[-1],
                           n_slots=len(inputs.view_set.names))

    def loaders(self, cfg: DictConfig, inputs: Inputs) -> tuple[DataLoader, DataLoader]:
        pcfg, views, traces = cfg.prm, inputs.views["meta"], inputs.traces["meta"]
        train_rows, val_rows = split_by_image(views["index"], pcfg.val_fraction, cfg.seed)
        return tuple(DataLoader(_flat(views, traces, rows.nonzero()[:, 0], pcfg.traces.label, pcfg.belief),
                                batch_size=pcfg.batch_size, shuffle=shuffle, collate_fn=batched)
                     for rows, shuffle in ((train_rows, True), (val_rows, False)))

    def finish(self, cfg: DictConfig, run: Run, fit: Fit, inputs: Inputs, task_dir: Path) -> Outcome:
        pcfg, views, traces = cfg.prm, inputs.views, inputs.traces
        net = fit.module.net.cpu().eval()
        extra = {"views": inputs.view_set.describe(), "views_model": pcfg.views_model, "input": inputs.spec}
        save_prm(net, task_dir / "prm", extra)  # the trained weights are kept even if the evaluation below fails
        report = evaluate_prm(cfg, net, views, traces, inputs.calib_groups)
        choice, settings = report.pop("stop_choice"), report.pop("settings")
        guarantee = {**choice.guarantee(), "rule": "stop inspecting when the best beam's last step scores >= "
                     "threshold; the guarantee bounds the error rate among the queries answered before the view budget"}
        accepted = {"threshold": settings["stop_threshold"], "guarantee": guarantee,
                    "calib": {"early_fraction": choice.acceptance_rate, "n_early": choice.n_accepted,
                              "early_error": choice.accepted_risk}}
        # the deployed stop threshold is the thresholds stage's (export fills it in): none of its own
        weights, model_config = save_prm(net, task_dir / "prm",
                                         {**extra, "search": {**settings, "stop_threshold": None}})
        report.update(acceptance=accepted, n={s: len(v["label"]) for s, v in views.items()})
        plot_search(task_dir / "search_curve.png", report["search"], report["early_stop"],
                    f"PRM-guided search vs baselines on test ({len(views['test']['label'])} queries, hard subset "
                    f"{report['hard_subset']['n']})")
        held_out, figures = report["held_out"], report["search"]
        metrics = {f"{s}/{k}": v for s, m in held_out.items() for k, v in m.items()}
        metrics.update({f"test/{m}/b{b}/{k}": v for m, by_b in figures.items() for b, f in by_b.items()
                        for k, v in f.items() if k != "views"})
        log.info("held-out step AUROC: calib %.3f, test %.3f", held_out["calib"]["step_auroc"],
                 held_out["test"]["step_auroc"])
        artifacts = {"model": weights, "model_config": model_config,
                     **{f"views_{s}": inputs.view_files[s] for s in SPLITS},
                     **{f"traces_{s}": task_dir / f"traces_{s}.safetensors" for s in SPLITS}}
        table = ({f"test/{m}/b{b}": f["mcc_hard"] for m, by_b in figures.items() for b, f in by_b.items()},
                 "PRM search on test: hard-subset MCC per view budget", "test",
                 [f"b{b}" for b in sorted({int(b) for by_b in figures.values() for b in by_b})])
        return Outcome(artifacts, metrics, report=report, figures={"search_curve": task_dir / "search_curve.png"},
                       table=table)

    def load(self, run: Run) -> tuple[ProcessRewardModel, dict]:
        return load_prm(run.artifact(self.name, "model"))

    def export(self, cfg: DictConfig, run: Run, folder: Path):
        """The PRM's ONNX with its search settings (the stop threshold: the thresholds stage's, when the PRM is a
        tier of the run's cascade), parity checked on real calib traces."""
        net, config = self.load(run)
        views, traces = (load_file(str(run.artifact(self.name, key))) for key in ("views_calib", "traces_calib"))
        scorer = TraceScorer(net, views["embeddings"], margins(views["logits"]), config["search"]["belief"])
        n = min(cfg.export.onnx.parity_images, len(views["label"]))
        example = scorer.inputs(torch.arange(n), traces["traces"][:n, 0])
        report = json.loads(run.artifact(self.name, "report").read_text())
        metrics = {**report["held_out"], "early_stop": report["early_stop"]}
        search = {**config["search"], "stop_threshold": deployed_threshold(run, self.name, config["search"]),
                  "views_model": config["views_model"], "views": config["views"]}
        return export_prm(self.name, net, config["input"], search, folder, example, metrics, cfg.export.onnx.opset,
                          cfg.export.onnx.parity_atol)


def deployed_threshold(run: Run, name: str, search: dict) -> float | None:
    """The PRM tier's threshold as the thresholds stage chose it; else the search's saved one (None since the PRM
    stage saves none; a run made before that kept its own)."""
    if run.is_complete("thresholds"):
        tiers = json.loads(run.artifact("thresholds", "thresholds").read_text())["tiers"]
        if name in tiers:
            return tiers[name]["threshold"]
    return search.get("stop_threshold")


def compare_at_budgets(table: dict, label: torch.Tensor, hard: torch.Tensor, groups) -> dict[str, dict]:
    """At every budget of 2 views or more: the hard-subset MCC of each PRM search on either pool against the best
    baseline at that budget (the global view, mean or vote over either pool), with a paired bootstrap interval of
    the difference (images resampled whole)."""
    out = {}
    for budget in sorted(table[f"mean@{POOLS[0]}"]):
        baselines = {f"{m}@{p}": table[f"{m}@{p}"][budget][0] for m in BASELINES for p in POOLS}
        baselines["global"] = table["global"][1][0]
        best = max(baselines, key=lambda m: mcc(baselines[m][hard], label[hard]))
        out[str(budget)] = {"best_baseline": best, **{
            f"{m}@{p}": paired_bootstrap_mcc(baselines[best][hard].float(), table[f"{m}@{p}"][budget][0][hard].float(),
                                             label[hard], groups=groups[hard]) for m in SEARCHES for p in POOLS}}
    return out
