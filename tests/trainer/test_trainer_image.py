"""The container's layout, checked without Docker (no engine runs here): the
files the Dockerfile copies are enough to import and start the trainer, and
its command is exactly the entry point the tests and executors run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from actorgen import schema

from tests.trainer.seed import REPO_ROOT

DOCKERFILE = REPO_ROOT / "trainer_image" / "Dockerfile"


def _instructions() -> list[str]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _copies() -> list[tuple[list[str], str]]:
    copies = []
    for line in _instructions():
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            copies.append((sources, dest))
    return copies


def test_entrypoint_is_the_schema_entry_point() -> None:
    [entry] = [line for line in _instructions() if line.startswith("ENTRYPOINT")]
    assert json.loads(entry.removeprefix("ENTRYPOINT").strip()) == [
        "python", "-m", schema.TRAINER_MODULE]


def test_copied_files_are_enough_to_start(tmp_path: Path) -> None:
    root = tmp_path / "opt-trainer"
    for sources, dest in _copies():
        if "requirements" in dest:
            continue
        target = root / Path(dest).relative_to("/opt/trainer")
        for source in sources:
            path = REPO_ROOT / source
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / path.name)
    modules = sorted(p.stem for p in (root / "lora_trainer").glob("*.py"))
    imports = "; ".join(f"import lora_trainer.{m}" for m in modules if m != "__main__")
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    # -I would drop PYTHONPATH; -S is not used so the venv's site-packages stay.
    check = subprocess.run([sys.executable, "-c", imports + "; import actorgen.clients"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-2000:]
    helped = subprocess.run([sys.executable, "-m", "lora_trainer", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "--job-id" in helped.stdout, helped.stderr[-2000:]


def test_dockerignore_lets_every_copied_file_through() -> None:
    allowed = {line.lstrip("!").rstrip("/") for line in
               (REPO_ROOT / "trainer_image" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for sources, _ in _copies():
        for source in sources:
            assert source.rstrip("/") in allowed, f"{source} is excluded from the build context"


def test_cloudbuild_builds_this_dockerfile_from_the_root() -> None:
    text = (REPO_ROOT / "cloudbuild.yaml").read_text()
    assert "trainer_image/Dockerfile" in text
    assert "-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/${_IMAGE}:${_TAG}" in text
    assert "${_IMAGE}:latest" in text and "_IMAGE: lora-trainer" in text
