"""The command line itself: `--help`/`--version` import no heavy library, every command's imports are lazy,
and logging prints gptforge's messages as plain lines while other libraries' INFO stays hidden."""

import json
import logging
import subprocess
import sys

import pytest

from gptforge.cli import COMMANDS, main

HEAVY = ("torch", "numpy", "tokenizers", "safetensors", "matplotlib", "fastapi", "transformers", "yaml")

# Runs the CLI in a fresh interpreter and reports which heavy modules it imported.
PROBE = """
import contextlib, io, json, sys
from gptforge.cli import main
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({"imported": [m for m in %r if m in sys.modules], "out": out.getvalue()}))
""" % (HEAVY,)


def _imports(*argv: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []], ids=["help", "version", "bare"])
def test_start_imports_no_heavy_library(argv):
    probe = _imports(*argv)
    assert probe["imported"] == [], f"gptforge {' '.join(argv)} imported {probe['imported']}"
    if argv == ["--version"]:
        assert probe["out"].startswith("gptforge ")
    else:
        assert all(name in probe["out"] for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_is_lazy(command):
    probe = _imports(command, "--help")
    assert probe["imported"] == [], f"gptforge {command} --help imported {probe['imported']}"
    assert "usage: gptforge " + command in probe["out"]


def test_logging_plain_lines_and_quiet_libraries(tmp_path, capsys):
    # A command that fails fast after logging: --verbose off means gptforge INFO plain, other INFO hidden.
    from gptforge.cli import configure_logging

    configure_logging(verbose=False)
    logging.getLogger("gptforge.data.shards").info("Training a tokenizer...")
    logging.getLogger("gptforge.train").warning("no validation split")
    logging.getLogger("httpx").info("HTTP Request: GET /")
    logging.getLogger("httpx").warning("retrying")
    err = capsys.readouterr().err.splitlines()
    assert err == ["Training a tokenizer...", "warning: no validation split", "warning: retrying"]

    configure_logging(verbose=True)
    logging.getLogger("gptforge.data.shards").debug("details")
    logging.getLogger("httpx").info("HTTP Request: GET /")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "DEBUG gptforge.data.shards: details" in err[0] and "INFO httpx:" in err[1]
    assert err[0][:4].isdigit()  # timestamped
    configure_logging(verbose=False)


def test_cli_installs_one_handler_however_often_it_runs(tmp_path, capsys):
    for _ in range(3):
        assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    handlers = [h for h in logging.getLogger().handlers if getattr(h, "_gptforge_cli", False)]
    assert len(handlers) == 1
    assert capsys.readouterr().err.count("no such file or folder") == 3
