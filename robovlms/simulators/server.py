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
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import struct
import sys
import traceback
from pathlib import Path

import numpy as np

PROTOCOL = "robovlms-simulator"
VERSION = 1
_LENGTH = struct.Struct("!Q")
_ARRAY_KINDS = "biufc"  # booleans, integers, floats, complex numbers: nothing that needs unpickling


class ProtocolError(Exception):
    """A message that does not follow the protocol."""


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
        return {_hashable(decode(k, arrays, handle)): decode(v, arrays, handle) for k, v in value["__dict__"]}
    if "__tuple__" in value:
        return tuple(decode(item, arrays, handle) for item in value["__tuple__"])
    if "__set__" in value:
        return {_hashable(decode(item, arrays, handle)) for item in value["__set__"]}
    if "__array__" in value:
        return arrays[value["__array__"]]
    if "__handle__" in value and handle is not None:
        return handle(value["__handle__"])
    raise ProtocolError(f"unknown marker {sorted(value)}")


def _hashable(value):
    return tuple(_hashable(item) for item in value) if isinstance(value, list) else value


def write_message(stream, message, hold=None) -> None:
    arrays: list[np.ndarray] = []
    document = json.dumps(encode(message, arrays, hold)).encode()
    parts = [_LENGTH.pack(len(document)), document]
    for array in arrays:
        parts += [_LENGTH.pack(array.nbytes), array.tobytes()]
    stream.write(b"".join(parts))
    stream.flush()


def read_message(stream, handle=None):
    """The next message, or EOFError when the stream has ended."""
    document = json.loads(_read_exactly(stream, _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))[0]))
    arrays = [_read_array(stream, marker) for marker in _array_markers(document)]
    return decode(document, arrays, handle)


def _array_markers(document) -> list[dict]:
    """The array markers of a document in index order."""
    found, pending = [], [document]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            if "__array__" in item:
                found.append(item)
            else:
                pending.extend(item.values())
    found.sort(key=lambda marker: marker["__array__"])
    if [marker["__array__"] for marker in found] != list(range(len(found))):
        raise ProtocolError("array markers are not numbered 0..n-1")
    return found


def _read_array(stream, marker: dict) -> np.ndarray:
    dtype = np.dtype(marker["dtype"])
    if dtype.kind not in _ARRAY_KINDS:
        raise ProtocolError(f"refusing an array of dtype {dtype}")
    data = _read_exactly(stream, _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))[0])
    return np.frombuffer(data, dtype=dtype).reshape(marker["shape"]).copy()


def _read_exactly(stream, count: int) -> bytes:
    data = stream.read(count)
    if len(data) < count:
        raise EOFError("the stream ended")
    return data


class Server:
    """Answers one client's requests, holding the objects its calls return."""

    def __init__(self, incoming, outgoing):
        self.incoming, self.outgoing = incoming, outgoing
        self.held: dict[int, object] = {}
        self.modules: dict[str, object] = {}
        self.next_handle = 1

    def serve(self) -> int:
        write_message(self.outgoing, {"protocol": PROTOCOL, "version": VERSION, "python": sys.version.split()[0],
                                      "executable": sys.executable, "pid": os.getpid()})
        try:
            hello = read_message(self.incoming)
        except EOFError:
            return 0
        if hello.get("op") != "hello" or hello.get("version") != VERSION:
            write_message(self.outgoing, {"ok": False, "type": "ProtocolError",
                                          "error": f"this simulator server speaks {PROTOCOL} version {VERSION}; the "
                                                   f"client speaks version {hello.get('version')}"})
            return 1
        write_message(self.outgoing, {"ok": True, "result": None})
        while True:
            try:
                request = read_message(self.incoming, handle=self._held_object)
            except EOFError:
                return 0
            except (ProtocolError, KeyError, ValueError) as error:
                write_message(self.outgoing, {"ok": False, "type": "ProtocolError", "error": str(error)})
                continue
            if request.get("op") == "shutdown":
                write_message(self.outgoing, {"ok": True, "result": None})
                return 0
            try:
                result = self._answer(request)
                write_message(self.outgoing, {"ok": True, "result": result}, hold=self._hold)
            except Exception as error:  # reported to the client, which raises it there
                write_message(self.outgoing, {"ok": False, "type": type(error).__name__, "error": str(error),
                                              "traceback": traceback.format_exc()})

    def _answer(self, request: dict):
        op = request.get("op")
        if op != "call":
            raise ProtocolError(f"unknown operation {op!r}")
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
    # Messages leave through a copy of stdout; fd 1 itself then goes to stderr, with whatever the simulator prints.
    outgoing = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    faulthandler.enable()  # a crash in native code leaves the Python stack it happened under in that output
    return Server(sys.stdin.buffer, outgoing).serve()


if __name__ == "__main__":
    sys.exit(main())
