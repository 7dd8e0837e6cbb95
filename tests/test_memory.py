"""The training-memory estimate of the dry run (robovlms/training/memory.py): built on the meta device, it agrees
with what a training step of the same tiny model actually holds on the CPU (parameters, gradients, AdamW state and
every tensor autograd keeps for backward), and it sizes the published backbones without their weights."""

import pytest
import torch

from robovlms.backbone import create_backbone
from robovlms.backbone.architecture import meta_backbone
from robovlms.benchmarks.metaworld import MetaWorldBenchmark
from robovlms.formulation import create_formulation
from robovlms.sweep.cost import _unit_statistics, synthetic_batch
from robovlms.training import load_config
from robovlms.training.memory import GIB, estimate_memory, measure_memory, meta_formulation

BACKBONES = ["gpt-scratch", "film-convnet", "kosmos2", "paligemma", "flamingo"]
FORMULATIONS = ["one-step-continuous", "one-step-discrete", "interleaved", "policy-head"]
AGREEMENT = 0.25  # the estimate is within 25% of the measured step


@pytest.fixture(scope="module")
def benchmark():
    return MetaWorldBenchmark(tasks=["button-press-topdown"], image_size=64)


def estimated_and_measured(benchmark, backbone: str, formulation: str, freeze: str = "full", **settings):
    history = 1 if formulation.startswith("one-step") else 3
    config = load_config({"store": "-", "run_dir": "-", "backbone": {"name": backbone, "freeze": freeze},
                          "formulation": {"name": formulation}, "history": history, "chunk": 4, "batch_size": 6,
                          **settings})
    batch = synthetic_batch(benchmark, config.batch_size, history, config.chunk)
    torch.manual_seed(0)
    model = create_formulation(formulation, create_backbone(backbone), _unit_statistics(benchmark.action_dim),
                               _unit_statistics(benchmark.state_dim), history=history, chunk=config.chunk,
                               use_state=True)
    model.backbone.freeze(config.backbone.freeze)
    measured = measure_memory(model, batch, torch.bfloat16 if config.precision == "bf16-mixed" else None)
    on_meta, _ = meta_formulation(config, benchmark.action_dim, benchmark.state_dim)
    return estimate_memory(config, on_meta, batch, batch["instruction"][0]), measured


def assert_agrees(estimate, measured):
    """Counts equal; the total within 25%, and the activations too where they are a quarter of it or more (a
    frozen tiny backbone keeps so little that the formulation's LSTM, whose CPU kernel keeps a workspace, is most
    of it)."""
    assert (estimate.parameters, estimate.trainable) == (measured.parameters, measured.trainable)
    assert estimate.total() == pytest.approx(measured.total(), rel=AGREEMENT)
    if measured.activations >= measured.total() / 4:
        assert estimate.activations == pytest.approx(measured.activations, rel=AGREEMENT)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_estimate_agrees_with_what_a_training_step_holds(benchmark, backbone, formulation):
    assert_agrees(*estimated_and_measured(benchmark, backbone, formulation))


@pytest.mark.parametrize("freeze", ["frozen-vision-and-embeddings", "lora"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_estimate_agrees_when_parts_of_the_backbone_are_frozen(benchmark, backbone, freeze):
    assert_agrees(*estimated_and_measured(benchmark, backbone, "policy-head", freeze=freeze))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_estimate_agrees_under_bf16_mixed_precision(benchmark, backbone):
    """CPU autocast to bfloat16, as Lightning's bf16-mixed runs it: fp32 weights, bf16 activations, fp32 norms."""
    estimate, measured = estimated_and_measured(benchmark, backbone, "policy-head", precision="bf16-mixed")
    # autocast's bf16 weight copies are activations to the measurement and `other` to the estimate
    assert estimate.total() == pytest.approx(measured.total(), rel=AGREEMENT)


def test_a_frozen_vision_tower_keeps_no_activations(benchmark):
    full, _ = estimated_and_measured(benchmark, "paligemma", "policy-head")
    frozen, _ = estimated_and_measured(benchmark, "paligemma", "policy-head",
                                       freeze="frozen-vision-and-embeddings")
    assert frozen.activations < full.activations and frozen.trainable < full.trainable


@pytest.mark.parametrize("name, path, parameters", [
    ("kosmos2", "/nonexistent/kosmos-2", 1_664_485_376),
    ("paligemma", "/nonexistent/paligemma-3b-pt-224", 2_923_466_480),
    ("flamingo", "/nonexistent/idefics-9b", 8_929_679_632),
])
def test_a_pretrained_backbone_not_on_this_machine_is_sized_as_its_published_model(name, path, parameters):
    architecture = meta_backbone(name, "pretrained", path, published=True)
    assert architecture.missing_path == path and architecture.backbone.num_parameters() == parameters
    assert all(p.is_meta for p in architecture.backbone.model.parameters() if p.numel() > 64)


def test_a_missing_pretrained_path_is_refused_unless_published_sizes_may_stand_in():
    from robovlms.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        meta_backbone("kosmos2", "pretrained", "/nonexistent/kosmos-2")


def test_action_tokens_appended_to_a_published_model_grow_its_embeddings_by_the_bins(benchmark):
    config = load_config({"store": "-", "run_dir": "-", "formulation": {"name": "one-step-discrete"},
                          "backbone": {"name": "paligemma", "size": "pretrained", "path": "/nonexistent/paligemma"}})
    formulation, _ = meta_formulation(config, benchmark.action_dim, benchmark.state_dim, published=True)
    assert formulation.backbone.input_embeddings().num_embeddings == 257_153 + 256  # its tokenizer, then 256 bins


def memory_of(strategy: str, devices: int, **settings):
    config = load_config({"store": "-", "run_dir": "-", "backbone": {"name": "gpt-scratch"}, "strategy": strategy,
                          "devices": devices, "accelerator": "gpu", **settings})
    formulation, _ = meta_formulation(config, 4, 4)
    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown"], image_size=64)
    return estimate_memory(config, formulation, synthetic_batch(benchmark, 4, 1, 1, device="meta"), "press")


def test_fsdp_shards_weights_gradients_and_optimizer_state_across_the_devices():
    one, eight = memory_of("auto", 1), memory_of("fsdp", 8)
    assert eight.weights == one.weights / 8 and eight.gradients == one.gradients / 8
    assert eight.optimizer == one.optimizer / 8 and eight.activations == one.activations


def test_deepspeed_stage_2_shards_gradients_and_optimizer_state_but_not_the_weights():
    stage_2, stage_3 = (memory_of(f"deepspeed_stage_{stage}", 8, precision="bf16-mixed") for stage in (2, 3))
    assert stage_2.weights == 8 * stage_3.weights == 2 * stage_2.parameters
    assert stage_2.optimizer == 12 * stage_2.trainable / 8  # fp32 master weights and AdamW's two moments


def test_ddp_keeps_a_second_copy_of_the_gradients_for_its_buckets():
    one, two = memory_of("ddp", 1), memory_of("ddp", 2)
    assert two.other - one.other == one.gradients and two.weights == one.weights


def test_bf16_true_halves_weights_gradients_and_optimizer_state():
    full = memory_of("auto", 1)
    half = memory_of("auto", 1, precision="bf16-true", backbone={"name": "gpt-scratch", "dtype": "bfloat16"})
    assert half.weights == full.weights / 2 and half.optimizer == full.optimizer / 2


def test_gradient_checkpointing_keeps_less_than_the_full_activations():
    estimate = memory_of("auto", 1, batch_size=16)
    assert estimate.checkpointed < estimate.activations
    assert estimate.total(checkpointing=True) < estimate.total() < 1 * GIB



def test_autoregressive_discrete_decoding_of_published_idefics_is_estimated(benchmark):
    """RoboVLMs' recipe decodes its action tokens autoregressively; the published IDEFICS' embedding of the
    teacher-forced tokens (it has additional embeddings) calls torch.where, which has no meta shape."""
    config = load_config({"store": "-", "run_dir": "-",
                          "backbone": {"name": "flamingo", "size": "pretrained", "path": "/absent/idefics-9b"},
                          "formulation": {"name": "one-step-discrete", "options": {"decoding": "autoregressive"}},
                          "chunk": 4, "batch_size": 2})
    on_meta, _ = meta_formulation(config, benchmark.action_dim, benchmark.state_dim, published=True)
    batch = synthetic_batch(benchmark, config.batch_size, 1, config.chunk, device="meta")
    estimate = estimate_memory(config, on_meta, batch, batch["instruction"][0])
    assert estimate.parameters > 8e9 and estimate.activations > 0
