"""Progress of long steps (train/utils/console.py): plain log lines off a terminal, a rich bar on one, and the lines
the shared tiny run's train.log holds for its data, calibrate, export and evaluate steps."""
import json
import logging
import re
from io import StringIO

import pytest
from rich.console import Console

import train.utils.console as console_module
from train.utils.console import progress, track


@pytest.fixture
def no_terminal(monkeypatch):
    """What CI and nohup give: no terminal, and milestone lines however fast the step."""
    monkeypatch.setattr(console_module, "console", Console(file=StringIO()))
    monkeypatch.setattr(console_module, "QUIET_FOR_S", 0.0)


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "train.progress"]


def test_off_a_terminal_the_log_says_start_quarters_and_done(no_terminal, caplog):
    with caplog.at_level(logging.INFO):
        assert [b for b in track(range(8), "demo: loop", unit="items")] == list(range(8))
    lines = progress_lines(caplog)
    assert lines[0] == "demo: loop: starting (8 items)"
    assert [re.sub(r" in .*", "", line) for line in lines[1:]] == [
        "demo: loop: 2/8 items (25%)", "demo: loop: 4/8 items (50%)", "demo: loop: 6/8 items (75%)",
        "demo: loop: 8/8 items"]
    assert "about" in lines[1] and "left" in lines[1]  # the ETA
    assert re.fullmatch(r"demo: loop: 8/8 items in \d+\.\d s \(\d+\.\d items/s\)", lines[-1])


def test_counts_units_steps_and_failures(no_terminal, caplog, monkeypatch):
    monkeypatch.setattr(console_module, "QUIET_FOR_S", 3600.0)  # a fast step: start and done only
    with caplog.at_level(logging.INFO):
        list(track([[1, 2, 3], [4, 5]], "rows", total=5, unit="queries", count=len))
        with progress("export: ONNX graphs", 3, "graphs") as step:
            for _ in range(3):
                step.advance()
        for i in track(iter(range(10)), "open-ended"):  # no total; left early: what was done counts
            if i == 1:
                break
        with pytest.raises(RuntimeError), progress("failing", 4) as step:
            step.advance(1)
            raise RuntimeError("boom")
    lines = [re.sub(r" in \d.*| after \d.*", "", line) for line in progress_lines(caplog)]
    assert lines == ["rows: starting (5 queries)", "rows: 5/5 queries",
                     "export: ONNX graphs: starting (3 graphs)", "export: ONNX graphs: 3/3 graphs",
                     "open-ended: starting", "open-ended: 1 batches",
                     "failing: starting (4 steps)", "failing: stopped at 1/4 steps"]


def test_a_terminal_gets_the_training_bar_and_the_file_log_the_lines(monkeypatch, caplog):
    monkeypatch.setattr(console_module, "QUIET_FOR_S", 3600.0)  # no milestone lines: start and done
    out = StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=out, force_terminal=True, force_interactive=True,
                                                           width=100))
    with caplog.at_level(logging.INFO):
        with progress("export: ONNX graphs", 6, "graphs") as step:
            for _ in range(6):
                for _ in track(range(2), "inner", unit="batches"):  # a nested step shares the live display
                    pass
                step.advance()
    text = out.getvalue()
    assert "export: ONNX graphs" in text and "━" in text and "graphs/s" in text and "inner" in text
    assert re.search(r"\d/6", text) and "0:00:00 •" in text  # count, elapsed • remaining
    shown = {r.getMessage().split(": ")[-1].split(" ")[0]: getattr(r, "_roadwork_on_bar")
             for r in caplog.records if r.name == "train.progress"}
    assert shown == {"starting": True, "6/6": False, "2/2": False}  # the console skips what the bar shows
    assert console_module._bar is None  # the display is gone once the outer step is done


def test_the_console_handler_skips_what_the_bar_shows():
    from rich.logging import RichHandler

    console_module.setup_logging()
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h, RichHandler)]
    assert not handler.filter(logging.makeLogRecord({"msg": "shown on the bar", "_roadwork_on_bar": True}))
    assert handler.filter(logging.makeLogRecord({"msg": "done"}))


def test_rendering_the_synthetic_data_shows_progress(tmp_path, caplog):
    from train.data.synthetic_source import SyntheticSource

    with caplog.at_level(logging.INFO):
        SyntheticSource(str(tmp_path), n_scenes=3, views_per_scene=1, image_size=64, workers=1).prepare()
    assert "synthetic data: rendering: starting (3 scenes)" in progress_lines(caplog)
    assert any(line.startswith("synthetic data: rendering: 3/3 scenes in ") for line in progress_lines(caplog))


def test_tiny_run_log_shows_progress_of_each_long_step(tiny_run):
    log = (tiny_run.path / "train.log").read_text()
    assert "synthetic data: reusing" in log or re.search(r"synthetic data: rendering: (\d+)/\1 scenes in ", log)
    calibrated = json.loads(tiny_run.artifact("calibrate", "report").read_text())["stage1"]["n"]
    assert re.search(rf"INFO train.progress: calibrate: stage1 on calib: {calibrated}/{calibrated} queries in ", log)
    graphs = len(json.loads(tiny_run.artifact("export", "manifest").read_text())["models"])
    assert f"INFO train.progress: export: ONNX graphs: {graphs}/{graphs} graphs in " in log
    evaluated = sum(json.loads(tiny_run.artifact("evaluate", "report").read_text())["n"].values())
    assert f"INFO train.progress: evaluate: stage1 (fp32) on test: {evaluated}/{evaluated} queries in " in log
    for step in ("calibrate: stage1 on calib", "export: ONNX graphs", "evaluate: stage1 (fp32) on test"):
        assert f"INFO train.progress: {step}: starting (" in log
