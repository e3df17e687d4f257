"""What Hugging Face ZeroGPU demands of the code, checked without ZeroGPU: no CUDA call while the
app is imported and its page is built; and the whole app served under an emulation of ZeroGPU's
process model (tests/zerogpu/spaces.py: every GPU call in a forked worker, results pickled back,
its memory lost), where models must load in the server, before the GPU calls that run them."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from app_helpers import ENDLESS, browser_page, expected_visual_tokens, free_port
from conftest import random_image
from gradio_client import Client, handle_file
from test_app_video import write_clip
from test_reliability import assert_answered, questions

from app.models import TINY_15_LABEL, TINY_LABEL
from app.video import DEFAULT_FRAMES  # noqa: F401
from visionzip import preset_budget

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    path = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env_code = f"import sys; sys.path[:0] = {path!r}\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, timeout=300)


def test_importing_the_app_and_building_the_page_touch_no_cuda():
    result = run_python(
        """
        import torch

        def refuse(*args, **kwargs):
            raise AssertionError("CUDA was touched at import time")

        for name in ("_lazy_init", "init", "is_available", "device_count", "get_device_name", "synchronize", "mem_get_info"):
            setattr(torch.cuda, name, refuse)
        import app.ui, app.models, app.turn, visionzip, visionzip.video, visionzip.tune
        from app.models import ModelRegistry
        app.ui.build_demo(ModelRegistry(device="cpu"))
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_outside_zerogpu_the_real_spaces_package_leaves_the_handlers_as_they_are():
    """Every Space has `spaces` installed, dedicated GPU Spaces included: there the app must run as
    anywhere else, its GPU tasks plain functions in the server process."""
    pytest.importorskip("spaces", reason="the spaces package (requirements-test.txt) is not installed")
    result = run_python(
        """
        import os
        os.environ.pop("SPACES_ZERO_GPU", None)
        import spaces, app.hosting

        def handler():
            return 1

        assert app.hosting.spaces is spaces and "site-packages" in spaces.__file__ and not app.hosting.ON_ZEROGPU
        assert app.hosting.gpu_task(30)(handler) is handler
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# -- the app on an emulated ZeroGPU Space (tests/zerogpu/spaces.py) ---------------------------------
@dataclass
class Space:
    url: str
    log: Path
    pid: int  # the server process: where every model must load

    def events(self, kind: str) -> list[tuple[str, int]]:
        """(what, pid) of each recorded GPU call ("gpu") or model load ("load")."""
        lines = [line.split("\t") for line in self.log.read_text().splitlines()] if self.log.exists() else []
        return [(what, int(pid)) for event, what, pid in lines if event == kind]

    def assert_loads_only_in_the_server(self) -> None:
        loads, calls = self.events("load"), self.events("gpu")
        assert loads and all(pid == self.pid for _, pid in loads), loads
        assert calls and all(pid != self.pid for _, pid in calls), calls


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Iterator[Space]:
    """app.py served as on ZeroGPU: SPACES_ZERO_GPU=true and the emulated `spaces` package, which
    runs every GPU call in a forked worker process."""
    folder = tmp_path_factory.mktemp("zerogpu")
    log = folder / "log.tsv"
    port = free_port()
    env = dict(os.environ, SPACES_ZERO_GPU="true", ZEROGPU_EMULATOR_LOG=str(log))
    output = folder / "server.log"
    with output.open("w") as sink:  # a file, not a pipe: a full pipe would stall the server
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "zerogpu" / "serve.py"), str(port), str(folder)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, workers included
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"the app did not start:\n{output.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the app did not answer within 300 s"
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield Space(url, log, server.pid)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_a_conversation_on_zerogpu_loads_in_the_server_and_runs_in_gpu_workers(space, tiny_next, tmp_path):
    _, processor = tiny_next
    picture = tmp_path / "picture.png"
    random_image(480, 640, seed=5).save(picture)
    full, reduced_320 = expected_visual_tokens(processor, 640, 480)

    # app.py preloads the default model before serving: ZeroGPU packs weights loaded at start-up
    assert space.events("load") == [(TINY_LABEL, space.pid)] and space.events("gpu") == []

    client = Client(space.url, verbose=False)
    client.predict(image=handle_file(str(picture)), api_name="/set_media")
    for turn, question in enumerate(["What is it?", "And the colours?"], start=1):
        left, right, stats, _ = client.submit(question, api_name="/ask").result(timeout=300)
        assert_answered(stats, turn, (full, reduced_320))
    # the conversation came back from the workers: each turn saw the previous ones
    assert questions(left) == questions(right) == ["What is it?", "And the colours?"]

    client.predict(right_mode="VisionZip 160", api_name="/set_mode")
    client.predict(TINY_LABEL, TINY_15_LABEL, api_name="/set_model")  # a model loaded on demand, in the server
    left, right, stats, _ = client.submit("Once more?", api_name="/ask").result(timeout=300)
    assert_answered(stats, 3, (full, preset_budget("llava", 64).per_tile))  # 160 maps to LLaVA-1.5's 64
    assert len(questions(left)) == 3

    assert (TINY_15_LABEL, space.pid) in space.events("load")
    assert [what for what, _ in space.events("gpu")].count("ask_on_gpu") == 3
    space.assert_loads_only_in_the_server()


@pytest.mark.browser
def test_overlay_stop_and_filmstrip_on_zerogpu(space, tmp_path):
    """What VisionZip keeps comes back from a GPU worker (its tensors pickled), the Stop button
    reaches a turn running in another process, and a clip's frames are selected there too."""
    picture = tmp_path / "picture.png"
    random_image(336, 336, seed=6).save(picture)
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=8)
    with browser_page(space.url) as page:
        page.set_input_files("#media input[type=file]", str(picture))
        page.locator("#overlay img").wait_for()
        assert "visual tokens" in page.locator("#overlay-legend").inner_text()

        page.locator("#left-model input").click()
        page.get_by_role("option", name=ENDLESS, exact=True).click()
        page.wait_for_function(f"document.querySelector('#left-header').innerText.includes('{ENDLESS}')")
        page.fill("#message textarea", "Talk.")
        page.press("#message textarea", "Enter")
        page.wait_for_function("document.querySelector('#left-chat [data-testid=bot]')?.innerText.includes('la la')")
        page.click("#stop")  # the talking side ends with what it said; the other side does not start
        page.wait_for_function(
            "document.querySelector('#right-chat [data-testid=bot]')?.innerText.includes('stopped')", timeout=60_000
        )
        assert "visual +" in page.locator("#left-chat [data-testid=bot]").inner_text()

        page.set_input_files("#video input[type=file]", str(clip))
        page.locator("#filmstrip img").first.wait_for()
        assert page.locator("#filmstrip img").count() == DEFAULT_FRAMES

    calls = [what for what, _ in space.events("gpu")]
    assert "select_tokens" in calls and "ask_on_gpu" in calls
    assert (ENDLESS, space.pid) in space.events("load")
    space.assert_loads_only_in_the_server()


def test_a_turn_abandoned_on_zerogpu_ends_in_its_worker_and_frees_the_gpu(space, tmp_path):
    """A visitor who leaves mid-answer: the worker's turn is closed (ZeroGPU closes the task's
    generator at its next yield) and the next visitor's turn runs."""
    picture = tmp_path / "picture.png"
    random_image(336, 336, seed=7).save(picture)
    leaving = Client(space.url, verbose=False)
    leaving.predict(image=handle_file(str(picture)), api_name="/set_media")
    leaving.predict(ENDLESS, TINY_LABEL, api_name="/set_model")
    job = leaving.submit("Talk.", api_name="/ask")
    deadline = time.monotonic() + 120
    while not any("la la" in str(output) for output in job.outputs()):  # the endless answer is streaming
        assert time.monotonic() < deadline and not job.done(), "the endless answer did not start"
        time.sleep(0.2)
    job.cancel()

    staying = Client(space.url, verbose=False)
    staying.predict(image=handle_file(str(picture)), api_name="/set_media")
    left, right, stats, _ = staying.submit("What is it?", api_name="/ask").result(timeout=120)
    assert questions(left) == ["What is it?"] and all(record["error"] is None for record in stats)
    space.assert_loads_only_in_the_server()
