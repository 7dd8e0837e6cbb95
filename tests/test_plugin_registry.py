"""Plugins from other packages: a broken one is one clear line naming it and its package, never a traceback,
listings show every plugin that loads beside one row per plugin that does not, and a list of valid names holds
only plugins that load."""

import pytest
from plugin_distribution import install_plugin
from synthetic_store import write_synthetic_store
from typer.testing import CliRunner

from robovlms import cli
from robovlms.backbone import create_backbone, list_backbones, load_backbone
from robovlms.benchmark import create_benchmark
from robovlms.errors import PluginError, UnknownNameError
from robovlms.formulation import create_formulation
from robovlms.registry import BACKBONES, BENCHMARKS, FORMULATIONS
from robovlms.results import software_versions
from robovlms.sweep import expand_cells, load_sweep

GOOD_BACKBONE = '''
from robovlms.backbones.gpt_scratch import GPTScratchBackbone


class RenamedGPT(GPTScratchBackbone):
    """A renamed gpt-scratch, from another package."""

    name = "renamed-gpt"
'''

MISSING_METHOD_BACKBONE = '''
from robovlms.backbone import TransformersBackbone


class HalfDone(TransformersBackbone):
    name = "half-done"
    description = "forgot hidden_size and contextualise"
    lora_target_modules = "q_proj"

    @classmethod
    def tiny(cls, **options):
        raise NotImplementedError

    def image_block(self):
        return [], 4, []

    def vision_modules(self):
        return []

    def language_modules(self):
        return []
'''

NO_LORA_TARGETS_BACKBONE = MISSING_METHOD_BACKBONE.replace('''    lora_target_modules = "q_proj"
''', "") + '''
    hidden_size = 64

    def contextualise(self, context, images, suffix_embeds):
        raise NotImplementedError
'''

CRASHING_BACKBONE = '''
from robovlms.backbones.gpt_scratch import GPTScratchBackbone


class Crashing(GPTScratchBackbone):
    name = "crashing"
    description = "raises while building"

    @classmethod
    def tiny(cls, **options):
        return {}["hidden_size"]
'''


NO_LOSS_FORMULATION = '''
from robovlms.formulation import Formulation


class NoLoss(Formulation):
    name = "no-loss"
    description = "forgot loss and predict"
'''


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables wide enough that no cell is cut or wrapped."""
    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(width=400))


def install_backbone(tmp_path, monkeypatch, source, name, attribute):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", source,
                   {"robovlms.backbones": {name: f"broken_plugin:{attribute}"}})


def test_a_plugin_that_fails_to_import_names_its_entry_point_package_and_error(tmp_path, monkeypatch):
    install_backbone(tmp_path, monkeypatch, "import robovlms_no_such_module\n", "broken", "Broken")
    with pytest.raises(PluginError, match=r"^backbone plugin 'broken' \(broken_plugin:Broken, from robovlms-broken "
                                          r"0\.2\.0\) cannot be loaded: ModuleNotFoundError: .*robovlms_no_such_module"):
        create_backbone("broken")


def test_an_entry_point_naming_a_missing_class_is_a_plugin_error(tmp_path, monkeypatch):
    install_backbone(tmp_path, monkeypatch, GOOD_BACKBONE, "renamed-gpt", "RenamedGTP")
    with pytest.raises(PluginError, match=r"\(broken_plugin:RenamedGTP, from robovlms-broken 0\.2\.0\) cannot be "
                                          r"loaded: AttributeError"):
        create_backbone("renamed-gpt")


def test_a_plugin_missing_abstract_methods_names_them_when_it_loads(tmp_path, monkeypatch):
    install_backbone(tmp_path, monkeypatch, MISSING_METHOD_BACKBONE, "half-done", "HalfDone")
    with pytest.raises(PluginError, match="'half-done' .* does not implement contextualise, hidden_size"):
        create_backbone("half-done")


def test_a_plugin_without_lora_target_modules_is_refused_when_it_loads_not_when_lora_is_used(tmp_path, monkeypatch):
    install_backbone(tmp_path, monkeypatch, NO_LORA_TARGETS_BACKBONE, "half-done", "HalfDone")
    with pytest.raises(PluginError, match="'half-done' .* does not set the class attribute.* lora_target_modules"):
        create_backbone("half-done")


def test_an_error_inside_a_plugins_constructor_names_the_plugin_and_its_package(tmp_path, monkeypatch):
    install_backbone(tmp_path, monkeypatch, CRASHING_BACKBONE, "crashing", "Crashing")
    with pytest.raises(PluginError, match=r"^backbone plugin 'crashing' \(broken_plugin:Crashing, from "
                                          r"robovlms-broken 0\.2\.0\) failed while being built: KeyError"):
        create_backbone("crashing")


def test_an_error_inside_from_saved_names_the_plugin(tmp_path, monkeypatch):
    install_backbone(tmp_path, monkeypatch, GOOD_BACKBONE + '''
    @classmethod
    def from_saved(cls, directory, size, origin):
        raise RuntimeError("config.json has no hidden_size")
''', "renamed-gpt", "RenamedGPT")
    create_backbone("renamed-gpt").save(tmp_path / "saved")
    with pytest.raises(PluginError, match="'renamed-gpt' .* failed while being built: RuntimeError: config.json"):
        load_backbone(tmp_path / "saved")


def test_a_bad_option_stays_a_config_error_not_a_plugin_error():
    with pytest.raises(Exception) as raised:
        create_backbone("gpt-scratch", hidden_dim=3)
    assert type(raised.value).__name__ == "ConfigError"


def test_listing_shows_every_backbone_that_loads_and_a_row_naming_each_failure(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", GOOD_BACKBONE,
                   {"robovlms.backbones": {"renamed-gpt": "broken_plugin:RenamedGPT",
                                           "misspelt": "broken_plugin:RenamedGTP"}})
    rows = {row["name"]: row for row in list_backbones()}
    assert {"kosmos2", "paligemma", "flamingo", "gpt-scratch", "renamed-gpt"} <= set(rows)
    assert rows["renamed-gpt"]["description"] == "A renamed gpt-scratch, from another package."
    assert rows["renamed-gpt"]["package"] == "robovlms-broken 0.2.0" and not rows["renamed-gpt"]["failed"]
    assert rows["misspelt"]["failed"] and rows["misspelt"]["entry_point"] == "broken_plugin:RenamedGTP"
    assert "AttributeError" in rows["misspelt"]["description"]


def test_listing_reads_metadata_and_builds_no_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("listing built a model")

    monkeypatch.setattr("robovlms.backbone.registry.create_backbone", fail)
    rows = {row["name"]: row for row in list_backbones()}
    assert rows["kosmos2"]["entry_point"] == "robovlms.backbones.kosmos2:Kosmos2Backbone"
    assert rows["kosmos2"]["package"].startswith("robovlms ") and "tiny_parameters" not in rows["kosmos2"]


def test_backbones_check_prints_the_working_rows_and_exits_1_on_a_plugin_failing_to_import(tmp_path, monkeypatch):
    install_backbone(tmp_path, monkeypatch, GOOD_BACKBONE.replace("class", "raise ImportError('needs torchvision')"
                                                                           "\n\n\nclass"), "broken", "RenamedGPT")
    assert not BACKBONES.listing()[0]["failed"]  # from its source alone, the plugin looks whole
    result = CliRunner().invoke(cli.app, ["backbones", "--check"])
    assert result.exit_code == 1
    assert "kosmos2" in result.output and "robovlms-broken 0.2.0" in result.output
    assert "ImportError: needs torchvision" in result.output and "Traceback" not in result.output


def test_backbones_command_counts_parameters_only_when_asked():
    plain = CliRunner().invoke(cli.app, ["backbones"])
    counted = CliRunner().invoke(cli.app, ["backbones", "--parameters"])
    assert plain.exit_code == 0 and counted.exit_code == 0
    assert "tiny parameters" not in plain.output and "tiny parameters" in counted.output


def test_benchmarks_command_lists_what_loads_beside_a_broken_plugin(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", "import robovlms_no_such_module\n",
                   {"robovlms.benchmarks": {"broken-bench": "broken_plugin:Bench"}})
    result = CliRunner().invoke(cli.app, ["benchmarks"])
    assert result.exit_code == 1
    assert "metaworld" in result.output and "broken-bench" in result.output
    assert "ModuleNotFoundError" in result.output and "Traceback" not in result.output


def test_a_benchmark_plugin_failing_in_its_constructor_names_its_package(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", '''
from robovlms.benchmarks.metaworld import MetaWorldBenchmark


class Bench(MetaWorldBenchmark):
    name = "broken-bench"

    def __init__(self, **options):
        raise OSError("no simulator assets")
''', {"robovlms.benchmarks": {"broken-bench": "broken_plugin:Bench"}})
    assert "broken-bench" in BENCHMARKS.names()
    with pytest.raises(PluginError, match=r"'broken-bench' .*robovlms-broken 0\.2\.0.* OSError: no simulator assets"):
        create_benchmark("broken-bench")


def test_train_prints_a_plugin_error_as_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    install_backbone(tmp_path, monkeypatch, CRASHING_BACKBONE, "crashing", "Crashing")
    store = write_synthetic_store(tmp_path / "store", episodes=2)
    config = tmp_path / "train.yaml"
    config.write_text(f"store: {store.path}\nrun_dir: {tmp_path / 'run'}\nbackbone: {{name: crashing}}\n")
    monkeypatch.setattr("sys.argv", ["robovlms", "train", str(config)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    output = capsys.readouterr().out
    assert exit_.value.code == 2 and "Traceback" not in output
    assert "backbone plugin 'crashing' (broken_plugin:Crashing, from robovlms-broken 0.2.0)" in output


def test_sweep_dry_run_checks_name_a_plugin_that_fails_to_import(tmp_path, monkeypatch):
    install_backbone(tmp_path, monkeypatch, "import robovlms_no_such_module\n", "broken", "Broken")
    sweep = load_sweep({"name": "s", "run_dir": str(tmp_path / "run"), "benchmark": {"name": "metaworld"},
                        "store": {"path": str(tmp_path / "store")}, "grid": {"backbone": ["broken"]}})
    with pytest.raises(PluginError, match=r"backbone plugin 'broken' \(broken_plugin:Broken, from robovlms-broken "
                                          r"0\.2\.0\) cannot be loaded: ModuleNotFoundError"):
        expand_cells(sweep)


def test_software_versions_record_the_package_and_version_of_each_plugin_a_cell_used(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "qwen2vl_plugin", GOOD_BACKBONE,
                   {"robovlms.backbones": {"renamed-gpt": "qwen2vl_plugin:RenamedGPT"}},
                   distribution="robovlms-qwen2vl", version="0.1.0")
    versions = software_versions("metaworld", {"backbone": {"name": "renamed-gpt"},
                                               "formulation": {"name": "policy-head"}})
    assert versions["robovlms-qwen2vl"] == "0.1.0" and "torch" in versions


def test_software_versions_record_a_benchmark_plugins_package(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "bench_plugin", """
from robovlms.benchmarks.metaworld import MetaWorldBenchmark


class Bench(MetaWorldBenchmark):
    name = "other-bench"
""", {"robovlms.benchmarks": {"other-bench": "bench_plugin:Bench"}}, distribution="robovlms-bench", version="1.2.0")
    assert software_versions("other-bench")["robovlms-bench"] == "1.2.0"


def test_formulations_listing_gives_a_row_to_a_formulation_missing_its_loss(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", NO_LOSS_FORMULATION,
                   {"robovlms.formulations": {"no-loss": "broken_plugin:NoLoss"}})
    rows = {row["name"]: row for row in FORMULATIONS.listing(check=True)}
    assert not rows["policy-head"]["failed"] and rows["no-loss"]["failed"]
    assert "does not implement" in rows["no-loss"]["description"] and "loss" in rows["no-loss"]["description"]


@pytest.mark.parametrize("registry", [BACKBONES, FORMULATIONS, BENCHMARKS], ids=lambda registry: registry.kind)
def test_listing_from_source_gives_every_plugin_the_description_it_has_once_loaded(registry):
    from_source = {row["name"]: row["description"] for row in registry.listing()}
    loaded = {row["name"]: row["description"] for row in registry.listing(check=True)}
    assert from_source == loaded and all(loaded.values())


def test_listing_from_source_follows_a_class_imported_into_the_plugins_package(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "reexporting_plugin", "from robovlms.backbones.gpt_scratch import "
                                                                "GPTScratchBackbone as Reexported\n",
                   {"robovlms.backbones": {"reexported": "reexporting_plugin:Reexported"}})
    rows = {row["name"]: row for row in BACKBONES.listing()}
    assert rows["reexported"]["description"] == rows["gpt-scratch"]["description"]


def test_listing_from_source_finds_a_package_the_plugin_imports_that_is_not_installed(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", "import robovlms_no_such_module\n\n\nclass Bench:\n    pass\n",
                   {"robovlms.benchmarks": {"broken-bench": "broken_plugin:Bench"}})
    rows = {row["name"]: row for row in BENCHMARKS.listing()}
    assert rows["broken-bench"]["failed"] and "No module named 'robovlms_no_such_module'" in rows["broken-bench"][
        "description"]


def test_an_unknown_formulation_lists_as_valid_only_the_plugins_that_load(tmp_path, monkeypatch, demo_store):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", NO_LOSS_FORMULATION,
                   {"robovlms.formulations": {"no-loss": "broken_plugin:NoLoss"}})
    with pytest.raises(UnknownNameError) as raised:
        create_formulation("lstm-head", create_backbone("gpt-scratch"), demo_store.action_statistics, None)
    assert "no-loss" not in raised.value.valid and "policy-head" in raised.value.valid
    assert "no-loss: installed but failing to load, see `robovlms formulations --check`" in str(raised.value)


def test_formulations_command_lists_each_formulation_with_its_package(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", "import robovlms_no_such_module\n",
                   {"robovlms.formulations": {"broken-formulation": "broken_plugin:Broken"}})
    result = CliRunner().invoke(cli.app, ["formulations"])
    assert result.exit_code == 1
    row = next(line for line in result.output.splitlines() if " policy-head " in line)
    assert "robovlms.formulations.policy_head:PolicyHead" in row and "robovlms 0.1.0" in row
    assert "broken-formulation" in result.output and "ModuleNotFoundError" in result.output
