"""Serving a trained policy: the evaluation's policy server (simulator workers ask one process that holds the
policy) and `robovlms serve` (a websocket per robot), tested on loopback with the real client."""

import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
import websockets
import yaml
from synthetic_store import write_synthetic_store
from websockets.sync.client import connect

from robovlms.benchmark import EpisodeSpec, Observation
from robovlms.policy import load_batched_policy, load_policy, policy_digest
from robovlms.serving.client import PolicyClient
from robovlms.serving.evaluation_server import PolicyServer, ServedPolicy
from robovlms.serving.messages import PolicyServerError, pack, unpack
from robovlms.serving.websocket_server import WebsocketPolicyServer
from robovlms.training import train

MAX_MESSAGE_BYTES = 256 * 1024
SETTLE_S = 60  # how long a test waits for the server to notice a closed connection (no test depends on timing)


def trained_run(store, run_dir, **settings):
    """A tiny policy-head with a flow-matching expert (its noise seeded per episode) and a history of 2, trained a
    few steps."""
    return train({"store": str(store.path), "run_dir": str(run_dir), "chunk": 2, "history": 2, "frame_stride": 1,
                  "batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "log_every": 1, "cameras": ["rgb_static"],
                  "backbone": {"options": {"hidden_size": 32, "layers": 1}},
                  "formulation": {"name": "policy-head", "options": {"objective": "flow-matching",
                                                                     "denoising_steps": 2}}, **settings})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


@pytest.fixture(scope="module")
def run_dir(store, tmp_path_factory):
    return trained_run(store, tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture
def server(run_dir):
    served = WebsocketPolicyServer(load_batched_policy(run_dir, device="cpu"), image_size=64, state_dim=4,
                                   host="127.0.0.1", port=0, max_message_bytes=MAX_MESSAGE_BYTES)
    thread = threading.Thread(target=served.serve_forever, daemon=True)
    thread.start()
    assert served.wait_until_serving(SETTLE_S)
    yield served
    served.stop()
    thread.join()


def until(condition) -> bool:
    deadline = time.monotonic() + SETTLE_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def frame(store, t=0):
    """The images and state of a recorded frame."""
    episode = store.episode(0)
    return {"rgb_static": episode.images["rgb_static"][t]}, episode.state[t]


def observation_message(store, **extra):
    images, state = frame(store)
    return {"images": images, "state": state, "instruction": "open the door", **extra}


# ---- robovlms serve ----------------------------------------------------------------------------------------------


def test_served_actions_equal_the_in_process_policys_for_a_recorded_episode(store, run_dir, server):
    episode = store.episode(1)
    local = load_policy(run_dir)
    local.reset(EpisodeSpec(episode.task, episode.scene, episode.instruction, seed=3))
    with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
        assert client.metadata["cameras"] == ["rgb_static"] and client.metadata["chunk"] == 2
        client.reset(episode.instruction, seed=3)
        for t in range(len(episode)):
            images, state = {"rgb_static": episode.images["rgb_static"][t]}, episode.state[t]
            expected = local.step(Observation(images=images, state=state, instruction=episode.instruction))
            reply = client.infer(images, state)
            assert np.array_equal(reply["execute"], np.atleast_2d(expected)), f"step {t}"
            assert reply["actions"].shape == (2, 4) and np.array_equal(reply["actions"][0], expected)


def test_two_robots_served_together_each_get_their_own_episode(store, run_dir, server):
    frames = [store.episode(e) for e in (0, 1)]
    expected = []
    for episode in frames:
        local = load_policy(run_dir)
        local.reset(EpisodeSpec(episode.task, episode.scene, episode.instruction, seed=5))
        expected.append([local.step(Observation(images={"rgb_static": episode.images["rgb_static"][t]},
                                                state=episode.state[t], instruction=episode.instruction))
                         for t in range(4)])
    clients = [PolicyClient(f"ws://127.0.0.1:{server.port}") for _ in frames]
    for client, episode in zip(clients, frames):
        client.reset(episode.instruction, seed=5)
    for t in range(4):  # the robots' steps alternate: each connection keeps its own history
        for e, (client, episode) in enumerate(zip(clients, frames)):
            reply = client.infer({"rgb_static": episode.images["rgb_static"][t]}, episode.state[t])
            assert np.array_equal(reply["execute"][0], expected[e][t])
    for client in clients:
        client.close()


@pytest.mark.parametrize("message, error", [
    (b"\xc1 not msgpack", "not a msgpack message"),
    ("a text frame", "text frames are not observations"),
    (pack([1, 2, 3]), "an observation is a map"),
    (pack({"images": {}, "state": [0.0] * 4, "instruction": "go"}), "cameras \\['rgb_static'\\]"),
    (pack({"images": {"rgb_static": np.zeros((64, 64, 3), np.float32)}, "state": [0.0] * 4, "instruction": "go"}),
     "must be uint8"),
    (pack({"images": {"rgb_static": np.zeros((64, 64, 3), np.uint8)}, "state": [0.0] * 3, "instruction": "go"}),
     "a vector of 4 finite proprio values"),
    (pack({"images": {"rgb_static": np.zeros((64, 64, 3), np.uint8)}, "state": ["up", "0", "0", "0"],
           "instruction": "go"}), "a vector of 4 finite proprio values; got \\['up'"),
    (pack({"images": {"rgb_static": np.zeros((64, 64, 3), np.uint8)}, "state": [[0.0, 0.0], [0.0]],
           "instruction": "go"}), "a vector of 4 finite proprio values"),
    (pack({"images": {"rgb_static": np.zeros((64, 64, 3), np.uint8)}, "state": [float("nan")] * 4,
           "instruction": "go"}), "a vector of 4 finite proprio values"),
    (pack({"images": {"rgb_static": np.zeros((0, 0, 3), np.uint8)}, "state": [0.0] * 4, "instruction": "go"}),
     "must be uint8 \\(height, width, 3\\), not empty; got uint8 \\(0, 0, 3\\)"),
    (pack({"images": {"rgb_static": np.zeros((64, 64, 3), np.uint8)}, "state": [0.0] * 4, "instruction": "go",
           "speed": 2}), "unknown key\\(s\\) speed"),
])
def test_a_malformed_message_gets_an_error_reply_and_the_connection_serves_on(store, server, message, error):
    with connect(f"ws://127.0.0.1:{server.port}") as connection:
        unpack(connection.recv())  # the metadata
        connection.send(message)
        reply = connection.recv()
        assert isinstance(reply, str) and reply.startswith("error: ")
        assert re.search(error, reply), reply
        connection.send(pack(observation_message(store, reset=True)))
        assert unpack(connection.recv())["execute"].shape == (1, 4)


def test_an_oversized_message_closes_its_connection_only_and_the_server_serves_on(store, server):
    with PolicyClient(f"ws://127.0.0.1:{server.port}") as bystander, \
            connect(f"ws://127.0.0.1:{server.port}") as connection:
        bystander.reset("open the door")
        bystander.infer(*frame(store))
        unpack(connection.recv())
        connection.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            connection.recv()
        assert closed.value.rcvd.code == 1009  # message too big
        assert bystander.infer(*frame(store, 1))["execute"].shape == (1, 4)
    with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
        client.reset("open the door")
        huge = {"rgb_static": np.zeros((400, 400, 3), np.uint8)}
        with pytest.raises(PolicyServerError, match=f"at most {MAX_MESSAGE_BYTES} bytes"):
            client.infer(huge, np.zeros(4))


def test_a_client_that_disconnects_mid_episode_frees_its_episode(store, server):
    client = PolicyClient(f"ws://127.0.0.1:{server.port}")
    client.reset("open the door")
    client.infer(*frame(store))
    assert server.episodes == 1
    client.close()
    assert until(lambda: server.episodes == 0)


def test_images_of_another_size_are_resized_to_the_runs(store, server):
    with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
        client.reset("open the door")
        reply = client.infer({"rgb_static": np.zeros((120, 160, 3), np.uint8)}, np.zeros(4))
        assert reply["execute"].shape == (1, 4) and reply["server_timing"]["infer_ms"] > 0


def test_robovlms_serve_serves_a_run_on_loopback_and_answers_its_health_check(store, run_dir):
    process = subprocess.Popen([sys.executable, "-m", "robovlms.cli", "serve", str(run_dir), "--port", "0", "--host",
                                "127.0.0.1", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "ws://" in line:
                break
        address = "".join(lines).split("ws://")[1].split()[0]
        assert "store" in "".join(lines)  # the image size was read from the run's store
        with urllib.request.urlopen(f"http://{address}/healthz") as health:
            assert health.status == 200
        with PolicyClient(f"ws://{address}") as client:
            assert client.metadata["policy"] == policy_digest(run_dir)
            client.reset("open the door", seed=1)
            assert client.infer(*frame(store))["actions"].shape == (2, 4)
    finally:
        process.terminate()
        process.wait()


def test_robovlms_serve_refuses_a_run_directory_without_a_checkpoint(tmp_path, run_dir):
    untrained = tmp_path / "untrained"
    shutil.copytree(run_dir, untrained)
    shutil.rmtree(untrained / "checkpoints")  # as if training died before its first checkpoint
    result = subprocess.run([sys.executable, "-m", "robovlms.cli", "serve", str(untrained)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2 and "holds no checkpoint last.ckpt" in result.stdout


# ---- the evaluation's policy server --------------------------------------------------------------------------


class FailingPolicy:
    cameras = ("rgb_static",)

    def new_episode(self):
        return object()

    def reset(self, episode, instruction, seed):
        pass

    def step(self, steps):
        raise ValueError("the model is on fire")


def test_a_served_simulator_worker_needs_neither_torch_nor_the_model():
    """What a spawned worker of a served evaluation imports: the command line it was started from (spawn imports the
    main module again), the rollout loop, a benchmark and the server's client; torch alone would cost each worker
    about 180 MiB."""
    imports = ("import sys, robovlms.cli, robovlms.rollout, robovlms.serving.evaluation_server, "
               "robovlms.benchmarks.metaworld; print(sorted(m for m in ('torch', 'transformers', 'lightning') "
               "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_an_error_in_the_served_policy_reaches_the_worker_with_the_servers_traceback():
    with PolicyServer(FailingPolicy()) as server:
        worker = server.client_factory()()
        worker.reset(EpisodeSpec("t", "A", "go", 0))
        with pytest.raises(PolicyServerError, match="(?s)the policy server failed.*ValueError: the model is on fire"):
            worker.step(Observation(images={"rgb_static": np.zeros((8, 8, 3), np.uint8)}, state=np.zeros(4),
                                    instruction="go"))


def test_a_worker_that_goes_away_takes_its_episode_with_it(run_dir, store):
    with PolicyServer(load_batched_policy(run_dir, device="cpu")) as server:
        worker = server.client_factory()()
        assert isinstance(worker, ServedPolicy)
        worker.reset(EpisodeSpec("t", "A", "open the door", 0))
        images, state = frame(store)
        worker.step(Observation(images=images, state=state, instruction="open the door"))
        assert until(lambda: server.open_episodes == 1)
        worker._connection.close()
        assert until(lambda: server.open_episodes == 0)


@pytest.mark.slow
def test_episodes_act_the_same_on_one_worker_and_on_three_served_by_one_policy(demo_store, tmp_path):
    from robovlms.benchmarks.metaworld import MetaWorldBenchmark
    from robovlms.rollout import run_episodes

    run = trained_run(demo_store, tmp_path / "run")
    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown", "door-open"], image_size=64, max_steps=10,
                                   cameras=("rgb_static",))
    specs = benchmark.evaluation_episodes("ABC->D", 2)

    def trajectories(workers):
        rolled = run_episodes(benchmark, load_batched_policy(run, device="cpu"), specs, workers=workers,
                              record_trajectories=True, progress=False)
        return [(record.steps, np.stack(trajectory.actions)) for _, record, trajectory in rolled]

    alone, served = trajectories(1), trajectories(3)
    assert len(served) == len(specs) == 4
    for (steps, actions), (served_steps, served_actions) in zip(alone, served):
        assert steps == served_steps and np.array_equal(actions, served_actions)


@pytest.mark.slow
@pytest.mark.parametrize("policy_server", [True, False])
def test_a_sweeps_evaluation_is_served_by_default_and_times_the_batch_it_serves(tmp_path, demo_store, monkeypatch,
                                                                                 policy_server):
    from robovlms.results import read_cell_results
    from robovlms.serving import evaluation_server
    from robovlms.sweep import run_sweep

    servers = []
    enter = evaluation_server.PolicyServer.__enter__
    monkeypatch.setattr(evaluation_server.PolicyServer, "__enter__", lambda self: servers.append(self) or enter(self))
    evaluation = {"episodes_per_task": 2, "workers": 2, "latency_steps": 2, "device": "cpu"}
    if not policy_server:
        evaluation["policy_server"] = False
    sweep = {"name": "served", "run_dir": str(tmp_path / "run"),
             "benchmark": {"name": "metaworld", "split": "ABC->D",
                           "options": {"tasks": ["button-press-topdown"], "max_steps": 10}},
             "store": {"path": str(demo_store.path)},
             "train": {"max_steps": 2, "batch_size": 4, "chunk": 2, "checkpoint_every": 2, "log_every": 1,
                       "cameras": ["rgb_static"], "backbone": {"options": {"hidden_size": 32, "layers": 1}}},
             "baselines": [], "evaluation": evaluation}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert run_sweep(tmp_path / "sweep.yaml").done == 1
    [result] = read_cell_results(tmp_path / "run")
    assert result.episodes == 2 and result.step_latency_ms > 0 and result.latency_device == "cpu"
    if policy_server:
        assert len(servers) == 1 and servers[0].steps > 0 and result.latency_batch == 2
    else:
        assert servers == [] and result.latency_batch == 1


def test_an_unknown_evaluation_device_is_refused_naming_the_valid_ones():
    from robovlms.errors import ConfigError
    from robovlms.sweep import load_sweep

    with pytest.raises(ConfigError, match="evaluation.device: .*'gpu' is none of auto, cpu, cuda, cuda:N"):
        load_sweep({"name": "x", "run_dir": "runs/x", "store": {"path": "data/x"}, "evaluation": {"device": "gpu"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_gpu_this_machine_lacks_is_refused_before_the_cell_trains(tmp_path, demo_store, monkeypatch):
    from robovlms.errors import ConfigError
    from robovlms.sweep import expand_cells, load_sweep
    from robovlms.sweep.one_cell import run_cell

    trained = []
    monkeypatch.setattr("robovlms.training.train", lambda *args, **kwargs: trained.append(args))
    sweep = load_sweep({"name": "gpu", "run_dir": str(tmp_path / "run"), "store": {"path": str(demo_store.path)},
                        "benchmark": {"options": {"tasks": ["button-press-topdown"]}}, "baselines": [],
                        "train": {"max_steps": 1, "cameras": ["rgb_static"]},
                        "evaluation": {"device": "cuda"}})
    with pytest.raises(ConfigError, match="device 'cuda': this torch .* sees no CUDA GPU here; use cpu or auto"):
        run_cell(sweep, expand_cells(sweep)[0], tmp_path / "run")
    assert trained == []
