"""What pre-training must never see for a sweep's test to stay honest: the tasks it evaluates, and its test and
validation scenes (docs/pretraining.md)."""

from __future__ import annotations

from typing import Any

from robovlms.errors import ConfigError
from robovlms.pretraining.config import PretrainingConfig


def check_held_out(config: PretrainingConfig, benchmark: str, options: dict[str, Any], split: str, what: str) -> None:
    """Refuse pre-training frames of a task the sweep evaluates on, or of its test or validation scenes. The frames
    are Meta-World's, so only a Meta-World sweep can share them."""
    if benchmark != "metaworld":
        return
    from robovlms.benchmarks.metaworld import TASK_SETS, resolve_tasks, split_scenes

    evaluated = set(resolve_tasks(options.get("tasks", "mt10")))
    shared = sorted(evaluated & set(config.frames.tasks))
    if shared:
        raise ConfigError(f"{what} renders frames of task(s) {', '.join(shared)}, which the sweep evaluates on; "
                          f"pre-training must not see them (frames.tasks, by default every task but the demo's "
                          f"{', '.join(TASK_SETS['demo'])})")
    held_out = "".join(split_scenes(split)[1:])  # the test scenes, and the validation scenes where the split has them
    seen = sorted(set(held_out) & set(config.frames.scenes))
    if seen:
        raise ConfigError(f"{what} renders frames of scene(s) {', '.join(seen)}, which split {split} tests or "
                          f"validates on; pre-training must not see them: give frames.scenes from the other scenes")
