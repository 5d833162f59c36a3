"""notebooks/: the functions their cells call (train/analysis/) on the shared run, and one notebook run end to end."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from train.analysis import bundle as B
from train.analysis import data as D
from train.analysis.runs import latest_run, notebook_run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_find_the_newest_run_with_the_stage_they_need(tiny_run, data_run, monkeypatch):
    monkeypatch.delenv("ROADWORK_RUN", raising=False)
    monkeypatch.setenv("ROADWORK_ROOT", str(tiny_run.path.parents[1]))
    assert notebook_run() == tiny_run.path == latest_run(needs="evaluate")
    with pytest.raises(FileNotFoundError, match="no run under .* has a complete 'export' stage"):
        latest_run(data_run.path.parent)  # data only
    assert latest_run(data_run.path.parent, needs="data") == data_run.path
    monkeypatch.setenv("ROADWORK_RUN", str(data_run.path))
    assert notebook_run(needs="data") == data_run.path


def test_the_bundle_notebook_shows_what_the_manifest_and_the_replay_hold(tiny_run):
    from train.calibration import calibration_report

    bundle = B.open_bundle(tiny_run.path)
    assert bundle.path == tiny_run.path / "export"
    stage1 = bundle.manifest.models["stage1"]
    (row,) = B.models_table(bundle).rows
    assert (row["model"], row["ece_before"], row["ece_after"]) == ("stage1", stage1.calibration.before["ece"],
                                                                    stage1.calibration.after["ece"])
    assert "<td>stage1</td>" in B.models_table(bundle)._repr_html_()
    assert [r["tier"] for r in B.tiers_table(bundle).rows] == [t.name for t in bundle.manifest.tiers]

    bars = B.level_metrics_figure(bundle, "stage1").axes[0].patches
    levels = [lv for lv in stage1.metrics if lv != "mean"]
    names = ("mcc", "acc", "f1", "auroc", "reward")
    assert [p.get_height() for p in bars] == pytest.approx([stage1.metrics[lv][m] for lv in levels for m in names])

    predictions = B.bundle_predictions(bundle)
    titles = [ax.get_title() for ax in B.reliability_figure(bundle, n_bins=10).axes if ax.get_title()]
    expected = [f"L{lv}: ECE {calibration_report(torch.from_numpy(p['prob']).float(), torch.from_numpy(p['label']), 10)['ece']:.3f}"
                for lv, p in predictions.items()]
    assert titles == expected and len(titles) == 4  # evaluate.levels: the four validator levels


def test_the_data_notebook_counts_the_splits_and_picks_by_class_and_difficulty(tiny_run):
    index = D.read_index(tiny_run.path)
    rows = D.split_table(index).rows
    assert sum(r["samples"] for r in rows) == len(index["label"])
    test = next(r for r in rows if r["split"] == "test")
    assert test["roadwork_share"] == pytest.approx(index["label"][index["split"] == "test"].mean())

    cells = D.pick_samples(index, per_cell=3, seed=1)
    for (label, name), picked in cells.items():
        low, high = D.DIFFICULTY_BINS[name]
        assert len(picked) == min(3, int(((index["split"] == "train") & (index["label"] == label)
                                          & (index["difficulty"] >= low) & (index["difficulty"] < high)).sum()))
        assert (index["label"][picked] == label).all() and (index["split"][picked] == "train").all()
        assert ((index["difficulty"][picked] >= low) & (index["difficulty"][picked] < high)).all()
    fig = D.sample_grid(index, per_cell=3, seed=1)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == sum(len(p) for p in cells.values())
    assert all(ax.images[0].get_array().shape[2] == 3 for ax in shown)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_thin_and_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert all(len(c.source.splitlines()) <= 6 for c in code)  # the logic lives in train/analysis/
    assert "parameters" in code[0].metadata.get("tags", [])  # RUN, e.g. for papermill


def test_the_bundle_notebook_runs_top_to_bottom_on_the_shared_run(tiny_run, monkeypatch):
    """nbclient runs every cell in a fresh kernel, on the run named by ROADWORK_RUN."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ROADWORK_RUN", str(tiny_run.path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(ROOT / "notebooks" / "bundle.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
                   ).execute()
    results = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "execute_result"]
    kinds = [("image/png" in o.data, "text/html" in o.data) for o in results]
    assert kinds == [(False, True), (False, True), (True, False), (True, False)]  # 2 tables, 2 figures
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(tiny_run.path / "export") in printed
