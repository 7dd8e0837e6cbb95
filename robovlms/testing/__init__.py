"""The conformance kits: what every plugin must do for the rest of robovlms to be right with it.

    backbone.py     backbones (`robovlms check-backbone NAME`, `assert_backbone_conforms`): causality, batch
                    independence, save / load, freeze modes and LoRA, action tokens, image settings
    formulation.py  formulations (`robovlms check-formulation NAME`, `assert_formulation_conforms`), on every
                    built-in backbone: loss, predict, act, rollout encoding, batching, device, seeding, checkpoint
    checks.py       what both report: one pass, fail or skip per check, with a one-line reason

Each check is also a function taking a freshly built plugin, for a plugin's own pytest suite.
"""

from robovlms.testing.backbone import (
                                       CHECKS,
                                       INSTRUCTIONS,
                                       MAX_IMAGE_SLOTS,
                                       REFERENCE_TOLERANCE,
                                       assert_backbone_conforms,
                                       check_action_tokens,
                                       check_backbone,
                                       check_batch_independence,
                                       check_forward_and_gradients,
                                       check_frame_causality,
                                       check_freeze_modes,
                                       check_image_settings,
                                       check_lora_on_all_linear_layers,
                                       check_lora_save_and_load,
                                       check_reference_forward,
                                       check_save_and_load,
                                       check_suffix_causality,
                                       random_images,
                                       random_suffix,
)
from robovlms.testing.checks import TOLERANCE, CheckResult, SkipCheck, run_check
from robovlms.testing.formulation import (
                                       assert_formulation_conforms,
                                       build_formulation,
                                       check_act,
                                       check_batching,
                                       check_checkpoint,
                                       check_device,
                                       check_formulation,
                                       check_loss,
                                       check_predict,
                                       check_rollout_encoding,
                                       check_seeding,
                                       random_windows,
)

__all__ = ["CHECKS", "INSTRUCTIONS", "MAX_IMAGE_SLOTS", "REFERENCE_TOLERANCE", "TOLERANCE", "CheckResult", "SkipCheck",
           "assert_backbone_conforms", "assert_formulation_conforms", "build_formulation", "check_act",
           "check_action_tokens", "check_backbone", "check_batch_independence", "check_batching", "check_checkpoint",
           "check_device", "check_formulation", "check_forward_and_gradients", "check_frame_causality",
           "check_freeze_modes", "check_image_settings", "check_lora_on_all_linear_layers", "check_lora_save_and_load",
           "check_loss", "check_predict", "check_reference_forward", "check_rollout_encoding", "check_save_and_load",
           "check_seeding", "check_suffix_causality", "random_images", "random_suffix", "random_windows", "run_check"]
