"""The GPU check (scripts/gpu_check.sh, bench/gpu_check.py) and its wheel helper, kept from rotting while no
GPU is lent: the dry run goes through the same script and steps on the CPU with the tiny model."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]
STEPS = [step.name for step in gpu_check.STEPS]
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what a device call brings back from $OUT


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    results = json.loads((out / gpu_check.RESULT_JSON).read_text()) if (out / gpu_check.RESULT_JSON).exists() else {}
    return done, out, results


def test_the_dry_run_passes_every_step_and_writes_a_flat_folder(dry_run):
    done, out, results = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    assert all((out / name).is_file() and SAFE_NAME.match(name) for name in files) and len(files) <= 8
    assert {gpu_check.RESULT_JSON, gpu_check.RESULT_MD, "gpu-check.log", "pytest-gpu.txt"} <= set(files)
    assert "gpu-check-console.txt" in files
    assert results["meta"]["dry_run"] is True and list(results["steps"]) == STEPS
    for name, record in results["steps"].items():
        assert record["status"] == "ok", (name, record.get("error"))
        assert record["seconds"] <= record["time_box_s"]
    table = (out / gpu_check.RESULT_MD).read_text()
    for name in STEPS:
        assert re.search(rf"^\| {name} \| ok \| [\d.]+ \| \d+ \|", table, re.M), name


def test_the_dry_run_records_what_each_step_measured(dry_run):
    _, out, results = dry_run
    steps = results["steps"]
    env = steps["env"]["data"]
    assert env["torch"]["cuda_available"] is False and env["imports"]["direct"]
    assert all(pin["ok"] for pin in env["carried_pins"].values())
    pytest_record = steps["pytest"]["data"]
    assert pytest_record["counts"]["failed"] == 0 and pytest_record["counts"]["skipped"] >= 1
    assert any("CUDA" in test["message"] for test in pytest_record["tests"] if test["outcome"] == "skipped")
    assert "SKIPPED [1] tests/test_gpu.py" in (out / "pytest-gpu.txt").read_text()
    expected_modes = {
        "visionzip": ["full", *gpu_check.BUDGETS],
        "others": ["full", "320", *(f"{name}:320" for name in gpu_check.OTHER_METHODS)],
    }
    for method in gpu_check.METHODS:
        run = steps["phases"]["data"][method]
        assert [row["mode"] for row in run["results"]["rows"]] == expected_modes[method]
        assert len(run["targets_issue16"]) == 4 and all("ttft_speedup_flop_bound" in r for r in run["results"]["rows"])
    rows = steps["conversation"]["data"]["report"]["rows"]
    assert [row["turn"] for row in rows] == [1, 2, 3] and rows[0]["visionzip_visual_tokens"] < 2928
    registry = steps["registry"]["data"]
    loaded = [event["kept"] for event in registry["side_by_side"]]
    assert len(loaded[0]) == 1 and len(loaded[1]) == 2  # both fit: the registry kept both
    assert "skipped" in registry["tight"]  # the registry makes room on CUDA only
    table = (out / gpu_check.RESULT_MD).read_text()
    assert "| full | 2928 |" in table and "FLOP bound" in table and "| issue 16 target |" in table


def test_the_check_imports_nothing_the_gpu_machine_lacks(dry_run):
    """Every module-level import of the project files the steps load is on the GPU machine or carried."""
    _, _, results = dry_run
    imports = results["steps"]["env"]["data"]["imports"]
    assert imports["missing_on_gpu"] == [] and imports["carried_requires_missing_on_gpu"] == []
    assert imports["carried_requires_known_too_old"] == []
    assert {"torch", "transformers", "av", "plotly"} <= set(imports["direct"]) and "gradio" not in imports["direct"]


def test_a_step_that_hangs_is_ended_at_its_time_box_and_keeps_what_it_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_STALL", "env")
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path)])
    started = time.monotonic()
    record = gpu_check.run_child(gpu_check.STEPS[0], args, tmp_path, tmp_path / "cache", box_s=3)
    assert record["status"] == "timeout" and "time box of 3 s" in record["error"]
    assert record["note"] == "stalled on purpose (GPU_CHECK_STALL)"
    assert time.monotonic() - started < 15


def test_steps_left_without_time_are_recorded_not_run(tmp_path):
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path), "--steps", "env", "registry"])
    assert gpu_check.run_in_budget(args, 1, 0.0, tmp_path, tmp_path)["status"] == "skipped"  # pytest: not chosen
    args.budget_s = 30  # env would leave registry less than its 20 s
    record = gpu_check.run_in_budget(args, 0, 0.0, tmp_path, tmp_path)
    assert record["status"] == "no-time" and "5 s" in record["note"]


def test_module_level_imports_skip_lazy_and_optional_ones(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "import os, numpy.linalg\nfrom PIL import Image\nfrom . import sibling\n"
        "try:\n    import spaces\nexcept ImportError:\n    spaces = None\n"
        "if os.name == 'posix':\n    import av\n"
        "def read():\n    import decord\n"
    )
    assert gpu_check.module_level_imports(source) == {"os", "numpy", "PIL", "av"}


def test_the_wheel_list_follows_requirements_txt():
    listed = subprocess.run(
        ["bash", "scripts/gpu_wheels.sh", "--list"],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    requirements = (REPO / "requirements.txt").read_text()
    transformers = re.search(r"^transformers==(\S+)", requirements, re.M).group(1)
    av_312 = re.search(r'^av==(\S+); python_version >= "3.12"', requirements, re.M).group(1)
    assert f"transformers=={transformers}" in listed and f"av=={av_312}" in listed
    assert [line.split("==")[0] for line in listed] == list(gpu_check.CARRIED)
    assert not any(name.startswith("gradio") for name in listed)


def test_the_gpu_script_parses_and_names_only_files_that_exist():
    for script in ("scripts/gpu_check.sh", "scripts/gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
        text = (REPO / script).read_text()
        for path in re.findall(r"\b(?:bench|scripts|tests|app|visionzip)/[\w./-]+\.(?:py|sh)\b", text):
            assert (REPO / path).exists(), (script, path)
        for module in re.findall(r"-m (bench\.\w+)", text):
            assert (REPO / (module.replace(".", "/") + ".py")).exists(), (script, module)
    for test in gpu_check.CUDA_TESTS:
        assert (REPO / test).exists()


def test_every_test_that_skips_without_cuda_is_run_by_the_check():
    cuda_only = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")
    files = [
        f"tests/{path.name}"
        for path in sorted((REPO / "tests").glob("test_*.py"))
        if cuda_only.search(path.read_text())
    ]
    assert files and set(files) <= set(gpu_check.CUDA_TESTS)


def test_the_check_benchmarks_every_registered_method():
    import visionzip
    from bench import gpu_check

    assert sorted(gpu_check.OTHER_METHODS) == sorted(set(visionzip.METHODS) - {"visionzip"})
