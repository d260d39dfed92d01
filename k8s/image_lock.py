"""requirements.lock: constraints.txt's pins of what userrep needs at run time, with the sha256 of
each file the image installs, so the Dockerfile's `pip install --require-hashes` refuses any other
file (`make image-lock`; run with the .venv's interpreter, whose metadata gives the closure).

    python k8s/image_lock.py WHEELS_DIR [TORCH_WHEEL] > requirements.lock

WHEELS_DIR: what `pip download --no-deps` fetched for the pins (linux x86_64, CPython 3.11, as the
image); TORCH_WHEEL: the CPU build (torch==2.13.0+cpu from PyTorch's CPU index), pinned by its file.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

# What builds userrep itself in the image (pyproject.toml's build-system; pip leaves them out of
# constraints.txt): installed from the lock too, so the build runs without build isolation.
BUILD_PINS = {"setuptools": "84.2.1", "wheel": "0.48.0"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def name_version(file: Path) -> tuple[str, str]:
    stem = file.name.removesuffix(".tar.gz").removesuffix(".zip")
    name, version = (stem.split("-")[:2]) if file.suffix == ".whl" else stem.rsplit("-", 1)
    return normalized(name), version


def runtime_closure(root: str = "userrep") -> set[str]:
    """The distributions ``root`` needs at run time (its extras' and the dev extra's left out),
    read from the installed metadata of this interpreter's environment (`make install`'s)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    seen: set[str] = set()
    done: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            key = (normalized(req.name), frozenset(req.extras))
            seen.add(key[0])
            if key not in done:  # a package once per set of extras asked of it
                done.add(key)
                todo.append(key)
    return seen


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(wheels: Path, torch_wheel: Path | None, constraints: Path = Path("constraints.txt")) -> str:
    pins, needed = {}, runtime_closure()
    for line in constraints.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            if normalized(name) in needed:  # not the test tools (the dev extra)
                pins[normalized(name)] = version
    pins.update(BUILD_PINS)
    files = {name_version(f)[0]: f for f in sorted(wheels.iterdir())}
    if torch_wheel is not None:
        files["torch"] = torch_wheel
    missing = sorted(set(pins) - set(files))
    if missing:
        raise SystemExit(f"{wheels}: no file for {', '.join(missing)}")
    lines = ["# constraints.txt's pins with their files' hashes (make image-lock); the image installs only these."]
    for name in sorted(pins):
        version = name_version(files[name])[1] if name == "torch" else pins[name]
        if name != "torch" and name_version(files[name])[1] != version:
            raise SystemExit(f"{files[name].name}: expected {name}=={version}")
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha256(files[name])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None), end="")
