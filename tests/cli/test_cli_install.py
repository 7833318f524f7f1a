"""The `actorgen` console script is installed the way bin/setup installs it, and the
functions never import it (their cold start does not pay for the command line)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_editable_install_puts_a_working_actorgen_command_on_the_path(tmp_path: Path) -> None:
    # A fresh venv that sees this venv's packages (the dependencies bin/setup installs
    # first: requirements-dev.txt, pip and setuptools included), then bin/setup's own
    # install command on a copy of the project's files.
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    [site] = list(target.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    clone = tmp_path / "clone"
    (clone / "functions").mkdir(parents=True)
    (clone / "pyproject.toml").write_bytes((REPO_ROOT / "pyproject.toml").read_bytes())
    subprocess.run(["cp", "-r", str(REPO_ROOT / "functions" / "actorgen"), str(clone / "functions")],
                   check=True)
    python = target / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "-e", str(clone)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    script = target / "bin" / "actorgen"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert helped.returncode == 0, helped.stderr
    for command in ("jobs", "job", "follow", "redispatch", "cancel", "models", "stats"):
        assert command in helped.stdout
    assert "exit codes:" in helped.stdout
    wrong = subprocess.run([str(script), "jobs", "--limit", "0"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    assert wrong.returncode == 2 and "must be 1 or more" in wrong.stderr
    # Editable: the command runs the checkout's code.
    where = subprocess.run([str(python), "-c", "import actorgen.cli; print(actorgen.cli.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert where.stdout.strip().startswith(str(clone / "functions" / "actorgen"))


def test_the_functions_never_import_the_command_line() -> None:
    probe = (
        "import sys; sys.path.insert(0, '.'); import main; "
        "print(sorted(m for m in sys.modules if m == 'actorgen.cli' or m.startswith('actorgen.cli.')))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FIREBASE_CONFIG", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT / "functions", env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
