"""The cascade: risk-controlled thresholds with known true risks, the decision rule, the numpy beam search against
the PyTorch one, and the thresholds -> export -> replay chain on the shared PRM run (replay decisions equal the
PyTorch tiers' decisions on the same queries)."""
import json

import numpy as np
import pytest
import torch
from conftest import QUIET, compose_config, copy_run
from safetensors.numpy import load_file

from train.__main__ import run_task
from train.calibration.cascade import TierRule, select_cascade
from train.calibration.risk_control import crc_threshold, select_threshold
from train.export import load_manifest
from train.export.cascade import Costs, TierOutput, beam_calls, route
from train.export.replay import beam_search as numpy_beam_search
from train.export.replay import ordered_pool
from train.models.prm import ProcessRewardModel
from train.models.search import TraceScorer, beam_search, view_pool
from train.tasks.thresholds import choose_alpha


# ------------------------------------------------------------------------------------ guarantees with known risk

def _draw(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Confidence ~ U(0, 1), P(error | c) = (1 - c) / 2: the risk among c >= t is (1 - t) / 4, the joint risk
    P(c >= t and error) is (1 - t)^2 / 4."""
    c = rng.uniform(size=n)
    return c, (rng.uniform(size=n) < (1 - c) / 2).astype(float)


@pytest.mark.parametrize("p_value", ["hoeffding_bentkus", "binomial"])
def test_learn_then_test_holds_its_guarantee_on_resampled_splits(p_value):
    alpha, delta, n, draws = 0.1, 0.1, 1000, 300
    rng = np.random.default_rng(0)
    violations, accepted = 0, []
    for _ in range(draws):
        choice = select_threshold(*_draw(n, rng), alpha, delta, method=p_value, min_accepted=20)
        t = 1.0 if choice.threshold is None else choice.threshold
        violations += (1 - t) / 4 > alpha  # the true risk among accepted at the chosen threshold
        accepted.append(1 - t)
    # at most delta of the draws (+3 sigma of sampling error), and not vacuous (at most 60% may be accepted)
    assert violations / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    assert 0.1 < np.mean(accepted) <= 0.62


def test_conformal_risk_control_bounds_the_expected_joint_risk():
    alpha, n, draws = 0.05, 500, 400
    rng = np.random.default_rng(1)
    risks = []
    for _ in range(draws):
        choice = crc_threshold(*_draw(n, rng), alpha)
        t = 1.0 if choice.threshold is None else choice.threshold
        risks.append((1 - t) ** 2 / 4)
    # E[risk(chosen t)] <= alpha (the boundary is t* = 1 - sqrt(4 alpha) = 0.553); and tight, not vacuous
    assert np.mean(risks) <= alpha and np.mean(risks) > 0.8 * alpha


def test_tiers_are_chosen_in_order_on_the_samples_that_reach_them():
    """Tier 2's threshold is tested only on what tier 1 passed on; the disagreement with the reference counts for
    the tier before it, the label for the reference."""
    rng = np.random.default_rng(2)
    n = 4000
    label = rng.integers(0, 2, n)
    stage1 = np.where(rng.uniform(size=n) < 0.8, label, 1 - label) * 0.6 + 0.2  # 80% right, confidence 0.8
    draft = np.clip(stage1 + rng.normal(0, 0.25, n), 0.01, 0.99)
    order = [("draft", "classifier"), ("stage1", "classifier")]
    outputs = {"draft": TierOutput("classifier", prob=draft), "stage1": TierOutput("classifier", prob=stage1)}
    rules = {"draft": TierRule(alpha=0.05, min_accepted=20), "stage1": TierRule(alpha=0.3)}
    draft_choice, last = select_cascade(order, outputs, label, rules, reference="stage1")
    # the draft alone, held to agreeing with Stage-1, gets exactly this threshold
    same = select_threshold(outputs["draft"].confidence, (outputs["draft"].decision != outputs["stage1"].decision),
                            0.05, 0.1, method="hoeffding_bentkus", min_accepted=20)
    assert draft_choice.threshold == same.threshold and draft_choice.n_reaching == n
    assert last.choice is None and last.n_reaching == n - same.n_accepted  # the last tier answers the rest


# ------------------------------------------------------------------------------------------ the decision rule

def test_route_follows_the_manifest_rules_and_counts_every_model_once():
    order = [("router", "router"), ("draft", "classifier"), ("stage1", "classifier"), ("prm", "prm")]
    outputs = {
        "router": TierOutput("router", score=np.array([0.1, 0.9, 0.1, 0.1])),
        "draft": TierOutput("classifier", prob=np.array([0.95, 0.99, 0.6, 0.6])),
        "stage1": TierOutput("classifier", prob=np.array([0.5, 0.5, 0.1, 0.6])),
        "prm": TierOutput("prm", score=np.array([[0.1, 0.2, 0.3]] * 3 + [[0.2, 0.9, 0.1]]),
                          answer=np.array([[0, 0, 1]] * 4), views=np.array([[1, 2, 3]] * 4),
                          prm_flops=np.array([[1.0, 5.0, 11.0]] * 4))}
    costs = Costs({"router": 10.0, "draft": 100.0, "stage1": 1000.0}, {"router": ["draft"]}, "stage1")
    r = route(order, outputs, {"router": 0.5, "draft": 0.9, "stage1": 0.8, "prm": 0.8}, costs)
    # 0: draft accepts; 1: routed up (skips the draft's confident answer), PRM to its budget; 2: Stage-1 accepts
    # (confidence 0.9); 3: PRM stops at step 1 (score 0.9)
    assert r.exit.tolist() == [1, 3, 2, 3] and r.answer.tolist() == [1, 1, 0, 0] and r.views.tolist() == [0, 3, 0, 2]
    assert r.flops.tolist() == [110.0, 110 + 1000 + 2 * 1000 + 11, 1110.0, 110 + 1000 + 1000 + 5]
    # a non-last tier without a threshold accepts nothing
    r = route(order, outputs, {"router": None, "draft": None, "stage1": None, "prm": None}, costs)
    assert r.exit.tolist() == [3, 3, 3, 3] and r.views.tolist() == [3, 3, 3, 3]


def test_beam_calls_count_the_steps_the_beam_search_scores():
    calls = []

    class Counting(TraceScorer):
        def __call__(self, rows, traces):
            calls.append(traces.numel())
            return super().__call__(rows, traces)

    prm = ProcessRewardModel(embed_dim=8, n_slots=6, width=16, layers=1, heads=2)
    scorer = Counting(prm, torch.randn(3, 6, 8), torch.randn(3, 6))
    for budget, beam, length in [(3, 2, 3), (6, 2, 3), (5, 3, 4)]:
        calls.clear()
        beam_search(scorer, view_pool(torch.ones(3, 6, dtype=torch.bool), budget), beam, length)
        assert beam_calls(budget, beam, length)[-1] == pytest.approx(sum(calls) / 3)


def test_numpy_beam_search_matches_the_pytorch_one():
    torch.manual_seed(0)
    q, v, d = 40, 8, 16
    prm = ProcessRewardModel(embed_dim=d, n_slots=v, width=32, layers=2, heads=4).eval()
    emb, margin = torch.randn(q, v, d), torch.randn(q, v) * 2
    mask = torch.rand(q, v) > 0.2
    mask[:, :4] = True
    order = [0, 5, 2, 7, 1, 3, 4, 6]
    pool = view_pool(mask, 4, order=order)
    assert np.array_equal(pool.numpy(), ordered_pool(mask.numpy(), 4, order))
    expected = beam_search(TraceScorer(prm, emb, margin), pool, beam=2, length=3, aggregation="min")

    def score(e, m, b, s):
        with torch.no_grad():
            return prm(*(torch.from_numpy(x) for x in (e, m, b, s))).sigmoid().numpy()

    got = numpy_beam_search(score, margin.numpy(), emb.numpy(), pool.numpy(), 2, 3, "min", "mean")
    assert np.allclose(got.score, expected.best_score.numpy(), atol=1e-6)
    assert np.array_equal(got.answer, expected.answer.numpy()) and np.array_equal(got.views, expected.views.numpy())


def test_the_operating_point_is_the_cheapest_alpha_that_keeps_the_baselines_mcc_on_the_held_out_split():
    """Easy samples: the draft is sure and agrees with Stage-1. Hard ones: it is unsure and answers at random. A strict
    alpha lets it answer the easy ones only (the cascade's MCC = Stage-1's); a loose one lets it answer all (cheaper,
    worse). The choice keeps the MCC unless the allowed drop is large."""
    rng = np.random.default_rng(0)

    def split(n: int):
        label = rng.integers(0, 2, n)
        stage1 = np.where(rng.uniform(size=n) < 0.9, label, 1 - label)
        hard = rng.uniform(size=n) < 0.3
        draft_answer = np.where(hard, rng.integers(0, 2, n), stage1)
        draft_conf = np.where(hard, rng.uniform(0.5, 0.6, n), rng.uniform(0.9, 1.0, n))
        draft = np.where(draft_answer == 1, draft_conf, 1 - draft_conf)
        return ({"draft": TierOutput("classifier", prob=draft),
                 "stage1": TierOutput("classifier", prob=np.where(stage1 == 1, 0.8, 0.2))}, {"label": label})

    (calib, calib_meta), (val, val_meta) = split(2000), split(2000)
    order = [("draft", "classifier"), ("stage1", "classifier")]
    costs = Costs({"draft": 1.0, "stage1": 10.0})
    outputs, meta = {"calib": calib, "val": val}, {"calib": calib_meta, "val": val_meta}
    for drop, expected in ((0.0, 0.01), (1.0, 0.4)):
        cfg = compose_config("cascade.sweep=[0.01,0.4]", "cascade.tier_alpha={}", "cascade.min_accepted=20",
                             f"cascade.operating_point={{split:val,max_mcc_drop:{drop}}}")
        alpha, rows = choose_alpha(cfg, order, outputs, meta, np.arange(2000), costs)
        assert alpha == expected, rows
        strict, loose = rows
        assert loose["flops_ratio"] > 1.5 * strict["flops_ratio"] > 1.5  # the draft answers more at the loose alpha
        assert abs(strict["mcc"] - strict["mcc_baseline"]) < 0.02 and loose["mcc"] < loose["mcc_baseline"] - 0.1


# ----------------------------------------------------------------------------- thresholds -> export -> replay

@pytest.fixture(scope="module")
def cascade_run(prm_tiers, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    run = copy_run(prm_tiers[0], root)
    # 24 independent calib samples: Learn-then-Test could accept nothing, conformal risk control does (and gets wired
    # end to end)
    base = [f"paths.root_dir={root}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET, f"run_dir={run.path}",
            "cascade.tiers=[difficulty,draft,stage1,prm]", "cascade.method=crc", "cascade.alpha=0.3",
            "cascade.tier_alpha.stage1=0.15",
            "cascade.tier_alpha.difficulty=0.3", "+cascade.tier_alpha.draft=0.01", "cascade.sweep=[0.3]",
            "cascade.operating_point={split:val,max_mcc_drop:0.0}"]  # one candidate: the val path runs, alpha stays
    for task in ("thresholds", "export", "evaluate"):
        extra = ["export.models=[difficulty,draft,stage1,prm]"] if task in ("export", "evaluate") else []
        run_task(compose_config(*base, f"task={task}", *extra))
    return run


def test_thresholds_reach_the_manifest_with_their_guarantee(cascade_run):
    run = cascade_run
    chosen = json.loads(run.artifact("thresholds", "thresholds").read_text())
    manifest = load_manifest(run.path / "export")
    assert [(t.name, t.kind) for t in manifest.tiers] == [("difficulty", "router"), ("draft", "classifier"),
                                                          ("stage1", "classifier"), ("prm", "prm")]
    reached = [t for t in manifest.tiers[:-1] if chosen["tiers"][t.name]["n_reaching"] > 0]
    assert [t.name for t in reached][:2] == ["difficulty", "draft"]
    # the draft's alpha is the operating point chosen on val among cascade.sweep (tiers with their own alpha keep it)
    op = chosen["operating_point"]
    assert op["split"] == "val" and [c["alpha"] for c in op["candidates"]] == [0.3] == [chosen["alpha"]]
    assert 0 < op["candidates"][0]["flops_ratio"] and -1 <= op["candidates"][0]["mcc"] <= 1
    for tier in reached:
        g = tier.guarantee
        assert tier.threshold == chosen["tiers"][tier.name]["threshold"] and g.method == "conformal_risk_control"
        assert g.alpha == {"stage1": 0.15, "difficulty": 0.3, "draft": 0.01}[tier.name] and g.delta is None
        assert g.n_calibration == chosen["tiers"][tier.name]["n_reaching"] and tier.rule
    # the router's guarantee is stated on its own score, and CRC's bound holds on calib: (loss + 1) / (n + 1) <= alpha
    assert "router score <=" in reached[0].guarantee.statement
    # the draft at alpha 0.01 < 1 / (n + 1) can accept nothing (so the test queries reach the later tiers)
    assert reached[1].threshold is None and reached[1].guarantee.n_accepted == 0
    for tier in reached:
        g = tier.guarantee
        if g.n_accepted:
            assert (g.empirical_risk * g.n_accepted + 1) / (g.n_calibration + 1) <= g.alpha + 1e-9
    assert manifest.tiers[-1].threshold is None and manifest.tiers[-1].guarantee is None
    assert all(m.flops.per_call > 0 for m in manifest.models.values())
    assert (run.path / "export" / "manifest.schema.json").is_file()


def test_replay_decisions_equal_the_pytorch_tiers(cascade_run):
    """The bundle replayed in ONNX Runtime routes every test query as the thresholds stage's PyTorch outputs do
    under the manifest's thresholds; FLOPs per query follow the manifest's counts."""
    run = cascade_run
    manifest = load_manifest(run.path / "export")
    torch_out = load_file(str(run.artifact("thresholds", "outputs_test")))
    replay = load_file(str(run.artifact("evaluate", "cascade_test")))
    assert np.array_equal(replay["index"], torch_out["index"]) and np.array_equal(replay["level"], torch_out["level"])
    order = [(t.name, t.kind) for t in manifest.tiers]
    outputs = {n: TierOutput(k, **{f: torch_out[f"{n}/{f}"] for f in ("prob", "score", "answer", "views", "prm_flops")
                                   if f"{n}/{f}" in torch_out}) for n, k in order}
    expected = route(order, outputs, {t.name: t.threshold for t in manifest.tiers})
    assert np.array_equal(replay["answer"], expected.answer) and np.array_equal(replay["exit"], expected.exit)
    assert np.array_equal(replay["views"], expected.views)
    assert len(set(replay["exit"].tolist())) >= 2  # the test goes through more than one tier
    flops = {n: m.flops.per_call for n, m in manifest.models.items()}
    s = manifest.models["prm"].search
    per_step = -(-(s.budget - 1) // max(s.length - 1, 1))
    views_by_step = np.array([min(s.budget, 1 + t * per_step) for t in range(s.length)])
    calls = beam_calls(s.budget, s.beam, s.length) * flops["prm"]
    reached = replay["views"] > 0
    step = np.minimum(np.searchsorted(views_by_step, replay["views"]), s.length - 1)
    want = (flops["difficulty"] + flops["draft"] + (replay["exit"] >= 2) * flops["stage1"]
            + np.maximum(replay["views"] - 1, 0) * flops["stage1"] + np.where(reached, calls[step], 0.0))
    assert np.allclose(replay["flops"], want, rtol=1e-9)
    report = json.loads(run.artifact("evaluate", "cascade").read_text())
    assert report["flops"]["ratio"] == pytest.approx(flops["stage1"] / replay["flops"].mean())
    assert {p["alpha"] for p in report["sweep"]} == {0.3} and (run.path / "evaluate" / "cascade_curve.png").is_file()
    (point,) = report["sweep"]  # each alpha's paired interval is of its MCC against the reference's on the same queries
    assert point["mcc_delta"] == pytest.approx(point["mcc"] - report["metrics"]["reference"]["all"]["mcc"], abs=1e-6)
    assert point["mcc_delta_low"] <= point["mcc_delta"] <= point["mcc_delta_high"]


def test_the_tiers_logits_kept_by_earlier_stages_equal_running_the_tiers(cascade_run, data_dir, tmp_path, monkeypatch):
    """The thresholds stage reads the classifiers' logits that calibrate and the draft kept for every level of calib
    (one level per image gathered from them); without that cache it runs the tiers, and the outputs are the same."""
    import shutil

    from train.tasks import thresholds

    run = copy_run(cascade_run, tmp_path)
    cfg = compose_config(f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET,
                         f"run_dir={run.path}", "cascade.tiers=[difficulty,draft,stage1,prm]", "task=thresholds")
    order = thresholds.cascade_order(cfg, run)
    seen, global_pass = [], thresholds._global_pass
    monkeypatch.setattr(thresholds, "_global_pass", lambda *a: seen.append(dict(a[-1])) or global_pass(*a))
    cached, meta, _ = thresholds.tier_outputs(cfg, run, order, ["calib"])
    shutil.rmtree(run.path / "outputs")
    ran, meta_ran, _ = thresholds.tier_outputs(cfg, run, order, ["calib"])
    assert all(v is not None for v in seen[0].values()) and all(v is None for v in seen[1].values())
    assert all(np.array_equal(meta["calib"][k], meta_ran["calib"][k]) for k in ("label", "index", "level"))
    for name, kind in order:
        field = "prob" if kind == "classifier" else "score"
        assert np.allclose(getattr(cached["calib"][name], field), getattr(ran["calib"][name], field), atol=1e-5)
