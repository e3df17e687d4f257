"""What Spaces and Docker read from this repository: a wrong pin here breaks a deploy, not a test run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLIP_L_336 = "openai/clip-vit-large-patch14-336"


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with Space front matter"
    return yaml.safe_load(match.group(1))


def pinned_requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, rest = line.partition("==")
            assert rest, f"requirements.txt line is not pinned with ==: {line!r}"
            pins.setdefault(name.strip().lower(), rest.split(";")[0].strip())
    return pins


def test_space_front_matter_matches_the_pins():
    meta = front_matter()
    pins = pinned_requirements()
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == pins["gradio"]
    assert (ROOT / meta["app_file"]).is_file()
    # transformers 5.21+ needs Python 3.11: the Space must not run an older one.
    assert tuple(int(part) for part in str(meta["python_version"]).split(".")) >= (3, 11)
    assert meta["suggested_hardware"]
    preloaded = meta["preload_from_hub"]
    assert all(model.startswith("llava-hf/") or model == CLIP_L_336 for model in preloaded)
    assert CLIP_L_336 in preloaded  # CDPruner's text tower: no download on a visitor's first CDPruner turn


def test_runtime_requirements_are_pinned():
    pins = pinned_requirements()
    for package in ("torch", "transformers", "gradio", "gradio_client", "plotly", "pillow", "numpy", "av", "decord"):
        assert package in pins, f"{package} is not pinned in requirements.txt"


def test_dockerfile_runs_the_app_as_a_user_on_all_interfaces():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.M)
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert '"0.0.0.0"' in dockerfile and "app.py" in dockerfile
    if "ubuntu24.04" in dockerfile and "--uid 1000" in dockerfile:  # those images already have "ubuntu", uid 1000
        assert dockerfile.index("userdel --remove ubuntu") < dockerfile.index("useradd")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_the_page_imports_no_trainer_or_benchmark_and_spaces_comes_before_torch():
    """`import app.ui` is what a Space runs first: it must not drag in the projector trainer or the
    benchmarks, and on ZeroGPU `spaces` must be imported before torch, whatever module comes first."""
    pytest.importorskip("spaces", reason="the spaces package (requirements-test.txt) is not installed")
    code = (
        "import sys, app.ui; names = list(sys.modules); "
        "print([n for n in names if n.startswith(('visionzip.tune', 'bench'))]); "
        "print(names.index('spaces') < names.index('torch'))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[]", "True"]
