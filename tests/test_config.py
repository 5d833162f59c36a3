"""The real config composes the way users write it, and every option of every group is usable."""
from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_config
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from train.data.splits import assign_splits
from train.tasks.registry import get_task


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_default_is_the_pipeline_on_synthetic_data():
    cfg = compose_config()
    assert cfg.task.name == "pipeline" and list(cfg.pipeline.stages) == list(compose_config(
        "+experiment=cascade_full").pipeline.stages)  # the default job is the whole cascade
    assert list(compose_config("pipeline=stage1").pipeline.stages) == ["data", "stage1", "calibrate", "export",
                                                                       "evaluate"]
    assert compose_config("+experiment=stage1_vit_b16").calibrate.tiers == ["stage1"]
    assert cfg.data.source._target_.endswith("SyntheticSource") and "experiment" not in cfg
    assert cfg.data.img_size == cfg.model.img_size == cfg.model.backbone.img_size


def test_tier_settings_live_in_the_tier_files_and_the_sizes_overlay():
    """A pipeline names stages and what they calibrate / export; the default job's CPU sizes are the visible
    ``sizes`` overlay (pipeline=stage1 and ~sizes: each tier as its own file says)."""
    import yaml

    for option in options("pipeline"):
        keys = set(yaml.safe_load((CONF_DIR / "pipeline" / f"{option}.yaml").read_text())) - {"defaults"}
        assert keys <= {"pipeline", "data", "calibrate", "export", "evaluate", "quantize"}, option  # data: shards
    tiers = yaml.safe_load((CONF_DIR / "draft" / "default.yaml").read_text())
    assert compose_config("~sizes").draft.epochs == tiers["epochs"] != compose_config().draft.epochs
    assert compose_config("pipeline=stage1").draft.epochs == tiers["epochs"]
    assert compose_config().draft.epochs == yaml.safe_load((CONF_DIR / "sizes" / "cpu.yaml").read_text())["draft"]["epochs"]


@pytest.mark.parametrize("task", options("task"))
def test_every_task_option_is_registered(task):
    assert callable(get_task(compose_config(f"task={task}").task.name))


def test_unknown_task_lists_the_allowed_ones():
    with pytest.raises(ConfigCompositionException, match="task/nope"):
        compose_config("task=nope")


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "debug", "model"])
def test_every_option_composes_and_instantiates(group, tmp_path):
    for option in options(group):
        cfg = compose_config(f"{group}={option}")
        if group == "trainer" and option in ("cpu", "default"):
            instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        if group == "logger":
            for lg in (cfg.logger or {}).values():
                instantiate(lg, save_dir=str(tmp_path))
        if group == "callbacks":
            for cb in (cfg.callbacks or {}).values():
                extra = {"dirpath": str(tmp_path)} if cb._target_.endswith("Checkpoint") else {}
                assert callable(getattr(instantiate(cb, **extra), "setup", None))


@pytest.mark.parametrize("data", ["natix", "imagefolder", "csv"])
def test_real_data_options_need_a_root(data, tmp_path):
    cfg = compose_config(f"data={data}", f"data.root={tmp_path}")
    dm = instantiate(cfg.data)
    assert Path(dm.source.root) == tmp_path
    with pytest.raises(Exception, match="root"):
        instantiate(compose_config(f"data={data}").data)


def test_experiment_overlays_compose_and_pass_the_checks():
    """Every experiment, pipeline and debug option composes and passes the checks a new run makes: the group schemas
    know every key the shipped config files set, and every stage's inputs come from an earlier stage."""
    from train.config_checks import check_config, job_stages
    from train.tasks.registry import check_needs

    assert options("experiment")
    configs = []
    for name in options("experiment"):
        configs.append(compose_config(f"+experiment={name}"))
        assert configs[-1].experiment_name == name
    configs += [compose_config(f"{group}={name}") for group in ("pipeline", "debug") for name in options(group)]
    for cfg in configs:
        check_config(cfg)
        check_needs(cfg, job_stages(cfg), None)


def test_default_data_has_2000_calib_and_test_samples():
    """The split sizes follow from the scene ids alone, so no image needs rendering here."""
    src = compose_config().data
    scenes = [f"scene{s:07d}" for s in range(src.source.n_scenes) for _ in range(src.source.views_per_scene)]
    split = assign_splits(scenes, src.splits, src.split_seed)
    assert (split == "calib").sum() >= 2000 and (split == "test").sum() >= 2000
