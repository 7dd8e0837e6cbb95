"""What `make demo` and `make test` do to a machine: system packages come without their recommendations, and the
install waits for another apt or dpkg process (unattended-upgrades, a second `make install`) instead of failing.

The Makefile runs here against stand-ins for dpkg, apt-get and sudo that record how they were called."""

import os
import re
import subprocess
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKED = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)"


def stand_ins(tmp_path, update_failures: list[str]) -> Path:
    """dpkg that knows no package, sudo that runs its command, and apt-get whose first updates fail with
    `update_failures` (one message each) and which records every call in calls.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "failures").write_text("".join(f"{message}\n" for message in update_failures))
    scripts = {
        "dpkg": "exit 1",
        "sudo": 'exec "$@"',
        "apt-get": f"""
            echo "$*" >> {tmp_path}/calls.txt
            case " $* " in *" update "*)
              failure=$(head -n 1 {tmp_path}/failures)
              if [ -n "$failure" ]; then
                sed -i 1d {tmp_path}/failures
                echo "$failure" >&2
                exit 100
              fi;;
            esac""",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + textwrap.dedent(body).strip() + "\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def make_system_packages(tmp_path, update_failures: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = stand_ins(tmp_path, update_failures)
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "system-packages",
                             "PACKAGES=robovlms-absent-package", "APT_LOCK_POLL=1"],
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            capture_output=True, text=True, check=False)
    calls = (tmp_path / "calls.txt").read_text().splitlines() if (tmp_path / "calls.txt").exists() else []
    return result, calls


def test_system_packages_install_without_recommendations_waiting_for_the_dpkg_lock(tmp_path):
    result, calls = make_system_packages(tmp_path, [])
    assert result.returncode == 0, result.stderr
    install = next(call for call in calls if " install " in f" {call} ")
    assert "--no-install-recommends" in install and "-o DPkg::Lock::Timeout=600" in install
    assert install.endswith("robovlms-absent-package")


def test_package_lists_are_updated_once_another_apt_process_releases_its_lock(tmp_path):
    result, calls = make_system_packages(tmp_path, [LOCKED, LOCKED])
    assert result.returncode == 0, result.stderr
    assert [("update" if " update " in f" {call} " else "install") for call in calls] == ["update"] * 3 + ["install"]
    assert "waiting up to 600 s for another apt process" in result.stdout


def test_an_update_failing_for_another_reason_stops_the_install_at_once(tmp_path):
    result, calls = make_system_packages(tmp_path, ["E: Failed to fetch http://deb.debian.org/ 404 Not Found"])
    assert result.returncode != 0 and "Failed to fetch" in result.stderr
    assert len(calls) == 1


def test_every_apt_install_in_the_ci_scripts_skips_recommended_packages():
    installs = [line for script in sorted((ROOT / ".ci").glob("*")) for line in script.read_text().splitlines()
                if re.search(r"apt(-get)?\b.*\binstall\b", line)]
    assert all("--no-install-recommends" in line for line in installs), installs
