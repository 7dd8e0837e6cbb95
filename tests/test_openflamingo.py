"""openflamingo: RoboVLMs' Flamingo (OpenFlamingo) assembled from transformers' CLIP, IDEFICS and MPT classes."""

import pytest
import torch
from brief_training import train_briefly
from robovlms.backbones.openflamingo import CrossAttendedBlock, OpenFlamingo, OpenFlamingoArchitecture
from synthetic_store import write_synthetic_store
from transformers import CLIPVisionConfig, CLIPVisionModel, MptConfig, MptForCausalLM
from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
from transformers.models.mpt.modeling_mpt import MptBlock

from robovlms.backbone import create_backbone
from robovlms.errors import ConfigError
from robovlms.formulation import create_formulation
from robovlms.testing import assert_backbone_conforms
from robovlms.tokenizer import train_instruction_tokenizer

INSTRUCTIONS = ["press the button from the top", "open the door"]


def inputs(backbone, frames=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2, frames, 1, 64, 64, 3), dtype=torch.uint8, generator=generator)
    suffix = torch.randn(2, frames, 1, backbone.hidden_size, generator=generator) * 0.02
    return backbone.preprocess_images(images), suffix


def test_openflamingo_passes_the_conformance_kit():
    results = {result.check: result.status for result in assert_backbone_conforms("openflamingo")}
    assert results["wrapped model's forward"] == "skip"  # assembled: no single transformers forward to compare


def test_every_layer_is_a_transformers_class():
    model = create_backbone("openflamingo", layers=4, cross_attention_every=2).model
    assert isinstance(model.vision, CLIPVisionModel) and isinstance(model.language, MptForCausalLM)
    assert isinstance(model.resampler, IdeficsPerceiverResampler)
    blocks = model.language.transformer.blocks
    assert [isinstance(block, CrossAttendedBlock) for block in blocks] == [False, True, False, True]
    assert all(isinstance(block.cross_attention, IdeficsGatedCrossAttentionLayer) and isinstance(block.block, MptBlock)
               for block in model.cross_attended_blocks())


def test_with_closed_gates_the_text_path_is_mpt_s_own_forward():
    """OpenFlamingo's gates start at tanh(0) = 0: the wrapped language model then computes exactly what the MPT
    model computes alone on the same embeddings."""
    backbone = create_backbone("openflamingo", gate_init_std=0.0).eval()
    plain = MptForCausalLM(backbone.model.language.config).eval()
    weights = {key.replace(".block.", "."): value for key, value in backbone.model.language.state_dict().items()
               if ".cross_attention." not in key}
    plain.load_state_dict(weights)
    pixel_values, suffix = inputs(backbone)
    context = backbone.build_context(INSTRUCTIONS, 1, 1, 1, interleaved=False)
    with torch.no_grad():
        hidden = backbone.contextualise(context, pixel_values.flatten(0, 2), suffix.flatten(0, 2))
        embeds = backbone.merge_embeddings(context, None, suffix.flatten(0, 2))
        alone = plain.transformer(inputs_embeds=embeds, attention_mask=context.attention_mask).last_hidden_state
    torch.testing.assert_close(hidden, alone)


def test_text_before_the_image_sees_no_image_and_text_after_it_does():
    backbone = create_backbone("openflamingo").eval()
    pixel_values, suffix = inputs(backbone)
    context = backbone.build_context(INSTRUCTIONS, 1, 1, 1, interleaved=False)
    other, _ = inputs(backbone, seed=1)
    with torch.no_grad():
        first = backbone.contextualise(context, pixel_values.flatten(0, 2), suffix.flatten(0, 2))
        second = backbone.contextualise(context, other.flatten(0, 2), suffix.flatten(0, 2))
    assert context.frame[0, 0] == -1  # <s>, before the <image> marker
    torch.testing.assert_close(first[:, 0], second[:, 0])
    assert not torch.allclose(first[:, 1:], second[:, 1:])


def parameters(module):
    return sum(p.numel() for p in module.parameters())


def test_openflamingo_3b_sizes_give_about_three_billion_parameters():
    """OpenFlamingo-3B's parts, built on the meta device: CLIP ViT-L/14, a 6-deep resampler of 64 latents, MPT-1B
    (transformers' MptConfig defaults: d_model 2048, 24 blocks), a cross-attention layer before every block."""
    architecture = OpenFlamingoArchitecture(
        vision=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=224, patch_size=14).to_dict(),
        language=MptConfig(vocab_size=50280).to_dict())
    with torch.device("meta"):
        model = OpenFlamingo(architecture)
    assert 0.30e9 < parameters(model.vision) < 0.31e9
    assert len(model.cross_attended_blocks()) == 24
    assert 3.1e9 < parameters(model) < 3.3e9


def test_pretrained_builds_from_a_local_clip_and_mpt_with_fresh_closed_gates(tmp_path):
    tokenizer = train_instruction_tokenizer(512)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "model" / "vision")
    MptForCausalLM(MptConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=len(tokenizer))).save_pretrained(
        tmp_path / "model" / "language")
    tokenizer.save_pretrained(tmp_path / "model" / "language")
    backbone = create_backbone("openflamingo", "pretrained", path=str(tmp_path / "model"))
    assert backbone.label == f"openflamingo (pretrained: {tmp_path / 'model'})" and backbone.image_size == 32
    assert all(torch.count_nonzero(block.cross_attention.alpha_cross_attn) == 0
               for block in backbone.model.cross_attended_blocks())
    assert backbone.tokenizer.convert_tokens_to_ids("<image>") != backbone.tokenizer.unk_token_id
    with pytest.raises(ConfigError, match=r"needs .*vision to hold a model of type clip or clip_vision_model"):
        create_backbone("openflamingo", "pretrained", path=str(tmp_path))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


@pytest.mark.parametrize("name, history", [("one-step-discrete", 1), ("one-step-continuous", 1), ("interleaved", 2),
                                           ("policy-head", 2)])
def test_every_formulation_learns_on_openflamingo(store, name, history):
    torch.manual_seed(0)
    formulation = create_formulation(name, create_backbone("openflamingo"), store.action_statistics,
                                     store.state_statistics, history=history, chunk=2, use_state=True)
    losses, _ = train_briefly(formulation, store)
    assert losses[-1] < 0.8 * losses[0], losses
