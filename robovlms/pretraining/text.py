"""The texts pre-training writes for a view, from what the simulator says it shows: a prompt and the target text
the backbone learns to write after the image and the prompt.

    caption     "describe the gripper camera view." -> "a red puck and a grey wall. the puck is 3 cm right, 1 cm
                ahead and 19 cm below the gripper."
    question    "where is the puck?" -> "3 cm right, 1 cm ahead and 19 cm below the gripper"; how far, what colour,
                whether an object is in view, which of two is closer to the gripper or left of the other
    grounding   "find the puck in the image." -> the puck's box in the backbone's own location tokens
                (`Backbone.grounded_phrase`: KOSMOS-2's <patch_index_XXXX>, PaliGemma's <locXXXX>, words otherwise)

Only what the image shows is written: an object's colour, box and offset only when it is in view (its offset from
the gripper is what the gripper camera shows, and what a policy needs to reach it); an object out of view is said to
be. Directions are the robot's: right and left along x, ahead and behind along y (away from and towards its base),
above and below along z.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from robovlms.pretraining.objects import TASK_OBJECTS

KINDS = ("caption", "question", "grounding")
CAMERA_NAMES = {"rgb_gripper": "gripper camera", "rgb_static": "side camera"}
OBJECT_NAMES = sorted({name for objects in TASK_OBJECTS.values() for name, _ in objects})

Grounding = Callable[[str, tuple[float, float, float, float]], str]  # Backbone.grounded_phrase


def view_text(objects: list[dict[str, Any]], camera: str, kind: str, rng: np.random.Generator,
              ground: Grounding) -> tuple[str, str]:
    """(prompt, target) of one kind for a view whose objects are `objects` (robovlms/pretraining/frames.py)."""
    seen = [thing for thing in objects if thing["box"] is not None]
    if kind == "caption":
        return f"describe the {CAMERA_NAMES.get(camera, camera)} view.", caption(seen)
    if kind == "question":
        return question(objects, seen, rng)
    thing = objects[rng.integers(len(objects))]
    target = ground(f"the {thing['name']}", tuple(thing["box"])) if thing["box"] else "it is not in view."
    return f"find the {thing['name']} in the image.", target


def caption(seen: list[dict[str, Any]]) -> str:
    if not seen:
        return "no object in view."
    listing = " and ".join(f"{article(thing['colour'])} {thing['colour']} {thing['name']}" for thing in seen)
    offsets = " ".join(f"the {thing['name']} is {offset_text(thing['offset'])}." for thing in seen)
    return f"{listing}. {offsets}"


def question(objects: list[dict[str, Any]], seen: list[dict[str, Any]], rng: np.random.Generator) -> tuple[str, str]:
    """One question about the view and its answer, drawn from those the view can answer."""
    asked = []
    for thing in seen:
        name = thing["name"]
        asked += [(f"where is the {name}?", offset_text(thing["offset"])),
                  (f"how far is the {name} from the gripper?", f"{centimetres(np.linalg.norm(thing['offset']))} cm"),
                  (f"what colour is the {name}?", thing["colour"])]
    for thing in objects:
        asked.append((f"is the {thing['name']} in view?", "yes" if thing["box"] else "no"))
    absent = [name for name in OBJECT_NAMES if name not in {thing["name"] for thing in objects}]
    asked.append((f"is the {absent[rng.integers(len(absent))]} in view?", "no"))
    if len(seen) >= 2:
        first, second = (seen[i] for i in rng.permutation(len(seen))[:2])
        closer = min((first, second), key=lambda thing: np.linalg.norm(thing["offset"]))
        side = "left" if first["position"][0] < second["position"][0] else "right"
        asked += [(f"which is closer to the gripper, the {first['name']} or the {second['name']}?",
                   f"the {closer['name']}"),
                  (f"is the {first['name']} left or right of the {second['name']}?", side)]
    return asked[rng.integers(len(asked))]


def offset_text(offset) -> str:
    """'3 cm right, 1 cm ahead and 19 cm below the gripper' for an offset (x, y, z) in metres."""
    x, y, z = offset
    return (f"{centimetres(x)} cm {'right' if x >= 0 else 'left'}, {centimetres(y)} cm "
            f"{'ahead' if y >= 0 else 'behind'} and {centimetres(z)} cm {'above' if z >= 0 else 'below'} the gripper")


def centimetres(metres: float) -> int:
    return round(abs(float(metres)) * 100)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
