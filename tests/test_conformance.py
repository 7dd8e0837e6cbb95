"""The backbone conformance kit (robovlms.testing, `robovlms check-backbone`): every built-in backbone, the LLaVA
example and a Qwen2-VL plugin written from docs/adding-a-backbone.md pass it, and it catches what it checks."""

import importlib.util

import pytest
import torch
from plugin_distribution import NARROW_BACKBONE, install_plugin
from qwen2vl_backbone import Qwen2VLBackbone
from rich.console import Console
from typer.testing import CliRunner

from robovlms import cli
from robovlms.backbone import TransformersBackbone, create_backbone
from robovlms.errors import ConfigError, PluginError
from robovlms.testing import (assert_backbone_conforms, check_action_tokens, check_backbone,
                              check_batch_independence, check_forward_and_gradients, check_freeze_modes,
                              check_image_settings, check_reference_forward)

WRAPS_A_TRANSFORMERS_MODEL = ["kosmos2", "paligemma", "flamingo", "llava", "qwen2vl"]

LEAKY_BACKBONES = '''
import torch

from robovlms.backbones.gpt_scratch import GPTScratchBackbone


class SeesTheFuture(GPTScratchBackbone):
    name = "sees-the-future"
    description = "adds every position's mean to each position"

    def contextualise(self, context, images, suffix_embeds):
        hidden = super().contextualise(context, images, suffix_embeds)
        return hidden + hidden.mean(dim=1, keepdim=True)


class ForgetsItsImageStd(GPTScratchBackbone):
    name = "forgets-its-image-std"
    description = "from_saved rebuilds it with another image_std"

    @classmethod
    def from_saved(cls, directory, size, origin):
        backbone = super().from_saved(directory, size, origin)
        backbone.image_std.fill_(0.25)
        return backbone


class SeesTheBatch(GPTScratchBackbone):
    name = "sees-the-batch"
    description = "adds the batch's mean to each row"

    def contextualise(self, context, images, suffix_embeds):
        hidden = super().contextualise(context, images, suffix_embeds)
        return hidden + hidden.mean(dim=0, keepdim=True)
'''


@pytest.fixture
def qwen2vl(tmp_path, monkeypatch):
    """tests/qwen2vl_backbone.py installed as the package robovlms-qwen2vl 0.1.0 would be."""
    install_plugin(tmp_path, monkeypatch, "qwen2vl_backbone", None,
                   {"robovlms.backbones": {"qwen2vl": "qwen2vl_backbone:Qwen2VLBackbone"}},
                   distribution="robovlms-qwen2vl", version="0.1.0")


@pytest.fixture
def leaky(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "leaky_backbones", LEAKY_BACKBONES,
                   {"robovlms.backbones": {"sees-the-future": "leaky_backbones:SeesTheFuture",
                                           "sees-the-batch": "leaky_backbones:SeesTheBatch",
                                           "forgets-its-image-std": "leaky_backbones:ForgetsItsImageStd"}})


@pytest.mark.parametrize("name", ["kosmos2", "paligemma", "flamingo", "gpt-scratch", "film-convnet", "llava", "qwen2vl"])
def test_backbone_passes_the_conformance_kit(name, qwen2vl):
    if name == "llava" and importlib.util.find_spec("robovlms_llava") is None:
        pytest.skip("example plugin not installed: pip install --no-deps -e examples/robovlms-llava-plugin")
    results = {result.check: result for result in assert_backbone_conforms(name)}
    compared = results["wrapped model's forward"].status
    assert compared == ("pass" if name in WRAPS_A_TRANSFORMERS_MODEL else "skip")


def test_the_kit_takes_tiny_options():
    results = assert_backbone_conforms("paligemma", hidden_size=32, heads=2, image_size=32)
    assert results[0].reason.startswith("32 px")


class OneDimensionalPositions(Qwen2VLBackbone):
    """Qwen2-VL through the plain LLaVA-style contextualise: 1-D positions instead of M-RoPE."""

    def contextualise(self, context, images, suffix_embeds):
        patches, grid = self.patches(images)
        embeds = self.merge_embeddings(context, torch.cat(self.model.model.get_image_features(patches, grid)
                                                          .pooler_output), suffix_embeds)
        return self.model.model.language_model(inputs_embeds=embeds, attention_mask=context.attention_mask,
                                                use_cache=False).last_hidden_state


class UndelimitedImages(Qwen2VLBackbone):
    """Qwen2-VL with an empty image-block framing: the image tokens of several views run together."""

    def image_block(self):
        return [], super().image_block()[1], []


class ImageSizeFromTheProcessor(Qwen2VLBackbone):
    """Qwen2-VL taking its image size from the image processor's size, a pixel count."""

    def __init__(self, model, parts, size, origin):
        TransformersBackbone.__init__(self, model, parts, size, origin)


def test_qwen2vl_with_one_dimensional_positions_fails_the_comparison_with_its_own_forward():
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="wrapped model's own forward differ .*M-RoPE"):
        check_reference_forward(OneDimensionalPositions.tiny())


def test_qwen2vl_without_image_block_delimiters_fails_with_several_views():
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # get_rope_index reads two images as one
        check_forward_and_gradients(UndelimitedImages.tiny())


def test_qwen2vl_taking_its_image_size_from_the_processor_is_refused_when_built():
    with pytest.raises(ConfigError, match="image_size 4096 is not the side of a square image"):
        ImageSizeFromTheProcessor.tiny()


def test_qwen2vl_through_autoprocessor_says_to_use_the_pil_image_processor(tmp_path):
    Qwen2VLBackbone.tiny().save_files(tmp_path)
    with pytest.raises(PluginError, match="AutoProcessor cannot build the processor .*Torchvision library.*ImageProcessorPil"):
        TransformersBackbone.from_saved.__func__(Qwen2VLBackbone, tmp_path, "tiny", None)


def test_the_kit_catches_a_backbone_that_sees_later_positions(leaky):
    failed = {result.check for result in check_backbone("sees-the-future") if not result.passed}
    assert {"suffix causality", "frame causality"} <= failed


def test_the_kit_catches_a_backbone_whose_sample_depends_on_its_batch(leaky):
    torch.manual_seed(0)
    from leaky_backbones import SeesTheBatch

    with pytest.raises(AssertionError, match="a sample alone and in a batch differ"):
        check_batch_independence(SeesTheBatch.tiny())


def test_the_kit_catches_a_backbone_that_load_backbone_does_not_rebuild(leaky):
    failed = {result.check: result.reason for result in check_backbone("forgets-its-image-std") if not result.passed}
    assert set(failed) == {"save and load", "LoRA save and load", "LoRA on all linear layers"}
    assert "the loaded backbone's outputs differ" in failed["save and load"]


def test_the_kit_catches_image_settings_out_of_range():
    torch.manual_seed(0)
    backbone = create_backbone("gpt-scratch", image_std=(0.5, 0.5, 2.0))
    with pytest.raises(AssertionError, match=r"image_std \[0.5, 0.5, 2.0\] must be three values in \(0, 1\]"):
        check_image_settings(backbone)


def test_the_kit_catches_vision_and_language_modules_that_overlap(monkeypatch):
    backbone = create_backbone("gpt-scratch")
    monkeypatch.setattr(backbone, "vision_modules", lambda: [backbone.model])
    with pytest.raises(AssertionError, match="vision and language modules share parameters"):
        check_freeze_modes(backbone)


def test_the_kit_catches_lora_target_modules_that_match_nothing(monkeypatch):
    backbone = create_backbone("gpt-scratch")
    monkeypatch.setattr(backbone, "lora_target_modules", r"blocks\.\d+\.no_such_projection")
    with pytest.raises(Exception, match="no_such_projection"):
        check_freeze_modes(backbone)


def test_the_kit_catches_an_lm_head_that_does_not_grow(monkeypatch):
    backbone = create_backbone("gpt-scratch")
    monkeypatch.setattr(backbone, "resize_vocabulary", lambda vocab_size: None)
    with pytest.raises(Exception, match="index out of range|did not grow"):
        check_action_tokens(backbone)


def test_check_backbone_command_prints_one_row_per_check_and_exits_1_on_a_failure(leaky, monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=400))
    result = CliRunner().invoke(cli.app, ["check-backbone", "sees-the-future", "--option", "hidden_size=32"])
    assert result.exit_code == 1
    assert "conformance of backbone sees-the-future hidden_size=32" in result.output
    assert result.output.count("fail") >= 2 and "suffix causality" in result.output


def test_check_backbone_command_exits_0_when_every_check_passes(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=400))
    result = CliRunner().invoke(cli.app, ["check-backbone", "gpt-scratch", "--option", "layers=1"])
    assert result.exit_code == 0 and "fail" not in result.output


def test_check_backbone_command_refuses_an_option_without_a_value(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["robovlms", "check-backbone", "gpt-scratch", "--option", "hidden_size"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2 and "--option 'hidden_size' is not KEY=VALUE" in capsys.readouterr().out


def test_the_backbone_doc_names_everything_a_backbone_must_and_may_provide():
    from pathlib import Path

    from robovlms.backbone import BACKBONES, Backbone

    doc = (Path(__file__).parent.parent / "docs" / "adding-a-backbone.md").read_text()
    provides = doc[doc.index("## What a backbone provides"):doc.index("## Registering it")]
    required = sorted(Backbone.__abstractmethods__) + list(BACKBONES.required_attributes)
    optional = ["reference_hidden_state", "image_size=", "get_rope_index", "token_type_ids", "ImageProcessorPil"]
    assert [name for name in required + optional if f"`{name}" not in provides and f"{name}`" not in provides] == []


def test_the_kit_says_once_that_a_backbone_returns_the_wrong_width(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "narrow_backbone", NARROW_BACKBONE,
                   {"robovlms.backbones": {"narrow": "narrow_backbone:Narrow"}})
    results = check_backbone("narrow")
    failures = [result.reason for result in results if not result.passed]
    assert failures == ["backbone 'narrow' returned hidden size 32, its hidden_size says 64: contextualise must "
                        "return the last layer's hidden states"]
    assert sum("needs a forward of the right width" in result.reason for result in results) >= 5
