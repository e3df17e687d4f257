"""Where the app runs: Hugging Face Spaces' ZeroGPU (the `spaces` package, imported before torch as
ZeroGPU asks: it patches torch's CUDA calls), GPU tasks, and the clock the page reads.

`app/__init__.py` imports this module first, so any `import app.<module>` honours that order.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable

try:
    import spaces
except ImportError:
    spaces = None

import torch


def clock(device: torch.device) -> float:
    """Host time after the device finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timing_method(device: torch.device) -> str:
    if device.type == "cuda":
        warm_up = "per model and mode in each ZeroGPU worker process" if ON_ZEROGPU else "per model and mode"
        return f"CUDA-synchronised wall clock on {torch.cuda.get_device_name(device)}, after one warm-up {warm_up}"
    return "CPU wall clock (time.perf_counter), after one warm-up per model and mode"


# ZeroGPU (a Space with SPACES_ZERO_GPU=true) lends a GPU only inside @spaces.GPU calls, which it runs in a
# forked worker process: whatever such a call changes (a model it loads, a flag it sets) is lost when it
# returns, arguments and results cross by pickle, and the main process sees CUDA only as an emulation.
# So models load in the main process, before the call, and GPU calls only run them.
ON_ZEROGPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_task(duration_s: int) -> Callable[[Callable], Callable]:
    """Decorate a handler that runs models: `@spaces.GPU(duration=duration_s)` where the `spaces`
    package is installed (a no-op outside ZeroGPU), the handler itself elsewhere.  Such a handler
    must find its models loaded (ModelRegistry.ready), never load them."""
    if spaces is None:
        return lambda function: function
    return spaces.GPU(duration=duration_s)


def machine_description(device: torch.device) -> str:
    """The machine a measurement ran on, as benchmarks and recordings name it."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
