"""Multi-GPU: every trainer option builds its strategy, the ranks share one run, DeepSpeed checkpoints convert and
export."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import CONF_DIR, QUIET, compose_config
from hydra.utils import instantiate
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy
from pytorch_lightning.utilities import rank_zero_only
from safetensors.torch import load_file

from train.errors import RunError
from train.models.saving import load_classifier
from train.runs import RUN_ENV, Run
from train.tasks.registry import RANKS, TASKS, get_task
from train.tiers.training import consolidated_checkpoint, resolve_ckpt_path

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))
TINY = ["model.img_size=32", "model.backbone.patch_size=8", "model.backbone.depth=2", "model.backbone.embed_dim=64",
        "model.backbone.num_heads=2", "model.bootstrap=0", "model.backbone.pretrained=false"]


def cli(tmp_path: Path, data_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m train`` as users type it, in ``tmp_path`` with its own checkpoints folder."""
    env = {k: v for k, v in os.environ.items() if k != RUN_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               OMP_NUM_THREADS="1")  # keeps the caller's path (the GPU machine's packages live in .site)
    cmd = [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "debug=tiny",
           *QUIET, *TINY, *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("option", TRAINERS)
def test_every_trainer_option_builds_its_strategy(option):
    """The Trainer accepts each strategy as configured (built on the CPU: DeepSpeed refuses it only when it runs)."""
    cfg = compose_config(f"trainer={option}", "trainer.accelerator=cpu", "trainer.precision=32-true")
    strategy = instantiate(cfg.trainer, logger=False, enable_progress_bar=False).strategy
    if option == "ddp":
        assert isinstance(strategy, DDPStrategy)
    elif option.startswith("deepspeed"):
        zero = strategy.config["zero_optimization"]
        assert isinstance(strategy, DeepSpeedStrategy) and zero["stage"] == (3 if "stage3" in option else 2)
        assert ("offload_optimizer" in zero) == ("offload" in option)
        assert ("offload_param" in zero) == (option == "deepspeed_stage3_offload")
        if "offload" in option:  # our torch optimizer may take the offloaded step
            assert strategy.config["zero_force_ds_cpu_optimizer"] is False



@pytest.mark.parametrize("precision, overrides, expected", [
    ("bf16-mixed", [], {"enabled": True, "check_grad_overflow": False}),
    ("bf16-mixed", ["trainer.strategy.grad_overflow_check=true"], {"enabled": True, "check_grad_overflow": True}),
    ("bf16-mixed", ["+trainer.strategy.config={bf16:{enabled:true},zero_optimization:{stage:2}}"],
     {"enabled": True}),  # a config of the user's own (it replaces Lightning's stage defaults): its bf16 block as given
    ("32-true", [], None),
])
def test_deepspeed_bf16_overflow_check_is_a_choice(monkeypatch, precision, overrides, expected):
    """DeepSpeed's per-gradient inf/NaN check under bf16 is off unless asked for; a user's bf16 block is kept."""
    cfg = compose_config("trainer=deepspeed_stage2", "trainer.accelerator=cpu", f"trainer.precision={precision}",
                         *overrides)
    strategy = instantiate(cfg.trainer, logger=False, enable_progress_bar=False).strategy
    monkeypatch.setattr(type(strategy), "_format_batch_size_and_grad_accum_config", lambda self: None)  # needs a fit
    strategy._format_config()
    assert strategy.config.get("bf16") == expected
    assert strategy.config["zero_optimization"]["stage"] == 2


def test_ranks_share_rank_zeros_run(tmp_path, monkeypatch):
    """Rank 0 makes the run and exports its path; a rank Lightning's launcher starts opens it; torchrun / srun
    need run_dir."""
    monkeypatch.setenv(RUN_ENV, "")  # unset, and so again after the test
    run = Run.for_process(None, tmp_path, "stage1")
    assert os.environ[RUN_ENV] == str(run.path)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert Run.for_process(None, tmp_path, "stage1").path == run.path
    assert len(list(tmp_path.iterdir())) == 1
    monkeypatch.setenv(RUN_ENV, "")  # started by torchrun / srun: no inherited run
    with pytest.raises(RunError, match="run_dir"):
        Run.for_process(None, tmp_path, "stage1")
    assert Run.for_process(run.path, tmp_path, "stage1").path == run.path
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 0 of torchrun
    with pytest.raises(RunError, match="run_dir"):
        Run.for_process(None, tmp_path, "stage1")


def test_other_ranks_train_and_leave_the_rest_to_rank_zero(tmp_path, monkeypatch):
    """A rank other than 0 runs only the stages that train on every rank, after rank 0 wrote what they read."""
    ran, waited = [], []
    for name, ranks in (("a", "zero"), ("b", "all"), ("c", "zero"), ("d", "one")):
        monkeypatch.setitem(TASKS, name, lambda cfg, run, name=name: ran.append(name) or {})
        monkeypatch.setitem(RANKS, name, ranks)
    monkeypatch.setattr("train.tasks.pipeline.wait_for_rank_zero", lambda done: waited.append(done.args[0]))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    get_task("pipeline")(compose_config("pipeline.stages=[a,b,c]"), Run.create(tmp_path, "p"))
    assert ran == ["b"] and waited == ["a"]
    with pytest.raises(RunError, match="'d' trains on one process only"):  # every rank stops once b is done
        get_task("pipeline")(compose_config("pipeline.stages=[b,c,d]"), Run.create(tmp_path, "q"))
    assert ran == ["b", "b"]


def commands(run: Run) -> list[tuple[str, list[str]]]:
    """(task, command-line overrides) of each ``python -m train`` on ``run``, from its ``overrides.yaml``."""
    import yaml

    return [(e["task"], e["overrides"]) for e in yaml.safe_load((run.path / "overrides.yaml").read_text())]


def one_run(tmp_path: Path) -> Run:
    """The only run folder under ``tmp_path``, with the only ``train.log``; its stage1 model is the best
    checkpoint's."""
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    assert [p.relative_to(run_dir) for p in tmp_path.rglob("train.log")] == [Path("train.log")]
    run = Run.open(run_dir)
    assert run.metrics("stage1")["test/L0/acc"] > 0
    state = torch.load(run.artifact("stage1", "best"), map_location="cpu", weights_only=True)["state_dict"]
    model, _ = load_classifier(run.artifact("stage1", "model"))
    assert all(torch.equal(state[f"net.{k}"], v) for k, v in model.state_dict().items())
    return run


def test_ddp_on_two_cpu_processes_leaves_one_run_and_one_log(tmp_path, data_dir):
    """Lightning's DDP launcher re-runs the command line for rank 1: both ranks train in rank 0's run folder, then
    rank 0 alone calibrates, exports and evaluates."""
    out = cli(tmp_path, data_dir, "pipeline=stage1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.precision=32-true")
    assert out.returncode == 0, out.stderr[-3000:]
    run = one_run(tmp_path)
    assert run.is_complete("evaluate") and (run.path / "train.log").read_text().count("stage 'stage1' done") == 1
    n_train = pq.read_table(run.artifact("data", "index")).column("split").to_pylist().count("train")
    best = torch.load(run.artifact("stage1", "best"), map_location="cpu", weights_only=True)
    assert best["global_step"] == min(6, math.ceil(math.ceil(n_train / 2) / 16))  # each rank: half the data, 16 a batch
    assert commands(run) == [("pipeline", out.args[3:])]  # the command line's overrides, from rank 0 alone


ZERO_CHECKPOINT = """
import os, sys
import pytorch_lightning as pl, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed, deepspeed.comm.torch
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # a CPU all-reduce op (a minute to compile) unused here
from hydra.utils import instantiate
from safetensors.torch import save_file
from conftest import compose_config
from train.optim import build_optimizer

module = instantiate(compose_config(*sys.argv[3:]).model)
engine, *_ = deepspeed.initialize(model=module, optimizer=build_optimizer(module.optimizer_factory, module.net),
                                  config={"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
                                          "zero_optimization": {"stage": 2}}, dist_init_required=False)
for _ in range(2):
    engine.backward(engine(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean())
    engine.step()
# what Lightning's DeepSpeedStrategy.save_checkpoint hands DeepSpeed: its checkpoint less the weights and optimizer
client = {"epoch": 0, "global_step": 2, "pytorch-lightning_version": pl.__version__,
          "hyper_parameters": dict(module.hparams), "loops": {}, "callbacks": {}, "lr_schedulers": []}
engine.save_checkpoint(sys.argv[1], client_state=client, tag="checkpoint")
save_file({k: v.contiguous() for k, v in module.net.state_dict().items()}, sys.argv[1] + ".expected.safetensors")
"""


@pytest.fixture(scope="module")
def zero_checkpoint(tmp_path_factory) -> Path:
    """A ZeRO-2 checkpoint folder of a tiny Stage-1 module, laid out by DeepSpeed itself (on the CPU, one process)."""
    path = tmp_path_factory.mktemp("zero") / "best-00.ckpt"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    subprocess.run([sys.executable, "-c", ZERO_CHECKPOINT, str(path), "29517", *TINY], env=env, check=True,
                   capture_output=True, timeout=300)
    return path


def test_zero_checkpoint_folder_resumes_and_converts_to_fp32(zero_checkpoint):
    assert resolve_ckpt_path(str(zero_checkpoint), Path("unused")) == str(zero_checkpoint)
    fp32 = consolidated_checkpoint(zero_checkpoint)
    assert fp32 == zero_checkpoint / "fp32.ckpt" and consolidated_checkpoint(zero_checkpoint) == fp32  # made once
    ckpt = torch.load(fp32, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and "backbone" in ckpt["hyper_parameters"]
    expected = load_file(str(zero_checkpoint) + ".expected.safetensors")
    assert all(ckpt["state_dict"][f"net.{k}"].dtype == torch.float32 for k in expected)
    assert all(torch.equal(ckpt["state_dict"][f"net.{k}"], v) for k, v in expected.items())


def test_export_accepts_a_zero_checkpoint_folder(zero_checkpoint, tiny_config, tmp_path):
    from train.__main__ import run_task

    run_task(tiny_config("task=export", f"ckpt={zero_checkpoint}", *TINY))
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["models"]["stage1"]["onnx"]["parity_max_abs_diff"] < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("option", [t for t in TRAINERS if t == "ddp" or t.startswith("deepspeed")])
def test_two_gpus_train_in_one_run(option, tmp_path, data_dir):
    out = cli(tmp_path, data_dir, "pipeline.stages=[data,stage1]", f"trainer={option}", "trainer.devices=2")
    assert out.returncode == 0, out.stderr[-3000:]
    one_run(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed trains on CUDA GPUs only")
def test_deepspeed_stage2_trains_resumes_converts_and_exports(tmp_path, data_dir):
    ds = ["trainer=deepspeed_stage2", "trainer.devices=1"]
    out = cli(tmp_path, data_dir, "pipeline.stages=[data,stage1]", *ds)
    assert out.returncode == 0, out.stderr[-3000:]
    run, commands_run = one_run(tmp_path), [("pipeline", out.args[3:])]
    best = run.artifact("stage1", "best")
    assert best.name == "fp32.ckpt" and (best.parent / "latest").is_file()  # converted inside the DeepSpeed folder
    steps = torch.load(best, weights_only=True)["global_step"]
    out = cli(tmp_path, data_dir, "task=stage1", f"run_dir={run.path}", "ckpt_path=last", "trainer.max_epochs=2", *ds)
    assert out.returncode == 0, out.stderr[-3000:]
    commands_run.append(("stage1", out.args[3:]))
    last = consolidated_checkpoint(run.path / "stage1" / "checkpoints" / "last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2 * steps  # one more epoch, from where it stopped
    best = run.artifact("stage1", "best")  # a better epoch replaced the first one's folder, maybe
    out = cli(tmp_path, data_dir, "task=export", f"run_dir={run.path}", f"ckpt={best.parent}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run.path / "export" / "stage1.onnx").is_file() and (run.path / "export" / "stage1_hf").is_dir()
    assert commands(run) == [*commands_run, ("export", out.args[3:])]  # each command on the run, in order
