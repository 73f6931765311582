"""Repository contracts: README's two commands are Makefile targets that set themselves up, CI runs the same
test command, ruff is configured, and no large binaries can be committed; README is a short user page whose
install, models and command lines match pyproject.toml, models.yaml and the CLI, and the links of README,
SECURITY.md and docs/ resolve."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

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
    assert test[-3:] == [".venv/bin/ruff check .", ".venv/bin/lint-imports", ".venv/bin/python -m pytest"]
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


# README.md is a user page; design and measurements live in docs/.
README_MAX_LINES = 250
# Pages another change adds: a link to them is checked once they exist, and skipped only while they are missing.
LINKED_BEFORE_WRITTEN = {"docs/artifact-format.md", "docs/artifact-format-2.schema.json"}


def _markdown_pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (their brackets are not links)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def _sections(text: str) -> dict[str, str]:
    """The ``## `` sections of a page: heading text -> body."""
    parts = re.split(r"^## (.*)$", re.sub(r"^```.*?^```", lambda m: re.sub(r"^#", " #", m.group(0), flags=re.M),
                                              text, flags=re.S | re.M), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _readme_section(prefix: str) -> str:
    found = [body for title, body in _sections((ROOT / "README.md").read_text()).items() if title.startswith(prefix)]
    assert len(found) == 1, f"README.md must have one section '## {prefix}...', has {len(found)}"
    return found[0]


def _table(body: str) -> list[dict[str, str]]:
    """The first Markdown table of ``body`` as rows keyed by its header cells."""
    lines = [line.strip() for line in body.splitlines() if line.strip().startswith("|")]
    assert len(lines) >= 3, "no table"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, rows = cells[0], cells[2:]
    return [dict(zip(header, row, strict=True)) for row in rows]


def _code(cell: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"expected one `code` span, got {cell!r}"
    return match.group(1)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to hyphens)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.*)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M),
                              re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_readme_is_a_short_user_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    for prefix in ("The two commands", "Install", "Quick start", "Models", "Known limitations"):
        assert _readme_section(prefix).strip(), prefix


def test_readme_install_table_names_every_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    rows = _table(_readme_section("Install"))
    named = [_code(row["extra"]) for row in rows]
    assert sorted(named) == sorted(extras), "README's extras table must name each extra of pyproject.toml once"
    assert all(row["adds"] and row["needed for"] for row in rows)


def test_readme_quick_start_exports_loads_and_embeds_in_about_ten_lines():
    body = _readme_section("Quick start")
    code = [line for block in re.findall(r"```\w*\n(.*?)```", body, re.S) for line in block.splitlines()
            if line.strip()]
    assert len(code) <= 12, code
    text = "\n".join(code)
    for step in ("imgembed export ", "imgembed embed ", "imgembed.load(", ".embed("):
        assert step in text, step


def test_readme_models_table_matches_the_registry():
    models = yaml.safe_load((ROOT / "models.yaml").read_text())["models"]
    public = {name: spec for name, spec in models.items() if "test" not in (spec.get("tags") or [])}
    rows = {_code(row["name"]): row for row in _table(_readme_section("Models"))}
    assert sorted(rows) == sorted(public), "README's models table must name every public model of models.yaml"
    for name, spec in public.items():
        row = rows[name]
        assert row["family"] == spec["family"], name
        assert _code(row["hub source"]) == spec["source"]["hub"], name
        assert int(row["dim"]) == spec["embedding"]["dim"], name
        assert bool(row["text tower"]) == ("text" in spec), name


def _command_lines(page: Path) -> list[str]:
    """``imgembed ...`` command lines of a page: ```bash blocks (continuations joined), indented code lines and
    inline code spans."""
    text = page.read_text()
    blocks = re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    blocks += ["\n".join(re.findall(r"^    (imgembed .*)$", prose, re.M))]
    blocks += ["\n".join(re.findall(r"`(imgembed [^`]*)`", prose.replace("\n", " ")))]
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("imgembed ")]


def test_command_lines_in_readme_and_docs_use_real_commands_and_options():
    import typer.main

    from imgembed.cli import app

    commands = typer.main.get_command(app).commands
    checked = 0
    for page in _markdown_pages():
        for line in _command_lines(page):
            words = shlex.split(line, comments=True)
            where = f"{page.relative_to(ROOT)}: {line}"
            assert words[1] in commands, f"{where}: no command {words[1]!r}"
            options = {opt for param in commands[words[1]].params for opt in (*param.opts, *param.secondary_opts)}
            for word in words[2:]:  # an option, or an optional one in brackets: [--plain]
                for option in re.findall(r"^\[?(--?[A-Za-z][\w-]*)", word):
                    assert option in options | {"--help"}, f"{where}: {words[1]} has no {option}"
            checked += 1
    assert checked >= 40  # the parser found the command lines


def test_relative_links_in_readme_security_and_docs_resolve():
    checked = 0
    for page in _markdown_pages():
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # absolute URL
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)} links to {target}"
            if not file.exists() and file.relative_to(ROOT).as_posix() in LINKED_BEFORE_WRITTEN:
                continue
            assert file.exists(), f"{where}, which does not exist"
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file), f"{where}: no such heading in {file.relative_to(ROOT)}"
            checked += 1
    assert checked >= 10  # the parser found the links


def test_docs_pages_named_in_the_code_exist():
    sources = [*sorted((ROOT / "imgembed").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
               ROOT / "Makefile", ROOT / "SECURITY.md"]
    named = {(path, name) for path in sources for name in re.findall(r"\bdocs/[\w.-]*\w", path.read_text())}
    assert named  # the code points readers at docs/
    for path, name in sorted(named):
        if name in LINKED_BEFORE_WRITTEN and not (ROOT / name).exists():
            continue
        assert (ROOT / name).is_file(), f"{path.relative_to(ROOT)} names {name}, which does not exist"


def test_repository_paths_named_in_readme_security_and_docs_exist():
    """``tests/...``, ``benchmarks/...``, ``examples/...`` and ``imgembed/...`` paths the pages name exist."""
    pattern = r"(?<![\w/~.])((?:tests|benchmarks|examples|imgembed)/[\w/.-]*\w)"
    named = {(page, path) for page in _markdown_pages() for path in re.findall(pattern, page.read_text())}
    assert len(named) >= 10  # the parser found the paths
    missing = [f"{page.relative_to(ROOT)}: {path}" for page, path in sorted(named) if not (ROOT / path).exists()]
    assert missing == []


def test_the_architecture_is_an_import_contract_that_holds():
    """pyproject's import-linter contracts: the layers of the tree (each imports only those below it) and no
    import cycles inside a package; `make test` (and so CI) runs lint-imports, and the tree keeps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    kinds = {c["type"] for c in config["contracts"]}
    assert kinds == {"layers", "acyclic_siblings"}
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    top = {m for layer in layers for m in layer.replace(":", "|").split("|")}
    packages = {f"imgembed.{p.name}" for p in (ROOT / "imgembed").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= {m.strip() for m in top}, "every package of imgembed/ is placed in a layer"
    assert sorted(p.name for p in (ROOT / "imgembed").glob("*.py")) == ["__init__.py", "errors.py"]
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout
