"""A figure of example views and the texts pre-training writes for them: `robovlms pretrain --examples FILE`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from robovlms.pretraining.config import PretrainingConfig
from robovlms.pretraining.frames import frame_set
from robovlms.pretraining.text import KINDS, view_text

EXAMPLES = 8  # views shown, alternating cameras and kinds of text
SEED = 3


def examples_figure(config: PretrainingConfig, root: str | Path, out: str | Path, workers: int = 1,
                    progress: bool = False) -> Path:
    """Write a PNG of EXAMPLES views of the pre-training frames (rendered if needed), each with one text of each
    kind written for the backbone of `config` (its own location tokens for grounding, whose box is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from robovlms.backbone import create_backbone

    frames = frame_set(config.frames, root, workers, progress)
    backbone = create_backbone(config.backbone.name, config.backbone.size, config.backbone.path,
                               **config.backbone.options)
    rng = np.random.default_rng(SEED)
    cameras = list(config.frames.cameras)
    chosen = []
    for index in range(EXAMPLES):  # views with an object in view, from both cameras in turn
        candidates = [view for view in range(len(frames)) if frames.views.camera.iloc[view] == cameras[
            index % len(cameras)] and any(thing["box"] for thing in frames.objects(view)) and view not in chosen]
        chosen.append(int(rng.choice(candidates)))
    figure, axes = plt.subplots(2, EXAMPLES // 2, figsize=(3.2 * EXAMPLES // 2, 9.5))
    for axis, view in zip(axes.flat, chosen):
        row = frames.views.iloc[view]
        axis.imshow(frames.images[view])
        axis.set_axis_off()
        lines = [f"{row.task}, scene {row.scene}, {row.camera}"]
        for kind in KINDS:
            prompt, target = view_text(frames.objects(view), row.camera, kind, rng, backbone.grounded_phrase)
            lines.append(textwrap.fill(f"[{kind}] {prompt} -> {target}", 44))
        for thing in frames.objects(view):
            if thing["box"]:
                size = frames.images.shape[1]
                x0, y0, x1, y1 = (value * size - 0.5 for value in thing["box"])
                axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", linewidth=1))
        axis.set_title("\n".join(lines), fontsize=6.5, loc="left", family="monospace")
    figure.suptitle(f"Pre-training views and texts for {backbone.name} (boxes: what its grounding text locates)",
                    fontsize=10)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
