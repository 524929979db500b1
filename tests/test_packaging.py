"""Packaging: what the CLI needs ships inside the package, and a built wheel works outside the source tree."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gptforge
from gptforge.demo import default_recipe_path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(gptforge.__file__).resolve().parent


def test_recipes_are_package_data_and_configs_points_at_them():
    """One copy: src/gptforge/recipes/ is the source of truth, configs/ in the source tree links to it."""
    assert default_recipe_path().is_file() and default_recipe_path().parent == PACKAGE / "recipes"
    configs = REPO / "configs"
    if configs.exists():  # a source checkout (an installed package has no configs/)
        assert configs.is_symlink() and configs.resolve() == (REPO / "src" / "gptforge" / "recipes").resolve()
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"recipes/*.yaml"' in pyproject


def _source_copy(target: Path) -> Path:
    """The repository's files without build products, so building the wheel leaves the checkout untouched."""
    skip = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  ".hypothesis", ".venv", "*.safetensors")
    shutil.copytree(REPO, target, symlinks=True, ignore=skip)
    return target


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path):
    import torch

    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(_source_copy(tmp_path / "src"))],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("gptforge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gptforge/recipes/stdlib-code.yaml" in names and "gptforge/recipes/moderation-example.yaml" in names
    assert "gptforge/serve/static/index.html" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "2",
                "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the wheel pip already has (cache or local index)
    for requirement in (torch_pin, str(wheel)):
        install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", requirement],
                                 capture_output=True, text=True, env=env, timeout=1200)
        assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"  # not the source tree: only the installed package can be found
    elsewhere.mkdir()
    where = subprocess.run([str(bin_dir / "python"), "-c", "import gptforge; print(gptforge.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr

    helped = subprocess.run([str(bin_dir / "gptforge"), "--help"], cwd=elsewhere, capture_output=True, text=True,
                            env=env, timeout=120)
    assert helped.returncode == 0 and "demo" in helped.stdout, helped.stderr
    demo = subprocess.run([str(bin_dir / "gptforge"), "demo", "--minutes", "0.2", "--no-progress"], cwd=elsewhere,
                          capture_output=True, text=True, env=env, timeout=1200)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert (elsewhere / "runs" / "demo" / "model" / "config.json").is_file()
    assert "Done. Validation perplexity" in demo.stdout
