"""Config checks fail before any work, naming the key and what is allowed; every shipped config passes them."""
import pytest
from hydra.errors import ConfigCompositionException

from conftest import compose_config
from train.__main__ import USER_ERRORS, run_task
from train.config_checks import ConfigError, check_config


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
