"""Static checks of docker/Dockerfile (no Docker engine needed): its pins match pyproject.toml."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        match = re.match(r"^([A-Za-z0-9_\-]+)==([\w.]+)$", dep)
        if match:
            pins[match[1]] = match[2]
    return pins


def test_dockerfile_pins_match_pyproject():
    pins = _pins()
    assert {"torch", "torchvision", "torchaudio"} <= set(pins)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    pinned_in_docker = dict(re.findall(r'"([a-z]+)==([\w.]+)"', dockerfile))
    assert pinned_in_docker, "the Dockerfile pins nothing"
    for name, version in pinned_in_docker.items():
        assert pins.get(name) == version, f"{name}=={version} in the Dockerfile, {pins.get(name)} in pyproject.toml"


def test_dockerfile_installs_the_project_and_uses_the_cli():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"pip install .*-e \"?\.", dockerfile)
    assert 'ENTRYPOINT ["vp-lightning"]' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored
