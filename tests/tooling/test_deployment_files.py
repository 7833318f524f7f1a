"""cloudbuild.yaml, the README, the deployment guide and the config name one trainer image.

Parsed, not grepped loosely: a build that pushes one name while the docs tell the
operator to set another leaves every job failing on "image not found".
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from actorgen import config

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", ROOT / "docs" / "deployment.md")
# region-docker.pkg.dev/PROJECT/REPOSITORY/IMAGE[:TAG], as written in docs and yaml.
IMAGE_REF = re.compile(
    r"(?P<region>[\w${}-]+)-docker\.pkg\.dev/(?P<project>[\w${}-]+)/"
    r"(?P<repository>[\w${}-]+)/(?P<image>[\w${}.-]+)(?::(?P<tag>[\w${}.-]+))?"
)
BUILT = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/${_IMAGE}:${_TAG}"


@pytest.fixture(scope="module")
def build() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cloudbuild.yaml").read_text(encoding="utf-8"))


def _step(build: dict[str, Any], step_id: str) -> dict[str, Any]:
    [step] = [s for s in build["steps"] if s["id"] == step_id]
    return step


def test_cloud_build_defaults_are_the_configs(build: dict[str, Any]) -> None:
    subs = build["substitutions"]
    assert subs["_REPOSITORY"] == config.TRAINER_IMAGE_REPOSITORY
    assert subs["_IMAGE"] == config.TRAINER_IMAGE_NAME
    assert subs["_REGION"] == config.FUNCTIONS_REGION
    assert subs["_TAG"] == "${SHORT_SHA}"
    assert config.TRAINER_IMAGE_EXAMPLE in config.TRAINER_IMAGE_URI.description
    assert config.TRAINER_IMAGE_EXAMPLE == (
        f"{config.FUNCTIONS_REGION}-docker.pkg.dev/PROJECT/actorgen/lora-trainer:TAG")


def test_the_build_tests_pushes_then_deploys_the_image_it_built(build: dict[str, Any]) -> None:
    assert "bash .ci/run" in _step(build, "tests")["args"][-1]
    built = _step(build, "build")["args"]
    assert built[built.index("-t") + 1] == BUILT
    assert BUILT in _step(build, "smoke-test")["args"]
    push = _step(build, "push")
    assert f"docker push {BUILT}" in push["args"][-1]
    assert set(push["waitFor"]) == {"tests", "smoke-test"}  # nothing untested is pushed
    deploy = _step(build, "deploy")
    assert deploy["waitFor"] == ["push"]
    script = deploy["args"][-1]
    assert f"TRAINER_IMAGE_URI={BUILT}" in script
    assert "firebase deploy --only functions,firestore,storage" in script
    # A Vertex deployment without the trainer's own identity is refused before deploying.
    assert script.index("TRAINER_SERVICE_ACCOUNT=") < script.index("firebase deploy")
    assert BUILT in build["images"]


def test_every_image_in_the_docs_is_the_one_cloud_build_pushes(build: dict[str, Any]) -> None:
    seen = 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in IMAGE_REF.finditer(text):
            if match["image"] in ("lora-trainer", "${_IMAGE}") or "trainer" in match["image"]:
                seen += 1
                assert (match["repository"], match["image"]) == (
                    config.TRAINER_IMAGE_REPOSITORY, config.TRAINER_IMAGE_NAME
                ), f"{doc.name}: {match[0]}"
        # Every substitution a doc passes exists in cloudbuild.yaml.
        for names in re.findall(r"--substitutions=(\S+)", text):
            for pair in names.split(","):
                assert pair.split("=")[0] in build["substitutions"], f"{doc.name}: {pair}"
        for repo in re.findall(r"gcloud artifacts repositories create (\S+)", text):
            assert repo == config.TRAINER_IMAGE_REPOSITORY, doc.name
    assert seen >= 2  # the README and the guide both show it


def test_the_readme_param_table_lists_every_param() -> None:
    """Every param declared in config.py has a row in the README's table, and no row
    names a param that does not exist (the table is written by hand)."""
    from firebase_functions.params import Param

    declared = {v.name for v in vars(config).values() if isinstance(v, Param)}
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", text, flags=re.MULTILINE)
    assert len(rows) == len(set(rows)), "a param has two rows"
    assert set(rows) == declared
    assert rows == sorted(rows)  # alphabetical, as written


def _as_cloud_build_runs_it(script: str, substitutions: dict[str, str]) -> str:
    """Cloud Build's own pass over a step: ``$$`` is a dollar, ``$X``/``${X}`` its value."""
    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match[1] or match[2]
        return substitutions.get(name, match[0])

    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", one, script)


@pytest.fixture
def deploy_step(build: dict[str, Any], tmp_path: Path) -> Any:
    """Runs the deploy step's script in a scratch checkout whose tools are stand-ins:
    ``apt-get`` does nothing, ``firebase`` records its arguments."""
    subs = {**build["substitutions"], "_TAG": "abc123", "PROJECT_ID": "proj-1"}
    script = _as_cloud_build_runs_it(_step(build, "deploy")["args"][-1], subs)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "apt-get").write_text("#!/bin/sh\nexit 0\n")
    for rel, body in (("node_modules/.bin/firebase", 'echo "$@" > firebase-args\n'),
                      ("functions/venv/bin/python", "exit 0\n")):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n" + body)
    for path in (stubs / "apt-get", tmp_path / "node_modules/.bin/firebase",
                 tmp_path / "functions/venv/bin/python"):
        path.chmod(0o755)

    def run(env_file: str) -> tuple[subprocess.CompletedProcess[str], str, str]:
        (tmp_path / "functions" / ".env.proj-1").write_text(env_file)
        args = tmp_path / "firebase-args"
        args.unlink(missing_ok=True)
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60,
                                env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})
        written = (tmp_path / "functions" / ".env.proj-1").read_text()
        return result, written, args.read_text().strip() if args.exists() else ""

    return run


def test_the_deploy_step_sets_the_image_it_pushed(deploy_step: Any) -> None:
    result, written, firebase = deploy_step(
        "EXECUTOR=vertex\nTRAINER_IMAGE_URI=old/image:1\nTRAINER_SERVICE_ACCOUNT=actorgen-trainer@\n")
    assert result.returncode == 0, result.stderr
    image = "us-central1-docker.pkg.dev/proj-1/actorgen/lora-trainer:abc123"
    assert written.splitlines() == [
        "EXECUTOR=vertex", "TRAINER_SERVICE_ACCOUNT=actorgen-trainer@",
        f"TRAINER_IMAGE_URI={image}"]
    assert firebase == ("deploy --only functions,firestore,storage --project proj-1 "
                        "--non-interactive --force")


def test_the_deploy_step_refuses_vertex_without_the_trainers_account(deploy_step: Any) -> None:
    result, written, firebase = deploy_step("MACHINE_TYPE=g2-standard-8\n")
    assert result.returncode == 1
    assert "Set TRAINER_SERVICE_ACCOUNT" in result.stderr and "docs/deployment.md" in result.stderr
    assert firebase == "" and written == "MACHINE_TYPE=g2-standard-8\n"  # nothing deployed
    # The local executor (a demo project) runs no Vertex job: no account needed.
    result, _, firebase = deploy_step("EXECUTOR=local\n")
    assert result.returncode == 0 and firebase.startswith("deploy ")


def test_a_build_without_a_tag_stops_first(build: dict[str, Any]) -> None:
    # Manual submits have no SHORT_SHA: an image tagged "" must not be built or deployed.
    assert build["steps"][0]["id"] == "check-substitutions"
    script = _step(build, "check-substitutions")["args"][-1]
    empty = subprocess.run(["bash", "-c", _as_cloud_build_runs_it(script, {"_TAG": ""})],
                           capture_output=True, text=True, timeout=30)
    assert empty.returncode == 1 and "_TAG=$(git rev-parse --short HEAD)" in empty.stderr
    tagged = subprocess.run(["bash", "-c", _as_cloud_build_runs_it(script, {"_TAG": "abc"})],
                            capture_output=True, text=True, timeout=30)
    assert tagged.returncode == 0
