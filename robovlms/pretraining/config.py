"""Pre-training settings, validated before anything is built, and the content hash a pre-training is cached by."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from robovlms.benchmarks.metaworld import CAMERAS, SCENES, TASK_SETS
from robovlms.errors import UnknownNameError, config_error
from robovlms.pretraining.objects import TASK_OBJECTS
from robovlms.training.config import MAX_BATCH_SIZE, MAX_STEPS, BackboneSettings
from robovlms.yaml_files import read_yaml_mapping

# Raised when what a setting makes changes (the frames rendered, the texts written): caches made before are not
# taken for the new ones.
FORMAT_VERSION = 1
# Every Meta-World task but the demo's four: pre-training never sees the tasks the demo evaluates
PRETRAINING_TASKS = tuple(task for task in TASK_OBJECTS if task not in TASK_SETS["demo"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FrameSettings(_Strict):
    """Which frames are rendered (robovlms/pretraining/frames.py)."""

    tasks: list[str] = list(PRETRAINING_TASKS)
    scenes: str = "ABC"  # never the test scene or the validation scene of a split that is evaluated (a sweep checks)
    episodes_per_task: int = Field(4, ge=1, le=10_000)  # per task and scene
    frames_per_episode: int = Field(8, ge=1, le=1000)  # steps rendered, each from every camera
    cameras: list[str] = ["rgb_gripper", "rgb_static"]
    image_size: int = Field(64, ge=64, le=224)
    max_steps: int = Field(150, ge=1, le=1000)  # of an episode; the rendered steps are drawn from them
    max_noise: float = Field(0.5, ge=0)  # the expert's action noise has a scale drawn from [0, max_noise] per episode
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        return _known("Meta-World task", tasks, TASK_OBJECTS, "no tasks: pre-training needs frames of at least one task")

    @field_validator("scenes")
    @classmethod
    def _known_scenes(cls, scenes: str) -> str:
        return _known("scene", scenes, SCENES, "no scenes: pre-training needs frames of at least one scene")

    @field_validator("cameras")
    @classmethod
    def _known_cameras(cls, cameras: list[str]) -> list[str]:
        return _known("camera", cameras, CAMERAS, "no cameras: pre-training needs images from at least one")


def _known(kind: str, names, known, when_empty: str):
    """`names` (a list, or a string of scene letters) if each is one of `known` and there is one at least."""
    for name in names:
        if name not in known:
            raise UnknownNameError(kind, name, known)
    if not names:
        raise ValueError(when_empty)
    return names


class TextSettings(_Strict):
    """How often each kind of text is written for a view (robovlms/pretraining/text.py), relative weights."""

    caption: float = Field(1.0, ge=0)  # which objects are in view, their colours, the target's offset
    question: float = Field(1.0, ge=0)  # a question about one object and its answer
    grounding: float = Field(1.0, ge=0)  # where an object is in the image, in the backbone's location tokens

    @model_validator(mode="after")
    def _some_text(self) -> TextSettings:
        if not any(self.model_dump().values()):
            raise ValueError("the weights of caption, question and grounding are all 0: no text would be written")
        return self


class PretrainingConfig(_Strict):
    backbone: BackboneSettings = BackboneSettings(name="kosmos2")  # built as for training; trained in full
    frames: FrameSettings = FrameSettings()
    text: TextSettings = TextSettings()
    max_steps: int = Field(2000, ge=1, le=MAX_STEPS, strict=True)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE, strict=True)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0, le=MAX_STEPS, strict=True)
    weight_decay: float = Field(0.01, ge=0)
    gradient_clip: float | None = Field(1.0, gt=0)
    validation_fraction: float = Field(0.1, ge=0, lt=1)  # of the episodes, held out for val/loss
    validate_every: int = Field(250, ge=1, le=MAX_STEPS, strict=True)
    validation_batches: int = Field(4, ge=1, strict=True)
    checkpoint_every: int = Field(250, ge=1, le=MAX_STEPS, strict=True)
    log_every: int = Field(25, ge=1, le=MAX_STEPS, strict=True)
    seed: int = Field(0, strict=True)

    @model_validator(mode="after")
    def _pretrainable_backbone(self) -> PretrainingConfig:
        """Refused before any frame is rendered: a backbone that does not give its language-modelling loss."""
        from robovlms.backbone import Backbone
        from robovlms.backbone.registry import check_backbone_settings
        from robovlms.errors import PluginError

        backbone = self.backbone
        backbone_class = check_backbone_settings(backbone.name, backbone.size, backbone.path, backbone.options)
        missing = [method for method in ("language_modeling_loss", "save_pretrained")
                   if getattr(backbone_class, method) is getattr(Backbone, method)]
        if missing:
            raise PluginError(f"backbone {backbone.name!r} cannot be pre-trained: it does not implement "
                              f"{' or '.join(missing)} (docs/pretraining.md#pre-training-your-own-backbone)")
        return self


def content_hash(settings: BaseModel) -> str:
    """What a cache is keyed by: the settings' content and the format version (SHA-256, hex)."""
    payload = {"format": FORMAT_VERSION, "kind": type(settings).__name__, **settings.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_pretraining_config(source: PretrainingConfig | dict[str, Any] | str | Path) -> PretrainingConfig:
    """A PretrainingConfig from itself, a dict or a YAML file; every error names the bad key and the valid ones."""
    if isinstance(source, PretrainingConfig):
        return source
    if not isinstance(source, dict):
        source = read_yaml_mapping(source, "pre-training settings")
    try:
        return PretrainingConfig.model_validate(source)
    except ValidationError as error:
        raise config_error("invalid pre-training settings", PretrainingConfig, error) from None
