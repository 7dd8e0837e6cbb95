"""robovlms: what matters in building a vision-language-action robot policy. See README.md and docs/architecture.md."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# Modules that moved in 0.2 (the data package); their old names keep importing, with a DeprecationWarning.
MOVED_MODULES = {"robovlms.store": "robovlms.data.store", "robovlms.dataset": "robovlms.data.windows",
                 "robovlms.demonstrations": "robovlms.data.demonstrations",
                 "robovlms.lerobot_import": "robovlms.data.lerobot_import",
                 "robovlms.benchmarks.calvin_import": "robovlms.data.calvin_import",
                 "robovlms.plots": "robovlms.report.plots"}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED_MODULES[spec.name]}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass


sys.meta_path.append(_MovedModule())
