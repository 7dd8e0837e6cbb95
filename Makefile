# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6
# tests use a real database for multi-machine sweeps and a real browser for reports
TEST_SYSTEM_PACKAGES := postgresql chromium
PLUGINS := examples/robovlms-llava-plugin examples/robovlms-gru-head-plugin
DEMO_RUN := runs/demo
DEMO_REPORT := reports/demo
WORKERS ?= 2
# pytest-xdist processes for `make test`; each test runs on one thread (tests/conftest.py)
TEST_WORKERS ?= 2

export MUJOCO_GL ?= egl
export HF_HUB_OFFLINE := 1

PACKAGES ?= $(SYSTEM_PACKAGES)
APT_LOCK_WAIT ?= 600
APT_LOCK_POLL ?= 5
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=$(APT_LOCK_WAIT)

.PHONY: install system-packages test-system-packages demo test perf clean

install: $(VENV)/.installed

# Another apt or dpkg process (unattended-upgrades, a second `make install`) may hold apt's locks: wait for it, up to
# APT_LOCK_WAIT seconds. apt-get install waits by itself (DPkg::Lock::Timeout); apt-get update does not (apt 2.6
# applies that option to dpkg's lock only), so it is retried every APT_LOCK_POLL seconds while its error is the lock.
system-packages:
	@missing=$$(for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  waited=0; \
	  until output=$$($(APT_GET) update -qq 2>&1); do \
	    case "$$output" in *"Could not get lock"*) ;; *) echo "$$output" >&2; exit 1;; esac; \
	    if [ $$waited -ge $(APT_LOCK_WAIT) ]; then echo "$$output" >&2; exit 1; fi; \
	    [ $$waited -gt 0 ] || echo "waiting up to $(APT_LOCK_WAIT) s for another apt process to release its lock"; \
	    sleep $(APT_LOCK_POLL); waited=$$((waited + $(APT_LOCK_POLL))); \
	  done; \
	  $(APT_GET) install -y -qq --no-install-recommends $$missing; \
	fi

# torch is pinned to the CPU build first, so nothing later pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml $(PLUGINS:%=%/pyproject.toml) | system-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(PLUGINS:%=-e %)
	touch $@

# The main job: demonstrations (made by the sweep when missing), experiments/demo.yaml, then its report.
demo: install
	@$(BIN)/robovlms sweep experiments/demo.yaml --workers $(WORKERS) || failed=1; \
	$(BIN)/robovlms report $(DEMO_RUN) --out $(DEMO_REPORT) && exit $${failed:-0}

test-system-packages:
	@$(MAKE) --no-print-directory system-packages PACKAGES="$(TEST_SYSTEM_PACKAGES)"

test: install test-system-packages
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

perf: install
	$(BIN)/python perf/data_and_rollouts.py
	$(BIN)/python perf/training_and_policy.py
	$(BIN)/python perf/training_step_costs.py
	$(BIN)/python perf/discrete_decoding.py
	$(BIN)/python perf/action_objectives.py
	$(BIN)/python perf/sweep_ledger.py
	$(BIN)/python perf/policy_server.py
	$(BIN)/python perf/cli_startup.py

clean:
	rm -rf $(VENV) data/demo $(DEMO_RUN) $(DEMO_REPORT)
