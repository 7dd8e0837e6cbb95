"""The messages of `robovlms serve`: msgpack maps, numpy arrays in openpi's msgpack-numpy encoding.

An array is the map {b"__ndarray__": True, b"data": its bytes, b"dtype": its dtype string, b"shape": [...]} and a
numpy scalar {b"__npgeneric__": True, b"data": value, b"dtype": ...}, exactly as openpi_client.msgpack_numpy packs
them, so either side's packer reads the other's. Only booleans, integers and floats travel as arrays: nothing is
unpickled.

    server -> client, once on connecting: metadata
        {"protocol": "robovlms-policy", "version": 1, "cameras": [...], "image_size": S, "state_dim": S or None,
         "action_dim": A, "chunk": L, "history": H, "execution": ..., "device": ..., "max_message_bytes": N}
    client -> server, one per step: an observation
        {"images": {camera: uint8 (H, W, 3)}, "state": float (S,), "instruction": str,
         "reset": bool (optional: this observation starts an episode), "seed": int (optional, with reset)}
    server -> client: the actions
        {"actions": float32 (L, A) the predicted chunk, un-normalised;
         "execute": float32 (k, A) what the run's execution executes now (k = 1 for first and ensemble, L for chunk);
         "server_timing": {"infer_ms": float}}
    or, for a message it cannot answer, a text frame "error: ..." (openpi's convention for errors); the
    connection stays open.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from robovlms.benchmark import Observation, square_image
from robovlms.errors import RobovlmsError

PROTOCOL = "robovlms-policy"
VERSION = 1
ARRAY_KINDS = "biuf"  # booleans, integers, unsigned integers, floats


class MessageError(RobovlmsError):
    """A message that does not follow the protocol; its text says what is wrong."""


class PolicyServerError(RobovlmsError):
    """A policy server (`robovlms serve`, or an evaluation's) refused a message or could not answer it; its reason
    is in the message."""


def _pack_array(value):
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind not in ARRAY_KINDS:
        raise MessageError(f"arrays of dtype {value.dtype} cannot be sent; only booleans, integers and floats")
    if isinstance(value, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(value).tobytes(), b"dtype": value.dtype.str,
                b"shape": list(value.shape)}
    if isinstance(value, np.generic):
        return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
    return value


def _unpack_array(value: dict):
    if b"__ndarray__" in value or b"__npgeneric__" in value:
        try:
            dtype = np.dtype(value[b"dtype"])
        except (KeyError, TypeError) as error:
            raise MessageError(f"an array without a valid dtype ({error})") from None
        if dtype.kind not in ARRAY_KINDS:
            raise MessageError(f"arrays of dtype {dtype} are refused; only booleans, integers and floats")
        if b"__npgeneric__" in value:
            return dtype.type(value[b"data"])
        try:
            return np.frombuffer(value[b"data"], dtype=dtype).reshape(value[b"shape"])
        except (KeyError, TypeError, ValueError) as error:
            raise MessageError(f"an array whose data does not fit its dtype and shape ({error})") from None
    return value


def pack(message: Any) -> bytes:
    return msgpack.packb(message, default=_pack_array, use_bin_type=True)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, object_hook=_unpack_array, raw=False, strict_map_key=False)
    except MessageError:
        raise
    except Exception as error:  # noqa: BLE001 - msgpack raises several kinds for malformed input
        raise MessageError(f"not a msgpack message ({type(error).__name__}: {error})") from None


def read_observation(data: bytes | str, cameras: list[str], image_size: int, state_dim: int | None
                     ) -> tuple[Observation, bool, int]:
    """(the observation, whether it starts an episode, the episode's seed) of a client's message; MessageError
    says what is wrong with one that is not an observation. Images of another size are resized to `image_size`
    (bilinear, as the benchmarks and dataset imports make their square images)."""
    if isinstance(data, str):
        raise MessageError("text frames are not observations: send a msgpack map as a binary frame")
    message = unpack(data)
    if not isinstance(message, dict):
        raise MessageError(f"an observation is a map, not {type(message).__name__}")
    unknown = sorted(str(key) for key in set(message) - {"images", "state", "instruction", "reset", "seed"})
    if unknown:
        raise MessageError(f"unknown key(s) {', '.join(unknown)}; an observation has images, state, instruction "
                           f"and optionally reset and seed")
    images = message.get("images")
    if not isinstance(images, dict) or set(cameras) - set(images):
        given = sorted(images) if isinstance(images, dict) else type(images).__name__
        raise MessageError(f"images must map each of the cameras {cameras} to an image; got {given}")
    squared = {}
    for camera in cameras:
        image = images[camera]
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
                or not image.size:
            described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise MessageError(f"image {camera!r} must be uint8 (height, width, 3), not empty; got {described}")
        squared[camera] = square_image(image, image_size)
    given = message.get("state")
    try:
        state = np.asarray(given, dtype=np.float32) if isinstance(given, (np.ndarray, list)) else None
    except (TypeError, ValueError):  # strings, or lists of unequal lengths
        state = None
    if state is None or state.ndim != 1 or (state_dim is not None and len(state) != state_dim) \
            or not np.isfinite(state).all():
        described = f"{given.dtype} {given.shape}: {given!r:.80}" if isinstance(given, np.ndarray) else f"{given!r:.80}"
        raise MessageError(f"state must be a vector of {state_dim if state_dim is not None else 'the'} finite "
                           f"proprio values; got {described}")
    instruction = message.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise MessageError("instruction must be a non-empty string")
    reset, seed = message.get("reset", False), message.get("seed", 0)
    if not isinstance(reset, bool) or not isinstance(seed, int) or isinstance(seed, bool):
        raise MessageError(f"reset must be true or false and seed an integer; got {reset!r} and {seed!r}")
    return Observation(images=squared, state=state, instruction=instruction), reset, seed
