"""The sweep ledger asks Optuna's tables directly what Optuna's public API answers only by reading every trial: the
installed Optuna must keep the schema and the columns the ledger reads, and a storage of another schema is refused
in one line rather than misread."""

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from robovlms.errors import ConfigError
from robovlms.sweep import open_storage
from robovlms.sweep import study as ledger
from robovlms.sweep.study import OPTUNA_SCHEMA, ledger_tables

WHAT_TO_UPDATE = (f"Optuna {optuna.__version__} changed the tables the sweep ledger reads: check the queries of "
                  f"robovlms/sweep/study.py against its schema, then update ledger_tables, OPTUNA_SCHEMA and the optuna "
                  f"range in pyproject.toml")


@pytest.fixture
def storage(tmp_path):
    return open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")


def test_the_installed_optuna_writes_the_schema_the_ledger_reads(storage):
    assert storage.get_head_version() == OPTUNA_SCHEMA, WHAT_TO_UPDATE


def test_every_column_the_ledger_reads_is_in_the_installed_optunas_tables(storage):
    schema = sqlalchemy.inspect(storage.engine)
    for name, table in ledger_tables().items():
        assert schema.has_table(name), f"no table {name!r}. {WHAT_TO_UPDATE}"
        missing = {column.name for column in table.columns} - {column["name"] for column in schema.get_columns(name)}
        assert not missing, f"table {name!r} has no column(s) {sorted(missing)}. {WHAT_TO_UPDATE}"


def test_the_ledger_reads_the_states_and_attributes_optuna_wrote(storage):
    study = optuna.create_study(study_name="ledger", storage=storage)
    for cell in ("a", "b", "c"):
        study.enqueue_trial({}, user_attrs={"cell": cell})
    first, _ = ledger.pop_waiting_trial(study)
    second, _ = ledger.pop_waiting_trial(study)
    storage.set_trial_user_attr(second, "error", "the cell's own error")
    storage.set_trial_state_values(second, TrialState.FAIL)
    assert (ledger.popped_cell(study, first), ledger.trial_state(study, first)) == ("a", TrialState.RUNNING)
    assert ledger.count_trials(study) == {TrialState.RUNNING: 1, TrialState.FAIL: 1, TrialState.WAITING: 1}
    assert ledger.count_cell_errors(study) == 1


def test_a_storage_of_another_schema_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.setattr("robovlms.sweep.study.OPTUNA_SCHEMA", "v9.0.0.a")
    with pytest.raises(ConfigError, match=rf"has schema {OPTUNA_SCHEMA} .*the sweep ledger reads schema v9\.0\.0\.a"):
        open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
