"""What `make demo` and `make test` do to a machine: system packages come without their recommendations."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_apt_install_skips_recommended_packages():
    scripts = [ROOT / "Makefile", *sorted((ROOT / ".ci").glob("*"))]
    installs = [line for script in scripts for line in script.read_text().splitlines()
                if re.search(r"apt(-get)? install", line)]
    assert installs  # the Makefile installs system packages
    assert all("--no-install-recommends" in line for line in installs), installs
