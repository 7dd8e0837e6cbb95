"""Every tensor a formulation, action objective, augmentation or backbone wrapper makes follows its input's device
and dtype: run on `meta` (which refuses to mix with a tensor made on the CPU) and in bfloat16 on the CPU (which
refuses to multiply a bf16 tensor by an fp32 one), as on a GPU under bf16."""

import pytest
import torch

from robovlms.augmentation import augment_images
from robovlms.backbone import create_backbone
from robovlms.data.store import Statistics
from robovlms.formulation import create_formulation

BACKBONES = ["gpt-scratch", "film-convnet", "kosmos2", "paligemma", "flamingo"]
FORMULATIONS = {  # every formulation, every action objective, both discrete decodings and heads, the state token
    "one-step-continuous": ("one-step-continuous", 1, {}),
    "one-step-discrete": ("one-step-discrete", 1, {"bins": 8}),
    "interleaved": ("interleaved", 2, {}),
    "policy-head": ("policy-head", 2, {}),
    "flow-matching": ("policy-head", 2, {"objective": "flow-matching", "head": "gpt"}),
    "diffusion": ("one-step-continuous", 1, {"objective": "diffusion"}),
    "autoregressive": ("one-step-discrete", 1, {"bins": 8, "decoding": "autoregressive"}),
    "mlp action head": ("one-step-discrete", 1, {"bins": 8, "action_head": "mlp"}),
    "state token": ("interleaved", 2, {"state_input": "token"}),
}
STATISTICS = Statistics(p01=[-1.0] * 4, p99=[1.0] * 4, mean=[0.0] * 4, std=[1.0] * 4, min=[-1.0] * 4, max=[1.0] * 4)


def formulation_on(device, backbone_dtype, formulation_dtype, backbone, case):
    """A tiny formulation built on the CPU, its backbone's weights in `backbone_dtype` (backbone.dtype), its own
    in `formulation_dtype`, moved to `device`. Eager attention: transformers' SDPA mask reads the mask's values."""
    name, history, options = FORMULATIONS[case]
    torch.manual_seed(0)
    model = create_backbone(backbone, hidden_size=32, layers=1)
    if hasattr(model.model, "set_attn_implementation"):
        model.model.set_attn_implementation("eager")
    model.model.to(backbone_dtype)
    formulation = create_formulation(name, model, STATISTICS, STATISTICS, history=history, chunk=2, use_state=True,
                                     **options)
    if formulation_dtype != torch.float32:
        formulation.to(formulation_dtype)
    return formulation.to(device), history


def batch_on(device, dtype, history, size=2):
    return {"images": torch.zeros(size, history, 1, 64, 64, 3, dtype=torch.uint8, device=device),
            "state": torch.zeros(size, history, 4, device=device, dtype=dtype),
            "actions": torch.zeros(size, history, 2, 4, device=device, dtype=dtype),
            "action_mask": torch.ones(size, history, 2, dtype=torch.bool, device=device),
            "instruction": ["press the button"] * size}


def loss_and_actions(formulation, batch):
    generator = torch.Generator().manual_seed(0)  # on the CPU, as training and rollouts make it
    batch = {**batch, "images": augment_images(batch["images"], generator)}
    loss, metrics = formulation.train().loss(batch, generator)
    actions = formulation.eval().act(batch["images"], batch["state"], batch["instruction"], generator)
    return loss, metrics, actions


@pytest.mark.parametrize("case", FORMULATIONS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_loss_and_actions_are_computed_on_the_inputs_device(backbone, case):
    formulation, history = formulation_on(torch.device("meta"), torch.float32, torch.float32, backbone, case)
    loss, metrics, actions = loss_and_actions(formulation, batch_on("meta", torch.float32, history))
    assert loss.device.type == "meta" and all(value.device.type == "meta" for value in metrics.values())
    assert actions.device.type == "meta" and actions.shape == (2, 2, 4)


@pytest.mark.parametrize("case", FORMULATIONS)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("held", ["backbone in bfloat16", "everything in bfloat16"])
def test_loss_and_actions_are_computed_with_weights_in_bfloat16(backbone, case, held):
    """backbone.dtype bfloat16 with float32 heads and LoRA (rebuilt for evaluation without autocast), and
    precision bf16-true (every weight bf16)."""
    everything = held == "everything in bfloat16"
    formulation, history = formulation_on(torch.device("cpu"), torch.bfloat16,
                                          torch.bfloat16 if everything else torch.float32, backbone, case)
    loss, _, actions = loss_and_actions(formulation, batch_on("cpu", torch.bfloat16 if everything else torch.float32,
                                                              history))
    assert torch.isfinite(loss) and torch.isfinite(actions).all() and actions.shape == (2, 2, 4)


def test_colour_jitter_and_shifts_of_a_batch_on_meta_stay_on_meta():
    images = torch.zeros(2, 3, 2, 16, 16, 3, dtype=torch.uint8, device="meta")
    augmented = augment_images(images, torch.Generator().manual_seed(0))
    assert augmented.device.type == "meta" and augmented.shape == images.shape and augmented.dtype == torch.uint8


def test_a_flamingo_without_a_perceiver_resampler_names_its_vision_tower_alone():
    from robovlms.backbones.flamingo import FlamingoBackbone
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    tiny = create_backbone("flamingo", hidden_size=32, layers=1)
    config = IdeficsConfig(**{**tiny.model.config.to_dict(), "use_resampler": False})
    config.perceiver_config.use_resampler = False
    backbone = FlamingoBackbone(IdeficsForVisionText2Text(config), tiny.processor, "tiny", None)
    assert backbone.vision_modules() == [backbone.model.model.vision_model]
    backbone.freeze("frozen-vision")
    assert not any(p.requires_grad for p in backbone.model.model.vision_model.parameters())
