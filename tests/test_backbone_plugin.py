"""The example plugin package (examples/robovlms-llava-plugin) adds a backbone through the entry point alone."""

import importlib.util
from importlib.metadata import entry_points

import pytest
import torch

from robovlms.backbone import BACKBONES, create_backbone, list_backbones, load_backbone

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("robovlms_llava") is None,
    reason="example plugin not installed: pip install --no-deps -e examples/robovlms-llava-plugin")

INSTRUCTIONS = ["press the button from the top", "open the door"]


def test_plugin_is_declared_in_the_entry_point_group():
    declared = {ep.name: ep.value for ep in entry_points(group="robovlms.backbones")}
    assert declared["llava"] == "robovlms_llava:LlavaBackbone"


def test_plugin_is_found_by_name_and_listed():
    assert "llava" in BACKBONES.names()
    backbone = create_backbone("llava")
    assert type(backbone).__module__ == "robovlms_llava"
    assert backbone.label == "llava (tiny, random init)"
    assert "llava" in {row["name"] for row in list_backbones()}


@pytest.mark.parametrize("interleaved", [False, True])
def test_plugin_forward_and_backward_reach_the_lrn_embedding(interleaved):
    backbone = create_backbone("llava")
    images = torch.randint(0, 256, (2, 3, 2, 64, 64, 3), dtype=torch.uint8)
    lrn = torch.nn.Parameter(torch.randn(backbone.hidden_size) * 0.02)
    hidden = backbone(backbone.preprocess_images(images), INSTRUCTIONS, lrn.view(1, 1, 1, -1).expand(2, 3, 1, -1),
                      interleaved=interleaved)
    assert hidden.shape == (2, 3, 1, backbone.hidden_size)
    hidden.pow(2).sum().backward()
    assert lrn.grad.abs().sum() > 0


def test_plugin_hidden_state_at_lrn_equals_llavas_own_forward():
    torch.manual_seed(0)
    backbone = create_backbone("llava").eval()
    pixel_values = backbone.preprocess_images(torch.randint(0, 256, (1, 1, 1, 64, 64, 3), dtype=torch.uint8))
    lrn = torch.randn(backbone.hidden_size) * 0.02
    tokenizer, config = backbone.tokenizer, backbone.model.config
    image_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ids = torch.tensor([[tokenizer.bos_token_id] + [config.image_token_id] * image_tokens
                        + tokenizer(INSTRUCTIONS[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        embeds = torch.cat([backbone.model.get_input_embeddings()(ids), lrn.view(1, 1, -1)], dim=1)
        expected = backbone.model(pixel_values=pixel_values[0, 0], inputs_embeds=embeds, output_hidden_states=True)
        hidden = backbone(pixel_values, INSTRUCTIONS[:1], lrn.view(1, 1, 1, -1))[0, 0, 0]
    torch.testing.assert_close(hidden, expected.hidden_states[-1][0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone.lm_logits(hidden), expected.logits[0, -1], atol=1e-5, rtol=1e-5)


def test_plugin_saves_and_loads_through_the_registry(tmp_path):
    backbone = create_backbone("llava").eval()
    backbone.freeze("frozen-language")
    backbone.save(tmp_path / "llava")
    loaded = load_backbone(tmp_path / "llava").eval()
    images = backbone.preprocess_images(torch.randint(0, 256, (2, 1, 1, 64, 64, 3), dtype=torch.uint8))
    suffix = torch.randn(2, 1, 1, backbone.hidden_size)
    with torch.no_grad():
        assert torch.equal(backbone(images, INSTRUCTIONS, suffix), loaded(images, INSTRUCTIONS, suffix))
