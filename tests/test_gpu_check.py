"""The GPU check (scripts/gpu_check.sh, bench/gpu_check.py, gpu_plan.py, gpu_steps.py, gpu_measure.py) and its
wheel helper, kept from rotting while no GPU is lent: the dry run goes through the same script and steps on
the CPU with the tiny model, with a test-only step that outlives its box in the middle."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import recording
from bench import gpu_check, gpu_plan, gpu_steps

REPO = Path(__file__).resolve().parents[1]
STEPS = [step.name for step in gpu_plan.STEPS]
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what a device call brings back from $OUT
OVERRUN_BOX_S = 3


def script_env(out: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_COMMIT": "cafe1234", **extra}


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    command = ["bash", "scripts/gpu_check.sh", "--dry-run", "--test-overrun", str(OVERRUN_BOX_S)]
    done = subprocess.run(command, cwd=REPO, env=script_env(out), capture_output=True, text=True, timeout=480)
    results = json.loads((out / gpu_check.RESULT_JSON).read_text()) if (out / gpu_check.RESULT_JSON).exists() else {}
    return done, out, results


def test_the_dry_run_prints_the_plan_first_then_every_step_reports_in_a_flat_folder(dry_run):
    done, out, results = dry_run
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # 1: the overrun step timed out
    first = done.stdout.splitlines()[:2]
    assert first[0].startswith("[gpu-check] plan: 420 s from the script's start") and "limit s" in first[1]
    plan = {row["step"]: row for row in results["meta"]["plan"]}
    assert list(plan) == ["env", "overrun", *STEPS[1:]] and plan["overrun"]["box_s"] == OVERRUN_BOX_S
    assert sum(row["box_s"] for row in plan.values()) <= 420
    for name in STEPS:
        assert re.search(rf"^\[gpu-check\]   {name} +\d+ +{plan[name]['box_s']}  \S", done.stdout, re.M), name
    files = sorted(path.name for path in out.iterdir())
    assert all((out / name).is_file() and SAFE_NAME.match(name) for name in files) and len(files) <= 8
    assert {gpu_check.RESULT_JSON, gpu_check.RESULT_MD, "gpu-check.log", "pytest-gpu.txt"} <= set(files)
    assert "gpu-check-console.txt" in files
    assert results["meta"]["dry_run"] is True and results["meta"]["commit"] == "cafe1234"
    for name in STEPS:
        record = results["steps"][name]
        assert record["status"] == "ok", (name, record.get("error"))
        assert record["seconds"] <= record["time_box_s"]
    table = (out / gpu_check.RESULT_MD).read_text()
    for name in STEPS:
        assert re.search(rf"^\| {name} \| ok \| [\d.]+ \| \d+ \| [\d.]+ \|", table, re.M), name


def test_a_step_that_overruns_is_killed_with_its_children_and_the_later_steps_still_report(dry_run):
    _, out, results = dry_run
    record = results["steps"]["overrun"]
    assert record["status"] == "timeout" and f"box of {OVERRUN_BOX_S} s" in record["error"]
    assert OVERRUN_BOX_S <= record["seconds"] < OVERRUN_BOX_S + 10
    assert not alive(record["data"]["pid"]) and not alive(record["data"]["child_pid"])  # the step and its child
    later = list(results["steps"])[list(results["steps"]).index("overrun") + 1 :]
    assert later == STEPS[1:] and all(results["steps"][name]["status"] == "ok" for name in later)
    assert re.search(r"^\| overrun \| timeout \|", (out / gpu_check.RESULT_MD).read_text(), re.M)


def test_the_dry_run_records_what_each_step_measured(dry_run, tmp_path):
    _, out, results = dry_run
    steps = results["steps"]
    env = steps["env"]["data"]
    assert env["torch"]["cuda_available"] is False and env["imports"]["direct"]
    assert all(pin["ok"] for pin in env["carried_pins"].values())
    assert env["image_processor"]["class"].startswith("LlavaNext") and "refused" in env["network"]
    pytest_record = steps["pytest"]["data"]
    assert pytest_record["counts"]["failed"] == 0 and pytest_record["counts"]["skipped"] >= 1
    assert any("CUDA" in test["message"] for test in pytest_record["tests"] if test["outcome"] == "skipped")
    assert "SKIPPED [1] tests/test_gpu.py" in (out / "pytest-gpu.txt").read_text()
    phases = steps["phases"]["data"]
    assert [row["mode"] for row in phases["results"]["rows"]] == ["full", "160"]  # the dry run: the smallest budget
    assert len(phases["targets_issue16"]) == 4
    stock, profiled = phases["profile"]  # the dry run profiles full and FastV; the GPU run every mode
    assert [stock["mode"], profiled["mode"]] == ["full", "fastv:320"] and stock["layer_tokens"] is None
    assert profiled["backends"] and profiled["kernel_ms"] is None  # which SDPA kernels; no device time on a CPU
    assert profiled["layer_tokens"][0] == 2928 and profiled["layer_tokens"][-1] == 320  # FastV's layers below K, above
    others = steps["others"]["data"]["results"]["rows"]
    assert [row["mode"] for row in others] == ["full", "320", "random:320", "fastv:320"]
    families = steps["families"]["data"]  # every method that runs on the family, at its preset nearest the middle
    qwen, onevision = (families[name]["results"]["rows"] for name in ("qwen2_5_vl", "llava_onevision"))
    assert [(row["mode"], row["visual_tokens"]) for row in qwen] == [
        ("full", 576), ("64", 64), ("visionzip_dominant:128", 128), ("random:128", 128), ("pool:144", 144),
        ("divprune:128", 128), ("vispruner:128", 128), ("fastv:128", 576),
    ]  # fmt: skip
    assert [(row["mode"], row["visual_tokens"]) for row in onevision] == [
        ("full", 3699), ("160", 160), ("visionzip_dominant:320", 320), ("random:320", 320), ("pool:405", 405),
        ("divprune:320", 320), ("vispruner:320", 320), ("fastv:320", 3699),
    ]  # fmt: skip
    for name in ("qwen2_5_vl", "llava_onevision"):
        assert list(families[name]["refused"]) == ["cdpruner"] and "CDPruner" in families[name]["refused"]["cdpruner"]
        rows = families[name]["results"]["rows"]
        assert all(row["ttft_ms"] > 0 and row["tower_gflop"] > 0 for row in rows)
        assert rows[-1]["lm_tokens_by_layer"].startswith("2 x ")  # FastV's own work counted, as on LLaVA-NeXT
    rows = steps["conversation"]["data"]["report"]["rows"]
    assert [row["turn"] for row in rows] == [1, 2, 3] and rows[0]["visionzip_visual_tokens"] < 2928
    replayed = recording.read(out / steps["conversation"]["data"]["recording"], tmp_path / "media")  # replayable
    assert len(replayed.turns) == 3 and all(turn.tokens["left"] and turn.tokens["right"] for turn in replayed.turns)
    registry = steps["registry"]["data"]
    loaded = [event["kept"] for event in registry["side_by_side"]]
    assert len(loaded[0]) == 1 and len(loaded[1]) == 2  # both fit: the registry kept both
    assert "skipped" in registry["tight"]  # the registry makes room on CUDA only
    table = (out / gpu_check.RESULT_MD).read_text()
    assert "| full | 2928 |" in table and "FLOP bound" in table and "| issue 16 target |" in table
    assert "first-token KL" in table and "kernels / wall" in table
    assert "### qwen2_5_vl" in table and "- cdpruner refuses llava_onevision: CDPruner" in table


def test_fastvs_row_counts_the_work_of_its_own_layers(dry_run):
    """FastV keeps 2928 placeholders in the prompt: its token ratio is the layer-mean of the lengths its LM ran
    on (layers below K: the whole context, from K on: the kept tokens), not 1.00x."""
    _, _, results = dry_run
    rows = {row["mode"]: row for row in results["steps"]["others"]["data"]["results"]["rows"]}
    fastv, full, layers = rows["fastv:320"], rows["full"], 4  # the tiny model's LM layers; FastV's K = 2
    kept = full["context_tokens"] - 2928 + 320
    assert fastv["lm_tokens_by_layer"] == f"2 x {full['context_tokens']} + 2 x {kept}"
    expected = full["context_tokens"] * layers / (2 * full["context_tokens"] + 2 * kept)
    assert fastv["token_ratio"] == pytest.approx(expected) and fastv["token_ratio"] > 1.5
    assert 1.0 < fastv["ttft_speedup_flop_bound"] < rows["random:320"]["ttft_speedup_flop_bound"]


def test_the_correctness_checks_compare_selections_and_first_tokens(dry_run):
    _, _, results = dry_run
    correct = results["steps"]["correct"]["data"]
    for compared in ("devices", "precision"):
        assert [row["mode"] for row in correct[compared]["rows"]] == ["full", "320", "fastv:320"]
    assert all(row["same_selection"] and row["max_abs_logit_diff"] == 0 for row in correct["devices"]["rows"])
    assert [row["overlap"] for row in correct["devices"]["rows"]] == [None, 1.0, 1.0]  # full keeps every patch
    for family, smallest, fastv in (("qwen2_5_vl", "64", "fastv:128"), ("llava_onevision", "160", "fastv:320")):
        rows = correct["families"][family]["rows"]
        assert [row["mode"] for row in rows] == ["full", smallest, fastv]
        assert all(row["same_selection"] and row["max_abs_logit_diff"] == 0 for row in rows)
        assert [row["overlap"] for row in rows] == [None, 1.0, 1.0]
    full, *reduced = correct["precision"]["rows"]
    assert full["overlap"] is None and all(0.0 <= row["overlap"] <= 1.0 for row in reduced)
    kl = [row["kl_fp32_bf16"] for row in correct["precision"]["rows"]]
    assert all(math.isfinite(value) and value >= -1e-9 for value in kl) and max(kl) > 0  # bf16 rounds: not zero


def test_the_check_imports_nothing_the_gpu_machine_lacks(dry_run):
    """Every module-level import of the project files the steps load is on the GPU machine or carried."""
    _, _, results = dry_run
    imports = results["steps"]["env"]["data"]["imports"]
    assert imports["missing_on_gpu"] == [] and imports["carried_requires_missing_on_gpu"] == []
    assert imports["carried_requires_known_too_old"] == []
    assert {"torch", "transformers", "av", "plotly"} <= set(imports["direct"]) and "gradio" not in imports["direct"]


def test_a_stop_signal_ends_the_running_step_with_its_children_and_writes_the_results(tmp_path):
    command = [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)]
    command += ["--steps", "overrun", "--test-overrun", "60"]
    parent = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = tmp_path / "gpu-check.log", time.monotonic() + 30
    while not (log.exists() and "overrun: child pid" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    child_pid = int(re.search(r"overrun: child pid (\d+)", log.read_text()).group(1))
    written = json.loads((tmp_path / gpu_check.RESULT_JSON).read_text())  # before the step ends: results so far
    assert written["steps"]["overrun"]["status"] == "running" and written["meta"]["plan"]
    parent.send_signal(signal.SIGTERM)
    output, _ = parent.communicate(timeout=20)
    assert parent.returncode == 128 + signal.SIGTERM, output
    record = json.loads((tmp_path / gpu_check.RESULT_JSON).read_text())["steps"]["overrun"]
    assert record["status"] == "stopped" and "ended with its children" in record["error"]
    assert not alive(child_pid)


@pytest.mark.parametrize("wheel", ["broken-1.0-py3-none-any.whl", None])
def test_a_failed_wheel_install_stops_the_call(tmp_path, wheel):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    if wheel:
        (wheels / wheel).write_bytes(b"not a zip file")
    out = tmp_path / "out"
    env = script_env(out, GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(tmp_path / "site"))
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "STOPPED" in done.stdout and "transformers 5.17" in done.stdout
    assert done.stdout.startswith("[gpu-check] plan: 400 s") and not (out / gpu_check.RESULT_JSON).exists()


def test_boxes_share_the_time_left_by_the_estimates_and_follow_the_plan():
    steps, estimate = gpu_plan.STEPS, gpu_plan.estimates(False, gpu_plan.STEPS)
    rows = gpu_plan.plan(steps, 300, estimate, {})
    multiple = 300 / sum(estimate.values())
    assert [row["box_s"] for row in rows] == [round(estimate[step.name] * multiple) for step in steps]
    left = 300.0  # each step using its whole box leaves each later one the box the plan printed
    for index, row in enumerate(rows):
        box = gpu_plan.box_for(index, steps, left, estimate, {})
        assert box == pytest.approx(row["box_s"], abs=0.5)
        left -= box
    # the first step ends at half its box: every later box grows by its share of the time left over
    on_time = gpu_plan.box_for(1, steps, 300.0 - rows[0]["box_s"], estimate, {})
    early = gpu_plan.box_for(1, steps, 300.0 - rows[0]["box_s"] / 2, estimate, {})
    share = estimate[steps[1].name] / sum(estimate[step.name] for step in steps[1:])
    assert early - on_time == pytest.approx(rows[0]["box_s"] / 2 * share) and early > on_time + 0.5
    fixed = gpu_plan.plan(steps, 300, estimate, {"registry": 150})
    assert fixed[-1]["box_s"] == 150 and sum(row["box_s"] for row in fixed) == pytest.approx(300, abs=len(steps))


def test_the_default_gpu_plan_fits_its_budget_with_room_to_spare():
    estimate = gpu_plan.estimates(False, gpu_plan.STEPS)
    left = gpu_check.BUDGET_S - 60 - gpu_plan.FINAL_S  # the wheel install at its limit
    assert sum(estimate.values()) * gpu_plan.SAFETY <= left
    assert estimate["registry"] >= 60 and gpu_check.RUN_TIMEOUT_S >= gpu_check.BUDGET_S + 15  # the backstop's margin
    call = json.loads(
        subprocess.run(
            [sys.executable, "-m", "bench.gpu_check", "--device-call"], cwd=REPO, capture_output=True, text=True
        ).stdout
    )
    assert re.fullmatch(r"GPU_CHECK_COMMIT=\S+ bash scripts/gpu_check\.sh", call["command"])
    assert call["carry"] == [".whl"] and call["timeout_s"] <= 600


def test_steps_left_without_time_are_recorded_not_run(tmp_path):
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path), "--steps", "env", "registry", "--budget-s", "20"])
    record = gpu_check.run_in_budget(args, gpu_check.chosen_steps(args), 0, tmp_path, tmp_path)
    assert record["status"] == "no-time" and "share" in record["note"]


def test_the_plans_flop_counts_are_bench_phases_counts():
    import torch

    from bench.gpu_measure import fastv_prefill_gflop
    from bench.phases import build_wide, prefill_flops, tower_flops

    config = build_wide(32, torch.bfloat16, torch.device("meta"))[0].config
    assert tower_flops(config.vision_config, 5) / 1e12 == pytest.approx(gpu_plan.TOWER_TFLOP, rel=1e-3)
    for mode, context in {"full": 2981, "640": 693, "320": 373, "160": 213}.items():
        assert prefill_flops(config.text_config, context) / 1e12 == pytest.approx(
            gpu_plan.PREFILL_TFLOP[mode], rel=1e-3
        )
    fastv = fastv_prefill_gflop(config.text_config, 2, 2981, 373) / 1e3
    assert fastv == pytest.approx(gpu_plan.PREFILL_TFLOP["fastv:320"], rel=1e-3)


@pytest.mark.parametrize("family", list(gpu_plan.FAMILY_SHAPES))
def test_the_plans_family_shapes_are_bench_phases_counts(family):
    """The families step's counted work: the towers' and prefills' TFLOP, layers and bf16 GB of the models it
    builds, from bench.phases' own builders (on the meta device) and FLOP formulas."""
    import torch

    from bench import phases
    from bench.gpu_measure import fastv_prefill_gflop

    build = {"qwen2_5_vl": phases.build_wide_qwen, "llava_onevision": phases.build_wide_onevision}[family]
    model, processor = build(phases.FULL_DEPTH[family], torch.bfloat16, torch.device("meta"))
    shape, config = gpu_plan.FAMILY_SHAPES[family], model.config
    assert sum(p.numel() for p in model.parameters()) * 2 / 1e9 == pytest.approx(shape.gb, abs=0.05)
    assert (shape.lm_layers, shape.tower_layers) == (28, config.vision_config.num_hidden_layers)
    names = [name for name in shape.prefill_tflop if ":" not in name][1:]
    modes = phases.prepare_modes(
        phases.Subject(model, processor, ""), names, torch.device("cpu"), torch.float32, family
    )
    assert phases.vision_gflop(config, modes[0])["tower_gflop"] / 1e3 == pytest.approx(shape.tower_tflop, rel=1e-3)
    for mode in modes:
        context = mode.visual_tokens + mode.text_tokens
        assert phases.prefill_flops(config.text_config, context) / 1e12 == pytest.approx(
            shape.prefill_tflop[mode.name], rel=1e-3
        )
    full, middle = modes[0], modes[2]
    fastv = fastv_prefill_gflop(
        config.text_config, 2, full.visual_tokens + full.text_tokens, full.text_tokens + middle.visual_tokens
    )
    assert fastv / 1e3 == pytest.approx(shape.prefill_tflop[f"fastv:{middle.name}"], rel=1e-3)


@pytest.mark.parametrize("family", list(gpu_plan.FAMILY_SHAPES))
def test_the_families_step_runs_every_method_the_library_lets_run(family):
    from bench.gpu_measure import family_budgets, methods_on
    from visionzip.budget import PRESETS

    runs, refused = methods_on(family)
    assert runs == gpu_plan.FAMILY_OTHERS and list(refused) == ["cdpruner"]  # the plan counts these modes
    names = family_budgets(family, runs, "middle")
    assert len(["full", *names]) == len(gpu_plan.family_modes(family))
    middle = sorted(PRESETS[family], reverse=True)[1]
    assert names[0] == str(middle) and [name.split(":")[0] for name in names[1:]] == runs


def test_fastv_prefill_flops_by_hand():
    """Per layer 2*n*W (W: q, k, v, o and the MLP's weights) + 2*n*(n+1)*h of causal attention, one LM head."""
    from types import SimpleNamespace

    from bench.gpu_measure import fastv_prefill_gflop

    config = SimpleNamespace(
        hidden_size=8, intermediate_size=16, num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=11,
    )  # fmt: skip
    weights = 2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16

    def layer(n: int) -> int:
        return 2 * n * weights + 2 * n * (n + 1) * 8

    expected = 2 * layer(100) + 3 * layer(30) + 2 * 8 * 11
    assert fastv_prefill_gflop(config, 2, 100, 30) * 1e9 == pytest.approx(expected)


def test_module_level_imports_skip_lazy_and_optional_ones(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "import os, numpy.linalg\nfrom PIL import Image\nfrom . import sibling\n"
        "try:\n    import spaces\nexcept ImportError:\n    spaces = None\n"
        "if os.name == 'posix':\n    import av\n"
        "def read():\n    import decord\n"
    )
    assert gpu_steps.module_level_imports(source) == {"os", "numpy", "PIL", "av"}


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


def test_the_gpu_scripts_parse_and_name_only_files_that_exist():
    for script in ("scripts/gpu_check.sh", "scripts/gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)
        text = (REPO / script).read_text()
        for path in re.findall(r"\b(?:bench|scripts|tests|app|visionzip)/[\w./-]+\.(?:py|sh)\b", text):
            assert (REPO / path).exists(), (script, path)
        for module in re.findall(r"-m (bench\.\w+)", text):
            assert (REPO / (module.replace(".", "/") + ".py")).exists(), (script, module)
        assert "--python-version 3.12" in text or script.endswith("gpu_check.sh")  # the GPU machine's Python
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

    assert sorted(gpu_check.OTHER_METHODS) == sorted(set(visionzip.METHODS) - {"visionzip"})


def test_a_step_process_refuses_connections_beyond_this_machine():
    probe = (
        "import socket\nfrom bench.gpu_steps import refuse_network\nrefuse_network()\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "socket.create_connection(server.getsockname()).close()\n"  # this machine: allowed
        "try:\n    socket.create_connection(('192.0.2.1', 80), timeout=5)\n"
        "except OSError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "allows no network: a connection to 192.0.2.1 was refused" in done.stdout, done.stderr
