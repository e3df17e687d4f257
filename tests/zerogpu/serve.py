"""Serve app.py the way a ZeroGPU Space runs it, with the `spaces` emulator beside it (see spaces.py).

    SPACES_ZERO_GPU=true ZEROGPU_EMULATOR_LOG=log.tsv python tests/zerogpu/serve.py PORT FOLDER

The registry is the tests' FaultyRegistry (the tiny models plus one that talks until stopped, built
under FOLDER); each model load is recorded as "load<TAB>label<TAB>pid", and a load inside a GPU call
fails, since on ZeroGPU it would be lost when the call returns.
"""

import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests")]

import spaces  # noqa: E402  (the emulator, imported first as on a Space)
from app_helpers import FaultyRegistry  # noqa: E402

import app.models  # noqa: E402

PORT, FOLDER = sys.argv[1], Path(sys.argv[2])


class RecordingRegistry(FaultyRegistry):
    def __init__(self, extra: str | None = None, device: str = "auto", dtype: str = "auto") -> None:
        super().__init__(FOLDER)

    def _load(self, label: str, source: str):
        spaces.record("load", label, os.getpid())
        if spaces.IN_WORKER:
            raise AssertionError(f"{label} was loaded inside a GPU call, where ZeroGPU would lose it")
        return super()._load(label, source)


app.models.ModelRegistry = RecordingRegistry
sys.argv = ["app.py", "--port", PORT, "--max-new-tokens", "8"]
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
