"""docs/configuration.md is generated from the config dataclasses and must be current."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "config_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + "\nregenerate with: python tools/config_reference.py"


def test_generator_detects_a_stale_page(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n(old)\n")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "config_reference.py"), "--check",
                             "--output", str(stale)], capture_output=True, text=True)
    assert result.returncode == 1 and "out of date" in result.stderr
