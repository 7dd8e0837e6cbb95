"""Pre-training a backbone on vision-language data made from the simulator, the way its VLM was pre-trained
(docs/pretraining.md).

    objects.py   the objects of each Meta-World task, which bodies make them, the names of their colours
    frames.py    views rendered from Meta-World tasks and scenes, with what each shows (cached by their settings)
    text.py      captions, questions and answers, and grounding written from what a view shows
    config.py    PretrainingConfig: the backbone, frames, text mix and optimisation, validated; the content hash
    module.py    PretrainingModule: a step of the backbone's own language-modelling loss; the views and texts
    run.py       `pretrain`: Lightning's Trainer over all of the above, writing what `size: pretrained` loads
    held_out.py  what pre-training must not see for a sweep's test to stay honest
    probe.py     a linear probe of a policy's [LRN] state for the target object's position
"""

from typing import Any

from robovlms.pretraining.config import (
    PRETRAINING_TASKS,
    FrameSettings,
    PretrainingConfig,
    TextSettings,
    content_hash,
    load_pretraining_config,
)
from robovlms.pretraining.held_out import check_held_out
from robovlms.pretraining.run import PRETRAINING_FILE, pretrain, pretrained_path, pretraining_record


def pretraining_config(settings: dict[str, Any], backbone: dict[str, Any]) -> PretrainingConfig:
    """A sweep's named pre-training settings for one cell's backbone."""
    from robovlms.errors import ConfigError

    if "backbone" in settings:
        raise ConfigError("pre-training settings in a sweep take the backbone of the cells that use them; remove "
                          "their `backbone` key")
    return load_pretraining_config({**settings, "backbone": backbone})


__all__ = ["PRETRAINING_FILE", "PRETRAINING_TASKS", "FrameSettings", "PretrainingConfig", "TextSettings",
           "check_held_out", "content_hash", "load_pretraining_config", "pretrain", "pretrained_path",
           "pretraining_config", "pretraining_record"]
