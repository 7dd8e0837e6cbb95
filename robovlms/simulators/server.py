"""The simulator side of robovlms' simulator protocol: a server that runs in the simulator's own Python environment.

Run as `python path/to/server.py`; it needs only the standard library and numpy (and whatever the modules it is asked
to load import), never robovlms or torch, so any interpreter with numpy can host a simulator. robovlms' side is
`robovlms.benchmarks.remote`.

Messages go over the process's stdin and (a duplicate of) its stdout; the server points file descriptor 1 at stderr
first, so whatever a simulator prints, from Python or C, cannot corrupt them. A message is an 8-byte big-endian
length, a JSON document of that length, then the raw bytes of each numpy array the document refers to, each again
after its 8-byte length. JSON objects are only ever markers: {"__dict__": [[key, value], ...]}, {"__tuple__": [...]},
{"__set__": [...]}, {"__array__": index, "dtype": "<f4", "shape": [...]}, {"__handle__": id}. Arrays of numeric
or boolean dtypes are the only binary data; nothing is unpickled.

The server speaks first: {"protocol": PROTOCOL, "version": VERSION, "python": ..., "pid": ...}. The client answers
{"op": "hello", "version": V}; a server refuses another version and exits. Then requests, each answered by
{"ok": true, "result": ...} or {"ok": false, "type": exception class name, "error": message, "traceback": ...}:
  {"op": "call", "module": FILE, "function": NAME, "args": [...], "kwargs": {...}}  a function of a module file
  {"op": "call", "target": HANDLE, "method": NAME, "args": [...], "kwargs": {...}}  a method of a held object
  {"op": "shutdown"}                                                                answer, then exit
A result that is not data (an environment, say) is held by the server and sent as a handle. The server exits when
its stdin closes (its client died). `python server.py --probe MODULE...` prints, as JSON, where each module would be
imported from in this interpreter.

Malformed messages (not JSON, not a request, an unknown marker or dtype, an unhashable key, arrays that do not fill
their shapes ...) are answered with {"ok": false, "type": "ProtocolError", ...}; their bytes are read all the same,
so the next message is read in step. Sizes and nesting are bounded (MAX_*). A message whose length cannot be
trusted (beyond a bound, or whose rest does not arrive within `--message-timeout` seconds, default 600) is answered
the same way, then the server exits with code 1: nothing after it could be read in step.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import io
import json
import os
import select
import struct
import sys
import time
import traceback
from pathlib import Path

import numpy as np

PROTOCOL = "robovlms-simulator"
VERSION = 1
_LENGTH = struct.Struct("!Q")
_ARRAY_KINDS = "biufc"  # booleans, integers, floats, complex numbers: nothing that needs unpickling
MAX_DOCUMENT_BYTES = 64 << 20  # the JSON of one message; arrays travel beside it
MAX_ARRAY_BYTES = 1 << 30
MAX_ARRAYS = 4096
MAX_DEPTH = 200  # JSON nesting; a Python dict is 3 levels ({"__dict__": [[key, value]]})
MESSAGE_TIMEOUT_S = 600.0  # for the rest of a message once its length has arrived
_CHUNK = 1 << 20


class ProtocolError(Exception):
    """A message that does not follow the protocol."""


class FramingError(ProtocolError):
    """A message whose length cannot be trusted (beyond a bound, or its bytes never came): the stream cannot be
    read on in step with its writer."""


def encode(value, arrays: list, hold=None):
    """`value` as JSON-ready data, its numpy arrays appended to `arrays`; objects that are not data are passed to
    `hold` (which returns their marker) or refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ARRAY_KINDS:
            return encode(value.tolist(), arrays, hold)
        arrays.append(np.ascontiguousarray(value))
        return {"__array__": len(arrays) - 1, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, dict):
        return {"__dict__": [[encode(k, arrays, hold), encode(v, arrays, hold)] for k, v in value.items()]}
    if isinstance(value, list):
        return [encode(item, arrays, hold) for item in value]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(item, arrays, hold) for item in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [encode(item, arrays, hold) for item in value]}
    if isinstance(value, Path):
        return str(value)
    if hold is not None:
        return hold(value)
    raise TypeError(f"cannot send a {type(value).__name__} to the simulator process")


def decode(value, arrays: list, handle=None):
    """The inverse of `encode`; `handle(id)` makes the object that stands for a held object."""
    if isinstance(value, list):
        return [decode(item, arrays, handle) for item in value]
    if not isinstance(value, dict):
        return value
    if "__dict__" in value:
        return {_hashable(decode(k, arrays, handle)): decode(v, arrays, handle) for k, v in _pairs(value["__dict__"])}
    if "__tuple__" in value:
        return tuple(decode(item, arrays, handle) for item in _items(value["__tuple__"]))
    if "__set__" in value:
        return {_hashable(decode(item, arrays, handle)) for item in _items(value["__set__"])}
    if "__array__" in value:
        return arrays[value["__array__"]]
    if "__handle__" in value and handle is not None:
        return handle(value["__handle__"])
    raise ProtocolError(f"unknown marker {sorted(value)}")


def _items(value) -> list:
    if not isinstance(value, list):
        raise ProtocolError(f"a marker holds {type(value).__name__}, not a list")
    return value


def _pairs(value) -> list:
    pairs = _items(value)
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
        raise ProtocolError("a __dict__ marker holds something other than [key, value] pairs")
    return pairs


def _hashable(value):
    value = tuple(_hashable(item) for item in value) if isinstance(value, list) else value
    try:
        hash(value)
    except TypeError:
        raise ProtocolError(f"a key or set item of type {type(value).__name__} is not hashable") from None
    return value


def write_message(stream, message, hold=None) -> None:
    arrays: list[np.ndarray] = []
    document = json.dumps(encode(message, arrays, hold)).encode()
    parts = [_LENGTH.pack(len(document)), document]
    for array in arrays:
        parts += [_LENGTH.pack(array.nbytes), array.tobytes()]
    data = memoryview(b"".join(parts))
    while data:  # an unbuffered stream may take part of it
        written = stream.write(data)
        data = data[written if written is not None else 0:]
    stream.flush()


def read_message(stream, handle=None, timeout: float | None = None, message_timeout: float = MESSAGE_TIMEOUT_S):
    """The next message: EOFError when the stream has ended before one begins; TimeoutError when none arrived within
    `timeout` seconds (None: wait for ever), or its rest not within `message_timeout` once its length had; a
    FramingError when its length cannot be trusted; a ProtocolError for any other malformed message, whose bytes
    are then read all the same, so that the next message is read in step. Deadlines need an unbuffered stream
    (io.FileIO); sizes and nesting are bounded (MAX_*)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    length = _read_length(stream, MAX_DOCUMENT_BYTES, "a message", deadline)
    deadline = min(deadline or float("inf"), time.monotonic() + message_timeout)
    text = _read_exactly(stream, length, deadline)
    try:
        document, problem = json.loads(text), None
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, or nested too deep for the parser
        document, problem = None, f"the message is not JSON ({str(error)[:200]})"
    markers, depth = _array_markers(document)
    if len(markers) > MAX_ARRAYS:
        raise FramingError(f"the message refers to {len(markers)} arrays, more than {MAX_ARRAYS}")
    frames = [_read_exactly(stream, _read_length(stream, MAX_ARRAY_BYTES, "an array", deadline), deadline)
              for _ in markers]
    if problem is None and depth > MAX_DEPTH:
        problem = f"the message is nested {depth} deep, more than {MAX_DEPTH}"
    if problem is not None:
        raise ProtocolError(problem)
    try:
        arrays = _arrays(markers, frames)
        return decode(document, arrays, handle)
    except ProtocolError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the bytes make the decoding raise is the sender's mistake
        raise ProtocolError(f"malformed message: {type(error).__name__}: {error}") from None


def _array_markers(document) -> tuple[list[dict], int]:
    """The array markers of a document (each an array frame follows it) and its nesting depth, without recursion."""
    found, depth, pending = [], 0, [(document, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, list):
            depth = max(depth, level)
            pending.extend((child, level + 1) for child in item)
        elif isinstance(item, dict):
            depth = max(depth, level)
            if "__array__" in item:
                found.append(item)
            else:
                pending.extend((child, level + 1) for child in item.values())
    return found, depth


def _arrays(markers: list[dict], frames: list[bytes]) -> list[np.ndarray]:
    """The arrays the markers describe, from their frames, each checked: numbered 0..n-1, a numeric dtype, a shape
    its bytes fill."""
    indices = [marker["__array__"] for marker in markers]
    if not all(type(index) is int for index in indices) or sorted(indices) != list(range(len(markers))):
        raise ProtocolError("array markers are not numbered 0..n-1")
    by_index = {marker["__array__"]: marker for marker in markers}
    arrays = []
    for index, data in enumerate(frames):  # sent in the order of their indices
        dtype = np.dtype(by_index[index]["dtype"])
        if dtype.kind not in _ARRAY_KINDS:
            raise ProtocolError(f"refusing an array of dtype {dtype}")
        arrays.append(np.frombuffer(data, dtype=dtype).reshape(by_index[index]["shape"]).copy())
    return arrays


def _read_length(stream, bound: int, what: str, deadline: float | None) -> int:
    length = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size, deadline))[0]
    if length > bound:
        raise FramingError(f"{what} declares {length} bytes, more than {bound}")
    return length


def _read_exactly(stream, count: int, deadline: float | None) -> bytes:
    """`count` bytes, read as they come (never allocated ahead of them)."""
    data = bytearray()
    while len(data) < count:
        if deadline is not None and isinstance(stream, io.FileIO):
            _wait_readable(stream, deadline, count - len(data))
        chunk = stream.read(min(count - len(data), _CHUNK))
        if not chunk:
            raise EOFError("the stream ended")
        data += chunk
    return bytes(data)


def _wait_readable(stream, deadline: float, missing: int) -> None:
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([stream], [], [], left)[0]:
        raise TimeoutError(f"{missing} bytes did not arrive in time")


_MALFORMED = object()  # a message answered with an error


class _Stop(Exception):
    """Not an error: the server's end, with its exit code."""

    def __init__(self, code: int):
        self.code = code


class Server:
    """Answers one client's requests, holding the objects its calls return. Every malformed message is answered
    with an error and the next one is read in step; one whose length cannot be trusted is answered, then the server
    stops (exit code 1), as nothing after it can be read in step."""

    def __init__(self, incoming, outgoing, message_timeout: float = MESSAGE_TIMEOUT_S):
        self.incoming, self.outgoing, self.message_timeout = incoming, outgoing, message_timeout
        self.held: dict[int, object] = {}
        self.modules: dict[str, object] = {}
        self.next_handle = 1

    def serve(self) -> int:
        self._send({"protocol": PROTOCOL, "version": VERSION, "python": sys.version.split()[0],
                    "executable": sys.executable, "pid": os.getpid()})
        expected = f"the first request must be a hello ({{'op': 'hello', 'version': {VERSION}}})"
        try:
            while True:
                hello = self._next(handle=None, expected=expected)
                if hello is _MALFORMED:
                    continue
                if not isinstance(hello, dict) or hello.get("op") != "hello":
                    self._refuse(f"{expected}; got {_shown(hello)}")
                    continue
                if hello.get("version") != VERSION:
                    self._refuse(f"this simulator server speaks {PROTOCOL} version {VERSION}; the client speaks "
                                 f"version {hello.get('version')}")
                    return 1
                self._send({"ok": True, "result": None})
                break
            while True:
                request = self._next(handle=self._held_object)
                if request is _MALFORMED:
                    continue
                if isinstance(request, dict) and request.get("op") == "shutdown":
                    self._send({"ok": True, "result": None})
                    return 0
                try:
                    result = self._answer(request)
                    self._send({"ok": True, "result": result}, hold=self._hold)
                except Exception as error:  # reported to the client, which raises it there
                    self._send({"ok": False, "type": type(error).__name__, "error": str(error),
                                "traceback": traceback.format_exc()})
        except _Stop as stop:
            return stop.code

    def _next(self, handle, expected: str | None = None):
        """The next message; _MALFORMED after answering a malformed one; _Stop when the server is to stop (its
        client gone, or the stream out of step)."""
        try:
            return read_message(self.incoming, handle=handle, message_timeout=self.message_timeout)
        except EOFError:
            raise _Stop(0) from None
        except TimeoutError:
            self._refuse(f"the rest of a message did not arrive within {self.message_timeout:g} s; the stream cannot "
                         f"be read in step any more, so the server stops")
            raise _Stop(1) from None
        except FramingError as error:
            self._refuse(f"{error}; the stream cannot be read in step any more, so the server stops")
            raise _Stop(1) from None
        except ProtocolError as error:
            self._refuse(f"{error}" + (f" ({expected})" if expected else ""))
            return _MALFORMED

    def _refuse(self, message: str) -> None:
        self._send({"ok": False, "type": "ProtocolError", "error": message})

    def _send(self, message, hold=None) -> None:
        write_message(self.outgoing, message, hold=hold)

    def _answer(self, request):
        if not isinstance(request, dict):
            raise ProtocolError(f"a request is a mapping with an 'op'; got {_shown(request)}")
        op = request.get("op")
        if op != "call":
            raise ProtocolError(f"unknown operation {op!r}")
        if not isinstance(request.get("args", []), list) or not isinstance(request.get("kwargs", {}), dict):
            raise ProtocolError("a call's args must be a list and its kwargs a mapping")
        if request.get("target") is not None:
            function = getattr(self._held_object(request["target"]), request["method"])
        else:
            function = getattr(self._module(request["module"]), request["function"])
        return function(*request.get("args", []), **request.get("kwargs", {}))

    def _module(self, path: str):
        path = str(Path(path).resolve())
        if path not in self.modules:
            name = f"robovlms_simulator_{Path(path).stem}_{len(self.modules)}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None:
                raise FileNotFoundError(f"no Python module at {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            self.modules[path] = module
        return self.modules[path]

    def _hold(self, value) -> dict:
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.held[handle] = value
        return {"__handle__": handle}

    def _held_object(self, handle: int):
        if handle not in self.held:
            raise ProtocolError(f"no object is held under handle {handle}")
        return self.held[handle]


def _shown(value) -> str:
    return f"{type(value).__name__} {str(value)[:80]}"


def probe(modules: list[str]) -> dict:
    """Where each module would be imported from (None: not importable), without importing it; and this interpreter."""
    found = {}
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
            spec = None
        found[name] = None if spec is None else spec.origin or next(iter(spec.submodule_search_locations or []))
    return {"python": sys.version.split()[0], "executable": sys.executable, "numpy": np.__version__,
            "modules": found}


def main() -> int:
    if sys.argv[1:2] == ["--probe"]:
        print(json.dumps(probe(sys.argv[2:])))
        return 0
    message_timeout = float(sys.argv[2]) if sys.argv[1:2] == ["--message-timeout"] else MESSAGE_TIMEOUT_S
    # Messages leave through a copy of stdout; fd 1 itself then goes to stderr, with whatever the simulator prints.
    outgoing = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    faulthandler.enable()  # a crash in native code leaves the Python stack it happened under in that output
    try:
        return Server(sys.stdin.buffer.raw, outgoing, message_timeout).serve()  # unbuffered: reads can time out
    except BrokenPipeError:  # the client went away while being answered
        return 0


if __name__ == "__main__":
    sys.exit(main())
