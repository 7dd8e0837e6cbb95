import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist gives its workers COLUMNS=80; the CLI (whose console is made at import) would then wrap what the tests
# read at 80 columns instead of writing piped output as wide as its lines, as it does for a user
os.environ.pop("COLUMNS", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # on a loaded 2-core machine, more threads make timings swing 30x


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """Scripted demonstrations of two tasks in two scenes, shared by the tests that only read a real store."""
    from robovlms.benchmarks.metaworld import MetaWorldBenchmark
    from robovlms.data.demonstrations import generate_demonstrations

    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown", "door-open"], image_size=64)
    path = tmp_path_factory.mktemp("stores") / "demo"
    return generate_demonstrations(benchmark, "ABC->D", 2, path, scenes="AB", workers=2, progress=False)


SIMULATOR_VARIABLES = ("ROBOVLMS_CALVIN_PYTHON", "ROBOVLMS_CALVIN_CONF", "ROBOVLMS_SIMPLER_PYTHON")


@pytest.fixture(autouse=True)
def simulators_in_this_process(request, monkeypatch):
    """Outside the real-simulator suite, benchmarks run their stand-ins here even where the real simulators'
    interpreters are named in the environment."""
    if request.node.get_closest_marker("real_simulators") is None:
        for variable in SIMULATOR_VARIABLES:
            monkeypatch.delenv(variable, raising=False)
