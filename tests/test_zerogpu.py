"""What Hugging Face ZeroGPU demands of the code, checked without ZeroGPU: no CUDA call while the
app is imported and its page is built, and the GPU work wrapped by `spaces.GPU` when `spaces` exists."""

import subprocess
import sys
import textwrap
from pathlib import Path

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
        import app.ui, app.models, app.chat, visionzip, visionzip.video, visionzip.tune
        from app.models import ModelRegistry
        app.ui.build_demo(ModelRegistry(device="cpu"))
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_gpu_work_is_wrapped_by_spaces_gpu_when_spaces_is_installed(tmp_path):
    (tmp_path / "spaces.py").write_text(
        textwrap.dedent(
            """
            wrapped = []

            def GPU(duration=60):
                def decorate(function):
                    wrapped.append(function.__name__)
                    return function
                return decorate
            """
        )
    )
    result = run_python(
        """
        import spaces
        import app.ui
        from app.models import ModelRegistry
        app.ui.build_demo(ModelRegistry(device="cpu"))
        print(sorted(set(spaces.wrapped)))
        """,
        extra_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wrapped = result.stdout.strip().splitlines()[-1]
    for handler in ("ask", "refresh_overlay"):
        assert f"'{handler}'" in wrapped, wrapped
