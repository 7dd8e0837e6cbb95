"""What the objects of each Meta-World task are called, which bodies of its scene make them, and their colours.

Each task lists its objects, the target first: the object whose position Meta-World's observation holds at
[4:7] (the button, the mug, the door's handle); a second object whose position it holds at [11:14] (the nail, the
thermos) comes second; the others are placed where their top-level body is. An object's pixels in an image are
those of the geoms under its top-level bodies, from MuJoCo's segmentation rendering.
"""

from __future__ import annotations

import numpy as np

# task -> ((name, top-level bodies), ...), the target first
TASK_OBJECTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "assembly": (("nut", ("RoundNut",)), ("peg", ("peg",))),
    "basketball": (("ball", ("bsktball",)), ("hoop", ("basket_goal",))),
    "bin-picking": (("cube", ("obj",)), ("bin", ("bin_start",)), ("goal bin", ("bin_goal",))),
    "box-close": (("lid", ("boxbodytop",)), ("box", ("boxbody",))),
    "button-press-topdown": (("button", ("box",)),),
    "button-press-topdown-wall": (("button", ("box",)), ("wall", ("wall",))),
    "button-press": (("button", ("box",)),),
    "button-press-wall": (("button", ("box",)), ("wall", ("wall",))),
    "coffee-button": (("coffee machine", ("coffee_machine",)), ("mug", ("obj",))),
    "coffee-pull": (("mug", ("obj",)), ("coffee machine", ("coffee_machine",))),
    "coffee-push": (("mug", ("obj",)), ("coffee machine", ("coffee_machine",))),
    "dial-turn": (("dial", ("dial",)),),
    "disassemble": (("nut", ("RoundNut",)), ("peg", ("peg",))),
    "door-close": (("door", ("door",)),),
    "door-lock": (("door lock", ("door",)),),
    "door-open": (("door", ("door",)),),
    "door-unlock": (("door lock", ("door",)),),
    "hand-insert": (("block", ("obj",)),),
    "drawer-close": (("drawer", ("drawer",)),),
    "drawer-open": (("drawer", ("drawer",)),),
    "faucet-open": (("faucet", ("faucetBase",)),),
    "faucet-close": (("faucet", ("faucetBase",)),),
    "hammer": (("hammer", ("hammerbody",)), ("nail", ("box",))),
    "handle-press-side": (("handle", ("box",)),),
    "handle-press": (("handle", ("box",)),),
    "handle-pull-side": (("handle", ("box",)),),
    "handle-pull": (("handle", ("box",)),),
    "lever-pull": (("lever", ("lever",)),),
    "pick-place-wall": (("block", ("obj",)), ("wall", ("wall",))),
    "pick-out-of-hole": (("block", ("obj",)),),
    "pick-place": (("block", ("obj",)),),
    "plate-slide": (("plate", ("puck_channel",)), ("goal", ("puck_goal",))),
    "plate-slide-side": (("plate", ("puck_channel",)), ("goal", ("puck_goal",))),
    "plate-slide-back": (("plate", ("puck_channel",)), ("goal", ("puck_goal",))),
    "plate-slide-back-side": (("plate", ("puck_channel",)), ("goal", ("puck_goal",))),
    "peg-insert-side": (("peg", ("peg",)), ("box", ("box",))),
    "peg-unplug-side": (("plug", ("plug1",)), ("box", ("box",))),
    "soccer": (("ball", ("soccer_ball",)), ("goal", ("goal_whole",))),
    "stick-push": (("stick", ("stick",)), ("thermos", ("object",))),
    "stick-pull": (("stick", ("stick",)), ("thermos", ("object",))),
    "push": (("puck", ("obj",)),),
    "push-wall": (("puck", ("obj",)), ("wall", ("wall",))),
    "push-back": (("puck", ("obj",)),),
    "reach": (("puck", ("obj",)),),
    "reach-wall": (("puck", ("obj",)), ("wall", ("wall",))),
    "shelf-place": (("block", ("obj",)), ("shelf", ("shelf",))),
    "sweep-into": (("puck", ("obj",)),),
    "sweep": (("puck", ("obj",)),),
    "window-open": (("window", ("window",)),),
    "window-close": (("window", ("window",)),),
}
SECOND_OBJECT_TASKS = ("hammer", "stick-push", "stick-pull")  # whose second object's position is at [11:14]

HUES = (("red", 15), ("orange", 40), ("yellow", 70), ("green", 165), ("blue", 255), ("purple", 290), ("pink", 340),
        ("red", 360))  # a hue in degrees takes the first name whose upper bound it is under


def colour_name(rgb) -> str:
    """The name of an RGB colour in [0, 1], as the image shows it: black, grey or white when it is hardly
    saturated (by brightness), brown for a dark orange, else its hue's name."""
    import colorsys

    hue, saturation, value = colorsys.rgb_to_hsv(*(float(channel) for channel in rgb[:3]))
    if value < 0.15:
        return "black"
    if saturation < 0.25:
        return "white" if value > 0.8 else "grey"
    name = next(name for name, bound in HUES if hue * 360 < bound)
    return "brown" if name in ("orange", "red") and value < 0.5 and hue * 360 > 10 else name


class SceneObjects:
    """The objects of one task's MuJoCo model: which geoms make each one, and each geom's colour name."""

    def __init__(self, task: str, model):
        import mujoco

        self.names = [name for name, _ in TASK_OBJECTS[task]]
        self.has_second = task in SECOND_OBJECT_TASKS
        body_ids = [[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, body) for body in bodies]
                    for _, bodies in TASK_OBJECTS[task]]
        self.bodies = [ids[0] for ids in body_ids]  # where an object without an observed position is placed
        root_of = {body: index for index, ids in enumerate(body_ids) for body in ids}
        # the object of every geom: -1 for the robot, the table and anything else
        self.geom_object = np.array([root_of.get(int(model.body_rootid[model.geom_bodyid[geom]]), -1)
                                     for geom in range(model.ngeom)])

    def positions(self, observation: np.ndarray, data) -> np.ndarray:
        """(objects, 3) world positions: the target's and a second object's from the observation, the others'
        from their top-level body."""
        positions = np.array([data.xpos[body] for body in self.bodies], dtype=np.float64)
        positions[0] = observation[4:7]
        if self.has_second:
            positions[1] = observation[11:14]
        return positions

    def in_image(self, segmentation: np.ndarray, image: np.ndarray) -> list[tuple[int, tuple | None, str | None]]:
        """Per object: its pixel count in an upright (S, S, 2) segmentation image (geom id, object type), the box
        (x0, y0, x1, y1) of its pixels in fractions of the image from its top left, and the name of their median
        colour in `image` (S, S, 3); box and colour None when none of its pixels is seen."""
        import mujoco

        size = segmentation.shape[0]
        geoms = np.where(segmentation[..., 1] == mujoco.mjtObj.mjOBJ_GEOM, segmentation[..., 0], -1)
        owner = np.where(geoms >= 0, self.geom_object[np.clip(geoms, 0, None)], -1)
        found = []
        for index in range(len(self.names)):
            rows, columns = np.nonzero(owner == index)
            if len(rows) == 0:
                found.append((0, None, None))
                continue
            box = (columns.min() / size, rows.min() / size, (columns.max() + 1) / size, (rows.max() + 1) / size)
            colour = colour_name(np.median(image[rows, columns], axis=0) / 255)
            found.append((len(rows), tuple(float(value) for value in box), colour))
        return found
