"""Training through Lightning: run directories, resuming, divergence, bad input, and a short real training."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
import yaml
from synthetic_store import write_synthetic_store

from robovlms.errors import ConfigError, MissingDependencyError, StoreError, UnknownNameError, WindowError
from robovlms.policy import load_policy
from robovlms.training import (CheckpointError, FormulationModule, TrainingDivergedError, load_config,
                               load_formulation, train, training_seconds)
from robovlms.training.checkpoints import read_weights, resume_point


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


def config(store, run_dir, **overrides):
    settings = {"store": str(store.path), "run_dir": str(run_dir), "formulation": {"name": "one-step-continuous"},
                "chunk": 2, "batch_size": 8, "max_steps": 6, "checkpoint_every": 3, "log_every": 1}
    return {**settings, **overrides}


def logged(run_dir):
    frames = [pd.read_csv(path) for path in sorted(run_dir.glob("logs/version_*/metrics.csv"))]
    return pd.concat(frames).dropna(subset=["train/loss"]).set_index("step")


@pytest.mark.parametrize("name, metric", [("one-step-discrete", "train/token_accuracy"),
                                          ("policy-head", "train/gripper_accuracy")])
def test_train_logs_metrics_and_saves_a_checkpoint_its_run_directory_rebuilds(store, tmp_path, name, metric):
    history = 2 if name == "policy-head" else 1
    run_dir = train(config(store, tmp_path / "run", formulation={"name": name}, history=history))
    assert {"train/loss", "train/arm_error", metric} <= set(logged(run_dir).columns)
    assert list(run_dir.glob("tensorboard/version_0/events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    formulation, saved = load_formulation(run_dir)
    assert saved.formulation.name == name and saved.cameras == ["rgb_static"]
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in formulation.state_dict().items():
        torch.testing.assert_close(value, trained[f"formulation.{key}"])


class Interrupted(Exception):
    pass


def batches_seen(monkeypatch):
    """Record what every training step of this process sees: (step, micro-batch, digest of its windows)."""
    seen, original_step = [], FormulationModule.training_step

    def recording_step(self, batch, batch_idx):
        digest = hashlib.sha256(batch["images"].numpy().tobytes() + batch["actions"].numpy().tobytes()).hexdigest()
        seen.append((self.global_step, batch_idx % self.config.accumulate_grad_batches, digest[:12]))
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", recording_step)
    return seen


def stop_at_step(monkeypatch, stop):
    """The next run is interrupted when it reaches step `stop`, as a kill there would, after its checkpoints."""
    step = FormulationModule.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == stop:
            raise Interrupted
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", interrupted)
    return step


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


RESUMED = {  # every formulation and objective; augmentation and a sampling objective draw by step too
    "one-step-continuous": ({"formulation": {"name": "one-step-continuous"}}, 5),
    "one-step-discrete": ({"formulation": {"name": "one-step-discrete", "options": {"bins": 16}}}, 4),
    "interleaved": ({"formulation": {"name": "interleaved"}, "history": 2}, 6),
    "policy-head": ({"formulation": {"name": "policy-head"}, "history": 2, "augment": True}, 5),
    "flow-matching": ({"formulation": {"name": "policy-head", "options": {"objective": "flow-matching"}},
                       "history": 2}, 4),
    "diffusion": ({"formulation": {"name": "one-step-continuous", "options": {"objective": "diffusion"}},
                   "augment": True}, 6),
    "accumulated micro-batches": ({"accumulate_grad_batches": 2, "augment": True}, 4),
}


@pytest.mark.parametrize("case", RESUMED)
def test_a_run_killed_at_any_step_resumes_with_the_uninterrupted_runs_batches_and_ends_with_its_weights(
        store, tmp_path, monkeypatch, case):
    settings, stop = RESUMED[case]
    settings = {"max_steps": 7, "checkpoint_every": 3, "warmup_steps": 2, "validation_fraction": 0.25,
                "validate_every": 2, **settings}
    seen = batches_seen(monkeypatch)
    uninterrupted = final_weights(train(config(store, tmp_path / "straight", **settings)))
    straight = list(seen)
    assert [step for step, micro, _ in straight if micro == 0] == list(range(7))

    step = stop_at_step(monkeypatch, stop)
    with pytest.raises(Interrupted):
        train(config(store, tmp_path / "stopped", **settings))
    resumed_from = torch.load(tmp_path / "stopped/checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert resumed_from == 3 * (stop // 3)  # the checkpoint before the kill
    monkeypatch.setattr(FormulationModule, "training_step", step)
    seen.clear()
    resumed = final_weights(train(config(store, tmp_path / "stopped", **settings)))
    assert seen == [batch for batch in straight if batch[0] >= resumed_from]
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


def test_the_weights_of_the_last_step_are_saved_between_checkpoint_steps(store, tmp_path):
    run_dir = train(config(store, tmp_path / "run", max_steps=5, checkpoint_every=3))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_accumulated_micro_batches_make_one_optimiser_step(store, tmp_path, monkeypatch):
    seen = batches_seen(monkeypatch)
    run_dir = train(config(store, tmp_path / "run", max_steps=3, accumulate_grad_batches=3))
    assert [(step, micro) for step, micro, _ in seen] == [(s, m) for s in range(3) for m in range(3)]
    assert len({digest for *_, digest in seen}) == 9  # a micro-batch of its own each
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_nan_loss_stops_the_run_with_a_clear_message_and_keeps_the_last_good_checkpoint(store, tmp_path,
                                                                                          monkeypatch):
    original_step = FormulationModule.training_step

    def nan_from_step_four(self, batch, batch_idx):
        if self.global_step >= 4:
            batch = {**batch, "actions": torch.full_like(batch["actions"], float("nan"))}
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", nan_from_step_four)
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 4.*last good checkpoint is .*last.ckpt"):
        train(config(store, tmp_path / "run", max_steps=10))
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())


@pytest.mark.parametrize("setting", [{"history": 13, "formulation": {"name": "policy-head"}}, {"chunk": 13}])
def test_a_window_longer_than_the_shortest_episode_is_refused(store, tmp_path, setting):
    with pytest.raises(WindowError, match="shortest episode used for training \\(12 frames"):
        train(config(store, tmp_path / "run", **setting))


def test_a_store_without_action_statistics_is_refused(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["statistics"]["actions"]["p99"] = None
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="no usable action statistics"):
        train({**config(store, tmp_path / "run"), "store": str(copy)})


def test_config_errors_name_the_bad_key_and_the_valid_ones(store, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'histroy'; valid keys: store, run_dir, .*history"):
        load_config(config(store, tmp_path, histroy=2))
    with pytest.raises(ConfigError, match="unknown key 'backbone.nme'; valid keys: name, size"):
        load_config(config(store, tmp_path, backbone={"nme": "kosmos2"}))
    with pytest.raises(ConfigError, match="precision: Input should be '32', 'bf16-mixed', 'bf16-true' or '16-mixed'"):
        load_config(config(store, tmp_path, precision="16"))
    with pytest.raises(UnknownNameError, match="unknown formulation 'one-step'; valid choices: .*interleaved, "
                                               "one-step-continuous, one-step-discrete, policy-head"):
        train(config(store, tmp_path / "run", formulation={"name": "one-step"}))


def test_robovlms_definitions_are_checked_with_the_valid_choices(store, tmp_path):
    with pytest.raises(ConfigError, match="state_input: Input should be 'add' or 'token'"):
        load_config(config(store, tmp_path, state_input="concat"))
    with pytest.raises(ConfigError, match="state_input token .* needs use_state true"):
        load_config(config(store, tmp_path, state_input="token", use_state=False))
    with pytest.raises(ConfigError, match="lora_targets: Input should be 'attention' or 'all-linear'"):
        load_config(config(store, tmp_path, backbone={"freeze": "lora", "lora_targets": "mlp"}))
    with pytest.raises(ConfigError, match="backbone.freeze: Input should be .*'frozen-vision-and-embeddings'"):
        load_config(config(store, tmp_path, backbone={"freeze": "robovlms"}))
    with pytest.raises(ConfigError, match="backbone.lora_dropout: Input should be less than 1 .*got 1.0"):
        load_config(config(store, tmp_path, backbone={"freeze": "lora", "lora_dropout": 1.0}))
    with pytest.raises(ConfigError, match="backbone.lora_alpha: Input should be greater than or equal to 1"):
        load_config(config(store, tmp_path, backbone={"freeze": "lora", "lora_alpha": 0}))


@pytest.mark.parametrize("settings", [
    {"state_input": "token", "formulation": {"name": "policy-head"}, "history": 2},
    {"backbone": {"name": "paligemma", "freeze": "lora", "lora_rank": 2, "lora_targets": "all-linear"}},
    {"backbone": {"freeze": "frozen-vision-and-embeddings"}, "formulation": {"name": "one-step-discrete"}}],
    ids=["state token", "all-linear LoRA", "frozen vision and embeddings"])
def test_robovlms_definitions_train_and_their_run_directory_rebuilds_them(store, tmp_path, settings):
    run_dir = train(config(store, tmp_path / "run", **settings))
    formulation, saved = load_formulation(run_dir)
    assert saved.model_dump(include=set(settings)) == load_config(config(store, tmp_path, **settings)).model_dump(
        include=set(settings))
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in formulation.state_dict().items():
        torch.testing.assert_close(value, trained[f"formulation.{key}"])
    backbone = formulation.backbone
    assert backbone.freeze_mode == saved.backbone.freeze
    if saved.backbone.freeze == "lora":
        assert backbone.lora_targets == "all-linear" and any("mlp" in name for name in trained if "lora_" in name)
    if saved.backbone.freeze == "frozen-vision-and-embeddings":
        assert backbone.partly_frozen_parameters() == [backbone.input_embeddings().weight]


def test_a_run_directory_written_before_the_robovlms_definitions_existed_resumes(store, tmp_path):
    run_dir = train(config(store, tmp_path / "run", max_steps=3))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["state_input"], saved["backbone"]["lora_targets"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    train(config(store, tmp_path / "run", max_steps=6))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_yaml_config_trains(store, tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config(store, tmp_path / "run", max_steps=2)))
    assert (train(path) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("setting", [{"backbone": {"options": {"hidden_dim": 32}}},
                                     {"formulation": {"name": "one-step-continuous", "options": {"hiden": 2}}}])
def test_a_bad_backbone_or_formulation_option_leaves_no_run_directory(store, tmp_path, setting):
    with pytest.raises(ConfigError):
        train(config(store, tmp_path / "run", **setting))
    assert not (tmp_path / "run").exists()


def test_a_run_directory_without_a_checkpoint_trains_afresh_with_new_settings(store, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config(store, run_dir, chunk=3, max_steps=2)))
    (run_dir / "statistics.json").write_text("{}")
    assert (train(config(store, run_dir, max_steps=2)) / "checkpoints" / "last.ckpt").is_file()
    assert load_config(run_dir / "config.yaml").chunk == 2


def test_a_run_directory_with_a_checkpoint_refuses_other_settings(store, tmp_path):
    run_dir = train(config(store, tmp_path / "run", max_steps=2))
    with pytest.raises(ConfigError, match="holds a run trained with other settings \\(chunk\\)"):
        train(config(store, run_dir, chunk=3, max_steps=2))
def steps_trained(monkeypatch):
    """Record the global step of every training step from now on."""
    seen, original_step = [], FormulationModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append(self.global_step)
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", recording_step)
    return seen


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["truncated last.ckpt", "killed before last.ckpt was written"])
def test_resuming_continues_from_the_newest_checkpoint_that_loads(store, tmp_path, monkeypatch, damage):
    settings = {"max_steps": 4, "checkpoint_every": 2}
    checkpoints = train(config(store, tmp_path / "run", **settings)) / "checkpoints"
    (checkpoints / "step4.ckpt").unlink()
    if damage == "truncated last.ckpt":
        truncate(checkpoints / "last.ckpt")
    else:
        (checkpoints / "last.ckpt").unlink()
    seen = steps_trained(monkeypatch)
    truncated = damage == "truncated last.ckpt"
    with pytest.warns(UserWarning, match="last.ckpt is truncated") if truncated else nullcontext():
        train(config(store, tmp_path / "run", **{**settings, "max_steps": 6}))
    assert seen == [2, 3, 4, 5]
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step2.ckpt", "step4.ckpt",
                                                                    "step6.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_finished_run_whose_last_checkpoint_is_truncated_gets_it_back_from_the_step_checkpoint(store, tmp_path):
    settings = {"max_steps": 4, "checkpoint_every": 2}
    run_dir = train(config(store, tmp_path / "run", **settings))
    truncate(run_dir / "checkpoints" / "last.ckpt")
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        train(config(store, run_dir, **settings))
    load_formulation(run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_code_is_refused_in_one_line_that_never_suggests_unsafe_loading(store, tmp_path):
    run_dir = train(config(store, tmp_path / "run", max_steps=2, checkpoint_every=2))
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "global_step": 2, "payload": RunsCode(marker)}, run_dir / "checkpoints/last.ckpt")
    with pytest.raises(CheckpointError, match=r"last.ckpt is not a robovlms checkpoint") as error:
        load_policy(run_dir)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_training_time_adds_every_attempt_including_an_interrupted_one(store, tmp_path, monkeypatch):
    original_step = FormulationModule.training_step

    def stop_at_step_three(self, batch, batch_idx):
        if self.global_step == 3:
            raise Interrupted
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", stop_at_step_three)
    with pytest.raises(Interrupted):
        train(config(store, tmp_path / "run", checkpoint_every=2))
    interrupted = training_seconds(tmp_path / "run")
    monkeypatch.setattr(FormulationModule, "training_step", original_step)
    train(config(store, tmp_path / "run", checkpoint_every=2))
    assert 0 < interrupted < training_seconds(tmp_path / "run")


def test_lightnings_repeated_notices_stay_out_of_the_output(store, tmp_path, capfd):
    """A sweep's log is for its cells: no cloud-logger tip, no skipped-validation or LeafSpec notice per cell."""
    train(config(store, tmp_path / "run"))
    output = "".join(capfd.readouterr())
    assert "Tip:" not in output and "LeafSpec" not in output and "val_dataloader" not in output


@pytest.mark.parametrize("setting, message", [
    ({"strategy": "dp"}, "strategy: Input should be 'auto', 'ddp', 'fsdp', 'deepspeed_stage_2' or 'deepspeed_stage_3'"),
    ({"strategy": "ddp_spawn"}, "strategy ddp_spawn: robovlms starts a cell's processes itself, so use strategy ddp"),
    ({"devices": 0}, "devices: should be a number of processes from 1 to 1024, or auto"),
    ({"devices": "0,1"}, "devices: should be a number of processes from 1 to 1024, or auto"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches: Input should be greater than or equal to 1"),
    ({"num_nodes": 0}, "num_nodes: Input should be greater than or equal to 1"),
    ({"backbone": {"dtype": "int8"}}, "backbone.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
])
def test_scale_settings_are_checked_with_the_valid_ones(store, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(config(store, tmp_path, **setting))


@pytest.mark.parametrize("setting, message", [
    ({"precision": "bf16-true"}, "precision bf16-true holds every weight in bfloat16: set backbone.dtype: bfloat16"),
    ({"backbone": {"dtype": "bfloat16", "freeze": "lora"}}, "backbone.dtype bfloat16 needs a half precision"),
    ({"backbone": {"dtype": "float16", "freeze": "lora"}, "precision": "bf16-mixed"}, "mix two half types"),
    ({"backbone": {"dtype": "bfloat16"}, "precision": "bf16-mixed"},
     "would train bfloat16 weights without an fp32 master copy"),
])
def test_weight_dtypes_that_cannot_train_with_the_precision_are_refused(store, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(config(store, tmp_path, **setting))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_deepspeed_without_its_extra_says_what_to_install(store, tmp_path):
    with pytest.raises(MissingDependencyError, match=re.escape("pip install robovlms[deepspeed]")):
        train(config(store, tmp_path / "run", strategy="deepspeed_stage_2"))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_3"])
def test_a_sharding_strategy_on_a_machine_without_a_gpu_is_refused(store, tmp_path, monkeypatch, strategy):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: object())  # as if DeepSpeed were installed
    with pytest.raises(ConfigError, match=f"strategy {strategy} trains on CUDA GPUs only"):
        train(config(store, tmp_path / "run", strategy=strategy, devices=2))


def test_fsdp_with_half_weights_beside_float32_adapters_is_refused_before_training(store, tmp_path):
    settings = {"strategy": "fsdp", "devices": 2, "precision": "bf16-mixed",
                "backbone": {"dtype": "bfloat16", "freeze": "lora"}}
    with pytest.raises(ConfigError, match="strategy fsdp shards each layer's weights as one flat tensor of one dtype"):
        train(config(store, tmp_path / "run", **settings))
    assert not (tmp_path / "run").exists()


def deepspeed_directory(path, step=None):
    """A checkpoint as DeepSpeed writes it: a directory of shards, with the step.json RunCheckpoints adds."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(f"shard of step {step}".encode())
    if step is not None:
        (path / "step.json").write_text(json.dumps({"global_step": step}))


def test_deepspeed_checkpoint_directories_resume_from_the_newest_complete_one(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    deepspeed_directory(checkpoints / "step2.ckpt", 2)
    deepspeed_directory(checkpoints / "step4.ckpt", 4)
    deepspeed_directory(checkpoints / "step6.ckpt")  # killed before its step.json: incomplete
    with pytest.warns(UserWarning, match="step6.ckpt is an incomplete DeepSpeed checkpoint"):
        path, step = resume_point(checkpoints)
    assert (path, step) == (checkpoints / "last.ckpt", 4)  # copied back to last.ckpt, where Lightning resumes from
    assert (path / "checkpoint" / "mp_rank_00_model_states.pt").read_bytes() == b"shard of step 4"
    assert json.loads((path / "step.json").read_text()) == {"global_step": 4}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_a_deepspeed_checkpoint_read_without_deepspeed_says_what_to_install(tmp_path):
    deepspeed_directory(tmp_path / "last.ckpt", 4)
    with pytest.raises(MissingDependencyError, match=re.escape("needs DeepSpeed: pip install robovlms[deepspeed]")):
        read_weights(tmp_path / "last.ckpt")


def test_a_cell_on_several_machines_is_left_to_the_launcher_of_each(store, tmp_path):
    with pytest.raises(ConfigError, match="num_nodes 2: a cell on several machines is started on each of them"):
        train(config(store, tmp_path / "run", num_nodes=2))


def backbone_weights(state_dict):
    return {key: value for key, value in state_dict.items() if key.startswith("formulation.backbone.model.")}


def test_a_bfloat16_checkpoint_trains_with_float32_master_weights_under_bf16_mixed(store, tmp_path):
    from robovlms.backbone import create_backbone

    saved = create_backbone("kosmos2", hidden_size=32, layers=1)
    saved.model.to(torch.bfloat16).save_pretrained(tmp_path / "kosmos2")
    saved.processor.save_pretrained(tmp_path / "kosmos2")
    run_dir = train(config(store, tmp_path / "run", precision="bf16-mixed", max_steps=3,
                           backbone={"name": "kosmos2", "size": "pretrained", "path": str(tmp_path / "kosmos2")}))
    weights = backbone_weights(final_weights(run_dir))
    assert {value.dtype for value in weights.values()} == {torch.float32}
    # updates smaller than bfloat16's resolution were kept: the master weights are no longer bf16 numbers
    assert any(not torch.equal(value, value.to(torch.bfloat16).float()) for value in weights.values())
    formulation, _ = load_formulation(run_dir)
    assert {p.dtype for p in formulation.parameters()} == {torch.float32}


def test_lora_on_a_bfloat16_backbone_trains_float32_adapters_and_is_rebuilt_in_the_dtypes_it_trained_in(store,
                                                                                                    tmp_path):
    settings = {"backbone": {"name": "paligemma", "dtype": "bfloat16", "freeze": "lora", "lora_rank": 2,
                             "options": {"hidden_size": 32, "layers": 1}}, "precision": "bf16-mixed", "max_steps": 3}
    run_dir = train(config(store, tmp_path / "run", **settings))
    weights = backbone_weights(final_weights(run_dir))
    assert {v.dtype for k, v in weights.items() if "lora_" in k} == {torch.float32}
    assert {v.dtype for k, v in weights.items() if "lora_" not in k and v.is_floating_point()} == {torch.bfloat16}
    formulation, _ = load_formulation(run_dir)
    rebuilt = {f"formulation.{key}": value.dtype for key, value in formulation.state_dict().items()}
    assert rebuilt == {key: value.dtype for key, value in final_weights(run_dir).items()}
    images = torch.zeros(1, 1, 1, 64, 64, 3, dtype=torch.uint8)
    assert torch.isfinite(formulation.act(images, torch.zeros(1, 1, 4), ["press the button"])).all()


def test_bf16_true_trains_every_weight_in_bfloat16_and_is_rebuilt_so(store, tmp_path):
    run_dir = train(config(store, tmp_path / "run", precision="bf16-true", backbone={"dtype": "bfloat16"},
                           max_steps=3))
    assert {v.dtype for v in final_weights(run_dir).values() if v.is_floating_point()} == {torch.bfloat16}
    formulation, _ = load_formulation(run_dir)
    assert {p.dtype for p in formulation.parameters()} == {torch.bfloat16}


def test_gradient_checkpointing_trains_the_weights_training_without_it_does(store, tmp_path):
    settings = {"backbone": {"name": "kosmos2", "options": {"hidden_size": 32, "layers": 2}}, "max_steps": 2}
    plain = final_weights(train(config(store, tmp_path / "plain", **settings)))
    checkpointed = final_weights(train(config(store, tmp_path / "checkpointed", gradient_checkpointing=True,
                                              **settings)))
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_stops_the_run_before_the_update(store, tmp_path, monkeypatch):
    original_step = FormulationModule.training_step

    def infinite_gradient_at_step_two(self, batch, batch_idx):
        loss = original_step(self, batch, batch_idx)
        if self.global_step == 2:
            self.formulation.lrn.register_hook(lambda gradient: torch.full_like(gradient, float("inf")))
        return loss

    monkeypatch.setattr(FormulationModule, "training_step", infinite_gradient_at_step_two)
    with pytest.raises(TrainingDivergedError, match="gradient norm became inf at step 2"):
        train(config(store, tmp_path / "run", max_steps=4, checkpoint_every=2))
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
