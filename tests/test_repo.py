"""Repository contracts: README's two commands are Makefile targets that set themselves up, CI runs the same
test command, ruff is configured, and no large binaries can be committed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

from .helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"## The two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md must start with the two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def _make_recipe(target: str) -> list[str]:
    """The commands ``make -n TARGET`` would run on a fresh clone (no .venv), as make prints them."""
    # Under `make test` this runs as a sub-make: drop the parent's variables so make prints no
    # "Entering directory" lines and inherits no flags.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-B", "-f", str(ROOT / "Makefile"), target],
                          cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    return proc.stdout.splitlines()


def test_readme_gives_the_demo_and_test_commands():
    assert _readme_commands() == ["make demo", "make test"]


def test_make_targets_set_up_the_environment_then_run_the_main_job_and_the_tests():
    setup = ["test -x .venv/bin/python || python3 -m venv .venv"]
    demo, test = _make_recipe("demo"), _make_recipe("test")
    for recipe in (demo, test):
        assert recipe[:1] == setup and any('pip install -e ".[dev]"' in line for line in recipe), recipe
        assert recipe.index("touch .venv/.installed") < len(recipe) - 1  # installed before anything runs
    main_job = ".venv/bin/imgembed export clip-vit-b32 --random-init --int8 --out artifacts/clip-vit-b32-int8"
    assert main_job in demo and any(line.startswith(".venv/bin/imgembed embed ") for line in demo)
    assert test[-2:] == [".venv/bin/ruff check .", ".venv/bin/python -m pytest"]
    stamp_rule = re.search(r"^\$\(STAMP\): (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert stamp_rule and "pyproject.toml" in stamp_rule.group(1).split()  # reinstall when it changes


def test_ci_runs_the_readme_test_command_on_a_fresh_clone():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "set -euo pipefail" in ci and "export CI=true" in ci
    assert any(line.startswith("git clone ") for line in ci)
    assert ci[-1] == "make test" == _readme_commands()[1]


def test_ruff_is_configured_for_the_code_style():
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert {"E", "F", "W", "I", "B"} <= set(ruff["lint"]["select"])


def test_torch_is_pinned_and_optional_heavy_deps_stay_out_of_core():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert "torch==2.13.0" in deps
    assert not any(d.split("[")[0].split("=")[0].split(">")[0].strip() in ("torchvision", "timm") for d in deps)
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["force-include"] == {"models.yaml": "imgembed/models.yaml"}  # registry ships in the wheel


def test_gitignore_covers_generated_binaries():
    for path in ("x/model.onnx", "w/model.safetensors", "a/v.npy", "artifacts/x", "e.parquet", "w/m.bin",
                 ".venv/.installed"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_the_core_never_imports_optimum():
    code = ("import sys, imgembed, imgembed.runtime, imgembed.export, imgembed.cli, imgembed.export.pipeline; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optimum'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    sources = [p for p in (ROOT / "imgembed").rglob("*.py") if re.search(r"^\s*(from|import) optimum\b",
                                                                        p.read_text(), re.M)]
    assert sources == []


def test_security_md_cites_tests_that_exist():
    text = (ROOT / "SECURITY.md").read_text()
    cited = set(re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", text))
    assert cited
    for name, test in cited:
        path = ROOT / "tests" / name
        assert path.is_file(), f"SECURITY.md cites tests/{name}, which does not exist"
        if test:
            assert re.search(rf"^def {test}\(", path.read_text(), re.M), f"SECURITY.md cites tests/{name}::{test}"
