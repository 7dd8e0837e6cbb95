"""The simulator protocol (robovlms.simulators.server, robovlms.benchmarks.remote) with a stand-in simulator run by a
separate interpreter in which neither robovlms nor torch can be imported: handshake, calls and held objects, data
round trips, versions, a crashing simulator, errors raised there, and shutdown."""

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robovlms.benchmarks.remote import SERVER_FILE, SimulatorProcess, probe
from robovlms.errors import ConfigError, SimulatorDied, SimulatorProcessError
from robovlms.simulators.server import PROTOCOL, VERSION, encode, read_message, write_message

STAND_IN = Path(__file__).with_name("calvin_stand_in.py")
PLAY_TABLE_MODULE = SERVER_FILE.with_name("calvin_play_table.py")


@pytest.fixture
def without_robovlms(tmp_path):
    """Environment variables under which the server's interpreter cannot import robovlms or torch."""
    for package in ("robovlms", "torch"):
        (tmp_path / "blocked" / package).mkdir(parents=True)
        (tmp_path / "blocked" / package / "__init__.py").write_text(
            f"raise ImportError('{package} is not importable next to the simulator')")
    return {"PYTHONPATH": str(tmp_path / "blocked")}


@pytest.fixture
def simulator(without_robovlms):
    process = SimulatorProcess(sys.executable, environment=without_robovlms)
    yield process
    process.close()
    process.log_path.unlink(missing_ok=True)  # kept by a process that died


def test_the_handshake_names_the_protocol_version_and_the_servers_interpreter(simulator):
    assert simulator.server_info["protocol"] == PROTOCOL and simulator.server_info["version"] == VERSION
    assert simulator.server_info["pid"] == simulator.pid != os.getpid()
    assert simulator.server_info["executable"] == sys.executable


def test_the_server_runs_without_robovlms_or_torch(simulator):
    assert not simulator.call(STAND_IN, "importable", "robovlms")
    assert not simulator.call(STAND_IN, "importable", "torch")
    assert simulator.call(STAND_IN, "importable", "numpy")


def test_an_object_built_there_is_driven_through_its_methods(simulator):
    table = simulator.call(STAND_IN, "StandInPlayTable")
    obs = table.reset(robot_obs=np.ones(15), scene_obs=np.zeros(24))
    obs, _, _, info = table.step([1.0, 0, 0, 0, 0, 0, -1])
    assert obs["robot_obs"][0] == pytest.approx(0.02) and obs["robot_obs"][14] == -1
    assert info == {"robot_info": {"tcp_pos": (0.02, 0, 0)}, "scene_info": {"contacts": ((1, 2), (3, 4))}}


def test_arrays_keep_their_dtype_and_shape_and_sets_and_tuples_survive(simulator):
    table = simulator.call(STAND_IN, "StandInPlayTable")
    obs = table.reset(robot_obs=np.ones(15), scene_obs=np.zeros(24))
    assert obs["rgb_obs"]["rgb_static"].dtype == np.uint8 and obs["rgb_obs"]["rgb_static"].shape == (200, 200, 3)
    assert obs["rgb_obs"]["rgb_gripper"].dtype == np.int64
    oracle = simulator.call(STAND_IN, "StandInOracle")
    start, end = {"robot_info": {"tcp_pos": (0.0,)}}, {"robot_info": {"tcp_pos": (0.03,)}}
    assert oracle.get_task_info_for_set(start, end, {"open_drawer", "turn_off_lightbulb"}) == {"open_drawer"}


def test_held_objects_can_be_passed_back_as_arguments(simulator):
    table = simulator.call(PLAY_TABLE_MODULE, "PlayTable", simulator.call(STAND_IN, "StandInPlayTable"),
                           simulator.call(STAND_IN, "StandInOracle"))
    robot_obs = np.ones(15)
    table.reset(robot_obs, np.zeros(24))
    table.begin_subtask("open_drawer")
    _, solved = table.step(np.array([1.0, 0, 0, 0, 0, 0, 1.0]))
    assert solved is True


def test_an_exception_raised_there_is_raised_here_with_the_simulators_traceback(simulator):
    table = simulator.call(STAND_IN, "StandInPlayTable")
    table.close()
    with pytest.raises(RuntimeError, match="Not connected to physics server") as error:
        table.close()
    assert "in the simulator process" in "".join(error.value.__notes__)
    with pytest.raises(FileNotFoundError):
        simulator.call(STAND_IN.with_name("no_such_module.py"), "build")


def test_a_server_of_another_protocol_version_is_refused(tmp_path):
    other = tmp_path / "server.py"
    other.write_text(SERVER_FILE.read_text().replace(f"VERSION = {VERSION}\n", "VERSION = 99\n"))
    with pytest.raises(SimulatorProcessError, match=f"speaks {PROTOCOL} version 99; this robovlms speaks "
                                                    f"{PROTOCOL} version {VERSION}"):
        SimulatorProcess(sys.executable, server=other)


def test_the_server_refuses_a_client_of_another_version():
    import subprocess

    server = subprocess.Popen([sys.executable, str(SERVER_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    assert read_message(server.stdout)["version"] == VERSION
    write_message(server.stdin, {"op": "hello", "version": VERSION + 1})
    answer = read_message(server.stdout)
    assert not answer["ok"] and f"version {VERSION + 1}" in answer["error"]
    assert server.wait(timeout=60) == 1


def test_a_simulator_that_dies_mid_call_is_reported_with_its_exit_code_and_last_output(simulator):
    with pytest.raises(SimulatorProcessError, match="exited with code 7 during calvin_stand_in.py:exit_abruptly") as \
            error:
        simulator.call(STAND_IN, "exit_abruptly", 7)
    assert "renderer: lost the device" in str(error.value)
    with pytest.raises(SimulatorProcessError, match="exited with code 7"):  # and so does every later call
        simulator.call(STAND_IN, "importable", "numpy")


def test_a_dead_simulators_error_quotes_what_it_printed_during_the_call_it_died_in(simulator):
    simulator.call(STAND_IN, "say", "pybullet build time: Jan 29 2025")
    with pytest.raises(SimulatorDied, match="killed by SIGKILL \\(sent from outside the process: the kernel's "
                                            "out-of-memory killer") as error:
        simulator.call(STAND_IN, "kill_itself", "b3Warning: out of memory")
    assert "b3Warning: out of memory" in str(error.value) and "pybullet build time" not in str(error.value)


def test_the_log_a_dead_simulators_error_names_outlives_closing_it(simulator):
    with pytest.raises(SimulatorDied) as error:
        simulator.call(STAND_IN, "exit_abruptly", 7)
    simulator.close()
    assert f"(its whole output: {simulator.log_path})" in str(error.value) and simulator.log_path.exists()


def test_close_stops_the_server_and_may_be_called_again(without_robovlms):
    process = SimulatorProcess(sys.executable, environment=without_robovlms)
    process.close()
    assert process._process.returncode == 0 and not process.log_path.exists()
    process.close()


def test_a_missing_interpreter_is_a_config_error():
    with pytest.raises(ConfigError, match="no Python interpreter at /no/such/python"):
        SimulatorProcess("/no/such/python")


def test_probe_says_which_modules_an_interpreter_can_import(without_robovlms):
    found = probe(sys.executable, ["numpy", "no_such_simulator"])
    assert found["modules"]["numpy"] and found["modules"]["no_such_simulator"] is None


def test_messages_refuse_arrays_that_would_need_unpickling():
    stream = io.BytesIO()
    write_message(stream, {"image": np.zeros((2, 2), np.uint8), "names": np.array(["a", "b"], dtype=object)})
    stream.seek(0)
    message = read_message(stream)
    assert message["image"].dtype == np.uint8 and message["names"] == ["a", "b"]  # object arrays travel as lists
    with pytest.raises(TypeError, match="cannot send a object"):
        write_message(io.BytesIO(), {"what": object()})


# ---- malformed messages: an error reply each, and the server stays in sync, or says why it cannot and stops -----

SAFETY_S = 600  # a safety net against a hang, never a timing


def frame(data: bytes) -> bytes:
    return struct.pack("!Q", len(data)) + data


def document(value) -> bytes:
    arrays = []
    return json.dumps(encode(value, arrays)).encode()


def start_server(*arguments):
    server = subprocess.Popen([sys.executable, str(SERVER_FILE), *arguments], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert read_message(server.stdout, timeout=SAFETY_S)["protocol"] == PROTOCOL
    return server


def answer(server):
    return read_message(server.stdout, timeout=SAFETY_S)


def greeted_server(*arguments):
    server = start_server(*arguments)
    write_message(server.stdin, {"op": "hello", "version": VERSION})
    assert answer(server) == {"ok": True, "result": None}
    return server


def assert_in_sync(server):
    write_message(server.stdin, {"op": "call", "module": str(STAND_IN), "function": "importable", "args": ["numpy"]})
    assert answer(server) == {"ok": True, "result": True}


def assert_stopped_cleanly(server, code):
    server.stdin.close()
    assert server.wait(timeout=SAFETY_S) == code
    assert "Traceback" not in server.stderr.read().decode()


def array_marker(dtype, shape, index=0):
    return json.dumps({"__dict__": [["op", "call"], ["module", str(STAND_IN)], ["function", "importable"],
                                    ["args", [{"__array__": index, "dtype": dtype, "shape": shape}]]]}).encode()


MALFORMED_REQUESTS = {
    "a JSON list": [b"[1, 2]"],
    "a JSON number": [b"7"],
    "a JSON string": [b'"call"'],
    "bytes that are not JSON": [b"\xff{"],
    "200,000-deep nesting": [b"[" * 200_000 + b"]" * 200_000],
    "nesting beyond the bound": [b"[" * 300 + b"]" * 300],
    "an unknown marker": [b'{"__code__": "import os"}'],
    "an unhashable key": [json.dumps({"__dict__": [["op", "call"], [{"__dict__": []}, 1]]}).encode()],
    "an array of a dtype that does not exist": [array_marker("<zz", [1]), b"\0" * 4],
    "an array of object dtype": [array_marker("|O", [1]), b"\0" * 8],
    "array markers not numbered from 0": [array_marker("<f4", [1], index=1), b"\0" * 4],
    "array bytes that do not fill its shape": [array_marker("<f4", [3]), b"\0" * 5],
    "arguments that are not a list": [document({"op": "call", "module": str(STAND_IN), "function": "importable",
                                                "args": 5})],
    "a function name that is not text": [document({"op": "call", "module": str(STAND_IN), "function": 5})],
    "a handle that holds nothing": [document({"op": "call", "target": 999, "method": "step"})],
}


@pytest.mark.parametrize("parts", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_a_malformed_request_gets_an_error_reply_and_the_server_stays_in_sync(parts):
    server = greeted_server()
    server.stdin.write(b"".join(frame(part) for part in parts))
    reply = answer(server)
    assert reply["ok"] is False and reply["error"]
    assert_in_sync(server)
    assert_stopped_cleanly(server, 0)


@pytest.mark.parametrize("hello", [b"[1, 2]", b"7", b"\xff"], ids=["a JSON list", "a JSON number", "not JSON"])
def test_a_malformed_hello_gets_an_error_reply_and_a_proper_one_is_still_accepted(hello):
    server = start_server()
    server.stdin.write(frame(hello))
    reply = answer(server)
    assert reply["ok"] is False and "hello" in reply["error"]
    write_message(server.stdin, {"op": "hello", "version": VERSION})
    assert answer(server) == {"ok": True, "result": None}
    assert_in_sync(server)
    assert_stopped_cleanly(server, 0)


@pytest.mark.parametrize("raw, error", [
    (struct.pack("!Q", 2 ** 62), "declares 4611686018427387904 bytes"),
    (frame(array_marker("<f4", [1])) + struct.pack("!Q", 2 ** 40), "declares 1099511627776 bytes"),
    (struct.pack("!Q", 100) + b"{", "did not arrive within 1 s"),
], ids=["a 2^62 length prefix", "an array larger than the bound", "a length prefix without its body"])
def test_a_message_whose_length_cannot_be_trusted_is_answered_and_the_server_stops(raw, error):
    server = greeted_server("--message-timeout", "1")
    server.stdin.write(raw)
    reply = answer(server)
    assert reply["ok"] is False and error in reply["error"] and "stops" in reply["error"]
    assert_stopped_cleanly(server, 1)


@pytest.fixture
def never_answering(tmp_path):
    module = tmp_path / "slow_renderer.py"
    module.write_text("import time\n\ndef render():\n    time.sleep(3600)\n")
    return module


def test_a_call_that_is_not_answered_in_time_stops_the_simulator_as_dead_saying_so(without_robovlms,
                                                                                    never_answering):
    process = SimulatorProcess(sys.executable, environment=without_robovlms)  # started without a deadline
    process.timeout = 1  # render() sleeps an hour: this fires however loaded the machine is
    with pytest.raises(SimulatorDied, match=r"did not answer slow_renderer.py:render\(\) within 1 s; it was "
                                            r"stopped.*ROBOVLMS_SIMULATOR_TIMEOUT_S"):
        process.call(never_answering, "render")
    assert process._process.poll() is not None and process.dead  # a sweep runs the cell again
    with pytest.raises(SimulatorDied, match="did not answer"):
        process.call(STAND_IN, "importable", "numpy")
    process.close()


def test_the_call_timeout_is_read_from_the_environment(monkeypatch, without_robovlms):
    monkeypatch.setenv("ROBOVLMS_SIMULATOR_TIMEOUT_S", "1234")
    process = SimulatorProcess(sys.executable, environment=without_robovlms)
    assert process.timeout == 1234
    process.close()
    monkeypatch.setenv("ROBOVLMS_SIMULATOR_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="ROBOVLMS_SIMULATOR_TIMEOUT_S must be a number of seconds"):
        SimulatorProcess(sys.executable, environment=without_robovlms)
