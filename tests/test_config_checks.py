"""Config checks fail before any work, naming the key and what is allowed (or the extra to install); every shipped
config passes them."""
import re
import sys

import pytest
from conftest import compose_config
from hydra.errors import ConfigCompositionException

from train.__main__ import USER_ERRORS, run_task
from train.config_checks import check_config
from train.errors import ConfigError


@pytest.mark.parametrize("overrides", [[], ["pipeline=stage1"], ["+experiment=stage1_lora"],
                                       ["+experiment=stage1_convnext"], ["callbacks=ema", "logger=tensorboard"],
                                       ["task=stage1", "model.finetune.mode=dora",
                                        "model.finetune.target_modules=[qkv,fc2]"]])
def test_shipped_configs_pass(overrides):
    check_config(compose_config(*overrides))


@pytest.mark.parametrize("overrides,message", [
    (["+trainer.max_epoch=3"], r"trainer\.max_epoch: pytorch_lightning\.Trainer takes no parameter 'max_epoch'; "
                               r"did you mean \['max_epochs'"),
    (["+callbacks.model_checkpoint.monitr=val/mcc"], r"callbacks\.model_checkpoint\.monitr: .*ModelCheckpoint .*"
                                                    r"did you mean \['monitor'\]"),
    (["+data.batchsize=8"], r"data\.batchsize: .*RoadworkDataModule.*did you mean \['batch_size'"),
    (["trainer=deepspeed_stage2"], r"trainer\.strategy=train\.utils\.strategies\.DeepSpeed: DeepSpeed needs CUDA GPUs.*"
                                   r"trainer=cpu"),
    (["trainer=deepspeed_stage2", "+trainer.strategy.grad_overflow_chek=true"],
     r"trainer\.strategy\.grad_overflow_chek: .*did you mean \['grad_overflow_check'\]"),
    (["task=stage1", "trainer=deepspeed_stage3_offload"], r"trainer\.strategy=.*strategies\.DeepSpeed: DeepSpeed needs"),
    (["trainer=gpu"], r"trainer\.accelerator=gpu: no CUDA GPU is visible; use trainer=cpu"),
    (["task=stage1", "model.finetune.mode=lora", "model.finetune.target_modules=[qkv,query]"],
     r"model\.finetune\.target_modules: \['query'\] name no linear layer of VisionTransformer; allowed .*"
     r"\['fc1', 'fc2', 'proj', 'qkv'\]"),
    (["draft.alpha=1.5"], r"draft\.alpha=1\.5: must lie in \[0, 1\]"),
    (["cascade.delta=-0.1"], r"cascade\.delta=-0\.1: must lie in \[0, 1\]"),
    (["cascade.tier_alpha.stage1=2"], r"cascade\.tier_alpha\.stage1=2: must lie"),
    (["prm.search.stop.alpha=1.01"], r"prm\.search\.stop\.alpha=1\.01: must lie"),
    (["data.max_bad_fraction=5"], r"data\.max_bad_fraction=5: must lie"),
    (["data.validator_augment=1.5"], r"data\.validator_augment=1\.5: must lie"),
    (["cascade.tiers=[draft,stage1,fusion]"], r"cascade\.tiers has the fusion head 'fusion': .*remove it"),
    (["cascade.tiers=[draft,stage1,prn]"], r"cascade\.tiers has 'prn', which is no tier; the tiers: \['apt', "),
    (["difficulty.module.router.targets=[stage1]"], r"difficulty: module\.router\.targets=\['stage1'\]: the router"),
    (["cascade.reference=apt"], r"cascade\.reference='apt' is not in cascade\.tiers \['draft', 'stage1', 'prm'\]"),
    (["draft.module.teacher_precision=fp16"], r"draft\.module\.teacher_precision='fp16'; allowed: auto, bf16, fp32"),
    (["data.validator_augment=0.5"], r"data\.validator_augment=0\.5 with data\.train_source=shards: .*"
                                     r"use data\.train_source=jpeg"),  # the default job trains from shards
    # the group schemas: an unknown key (with the close match), a value outside the allowed ones, a bound, a rule
    # across keys, one key of each group
    (["+apt.epoch=2"], r"apt\.epoch: no such key; did you mean \['epochs'\]\? allowed: \['source', "),
    (["calibrate.method=beta"], r"calibrate\.method='beta': Input should be 'temperature', 'platt' or 'isotonic'"),
    (["cascade.p_value=bonferroni"], r"cascade\.p_value='bonferroni': Input should be 'hoeffding_bentkus' or 'binomial'"),
    (["+cascade.operating_point={split:test,max_mcc_drop:0}"], r"cascade\.operating_point\.split='test'"),
    (["difficulty.target=medium"], r"difficulty\.target='medium': Input should be 'hard' or 'soft'"),
    (["draft.teacher_outputs=cached"], r"draft\.teacher_outputs='cached': Input should be 'online' or 'cache'"),
    (["evaluate.split=holdout"], r"evaluate\.split='holdout': Input should be 'train', 'meta', 'val', 'calib' or "),
    (["export.onnx.parity_images=0"], r"export\.onnx\.parity_images=0: Input should be greater than or equal to 1"),
    (["features.every_level=[calib]", "features.splits=[meta]"], r"features: every_level \['calib'\] must be among"),
    (["+fusion.epoch=3"], r"fusion\.epoch: no such key; did you mean \['epochs'\]"),
    (["prepare.size=0"], r"prepare\.size=0: Input should be greater than or equal to 1"),
    (["pretrain.method=simclr"], r"pretrain\.method='simclr': Input should be 'fdsl' or 'mae'"),
    (["prm.search.aggregation=mean"], r"prm\.search\.aggregation='mean': Input should be 'min', 'prod' or 'last'"),
    (["quantize.variants.int8.mode=fast"], r"quantize\.variants\.int8\.mode='fast': Input should be 'static' or "),
    (["pipeline.stages=[data,pipeline]"], r"pipeline: stages cannot contain 'pipeline'"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_configs_name_the_key_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_config(*overrides))


def test_a_lora_alpha_is_a_scale_not_a_probability():
    check_config(compose_config("task=stage1", "model.finetune.mode=lora", "model.finetune.alpha=32"))


def test_an_override_of_a_missing_key_is_refused_by_hydra_naming_it():
    with pytest.raises(ConfigCompositionException, match=r"trainer\.max_epoch"):
        compose_config("trainer.max_epoch=3")


def test_checks_run_before_the_run_folder_is_made(tmp_path):
    with pytest.raises(ConfigError, match="fusion.alpha"):
        run_task(compose_config(f"paths.root_dir={tmp_path}", "fusion.alpha=7"))
    assert not (tmp_path / "checkpoints").exists() and ConfigError in USER_ERRORS


def test_target_modules_are_checked_where_the_adapters_are_made():
    from train.models import apply_finetune, create_backbone

    net = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ConfigError, match=r"target_modules: \['mlp'\]"):
        apply_finetune(net, "lora", target_modules=["qkv", "mlp"])


@pytest.mark.parametrize("overrides,module,extra", [
    (["logger=wandb"], "wandb", "wandb"),
    (["task=stage1", "trainer=deepspeed_stage2"], "deepspeed", "deepspeed"),  # before DeepSpeed's CUDA check
], ids=["wandb", "deepspeed"])
def test_a_config_needing_a_missing_extra_names_the_pip_install(monkeypatch, overrides, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError, match=rf"needs the '{extra}' extra \({module} is not installed\): "
                                          rf"pip install 'roadwork-cascade\[{extra}\]'"):
        check_config(compose_config(*overrides))


@pytest.mark.parametrize("args,module,extra", [
    (["-m", "hparams_search=stage1_optuna"], "optuna", "sweep"),
    (["hparams_search=stage1_optuna", "hydra/launcher=slurm"], "hydra_plugins.hydra_submitit_launcher", "slurm"),
    (["trainer=deepspeed_stage3_offload"], "deepspeed", "deepspeed"),
    (["logger=wandb"], "wandb", "wandb"),
], ids=["sweep", "slurm", "deepspeed", "wandb"])
def test_the_command_line_stops_before_hydra_when_an_extra_is_missing(monkeypatch, capsys, args, module, extra):
    """One line naming the pip install, no traceback: Hydra does not even compose (a missing plugin breaks that)."""
    import train.__main__ as entry

    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(sys, "argv", ["train", *args])
    monkeypatch.setattr(entry, "job", lambda: pytest.fail("Hydra ran"))
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert re.fullmatch(rf"error: \S+ needs the '{extra}' extra \({re.escape(module)} is not installed\): pip install "
                        rf"'roadwork-cascade\[{extra}\]' \(in a checkout: pip install -e '\.\[{extra}\]'\)",
                        str(stop.value.code))


def test_installed_extras_pass_the_command_line_check():
    from train.extras import check_args

    assert check_args(["-m", "hparams_search=stage1_optuna", "hydra/launcher=slurm", "trainer=deepspeed_stage2",
                       "logger=wandb", "hparams_search=null", "+experiment=stage1_lora"]) is None


def test_the_sweeper_stops_on_a_missing_optuna(monkeypatch):
    """An Optuna sweep selected inside a config file (not on the command line) stops as the command line would."""
    from hydra_plugins.roadwork_sweeper.optuna_sweeper import OptunaSweeper

    monkeypatch.setitem(sys.modules, "optuna", None)
    sweeper = OptunaSweeper(sampler=None, direction="maximize", storage=None, study_name="s", n_trials=1)
    with pytest.raises(SystemExit, match=r"error: hydra/sweeper=optuna needs the 'sweep' extra \(optuna is not "
                                         r"installed\): pip install 'roadwork-cascade\[sweep\]'"):
        sweeper.setup(hydra_context=None, task_function=None, config=None)
