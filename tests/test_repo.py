"""Repository contracts: README's three commands are what CI runs; no large binaries can be committed."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"## The three commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md must start with the three commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_gives_install_main_job_and_test_commands():
    install, main_job, test = _readme_commands()
    assert install.startswith("pip install") and main_job.startswith("imgembed export") and "pytest" in test
    assert "--random-init" in main_job  # works offline


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    install, _, test = _readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines and test in ci_lines


def test_torch_is_pinned_and_optional_heavy_deps_stay_out_of_core():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert "torch==2.13.0" in deps
    assert not any(d.split("[")[0].split("=")[0].split(">")[0].strip() in ("torchvision", "timm") for d in deps)
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["force-include"] == {"models.yaml": "imgembed/models.yaml"}  # registry ships in the wheel


def test_gitignore_covers_generated_binaries():
    for path in ("x/model.onnx", "w/model.safetensors", "a/v.npy", "artifacts/x", "e.parquet", "w/m.bin"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
