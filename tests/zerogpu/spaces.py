"""A stand-in for the `spaces` package on a ZeroGPU Space, for tests: what ZeroGPU does to the code's
process model, without a GPU.

Like spaces 0.51 on ZeroGPU, every `@spaces.GPU` call runs in a forked worker process: the arguments
and results cross through a `multiprocessing.SimpleQueue` (torch's pickling of tensors included),
whatever the call changes in memory stays in the worker, a generator is closed there when the
caller stops listening, and an exception other than `gr.Error` reaches the caller as a bare "ZeroGPU
worker error", and the task runs in a new thread of the worker.  Unlike ZeroGPU it forks a fresh worker for every call (the strictest case: nothing
carries over from one call to the next) and it does not emulate CUDA in the main process.

Each call is recorded as a line "gpu<TAB>function<TAB>worker pid" in the file named by
ZEROGPU_EMULATOR_LOG.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import traceback
from concurrent.futures import ThreadPoolExecutor

import gradio as gr

IN_WORKER = False  # True inside a GPU call's worker process
_fork = multiprocessing.get_context("fork")
_END = object()  # what next() returns when a generator task has ended


def GPU(task=None, *, duration=None, size=None):
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)
    if inspect.isgeneratorfunction(task):

        @functools.wraps(task)
        def generator_handler(*args, **kwargs):
            worker = _Worker(task, args, kwargs, generator=True)
            try:
                while (item := worker.next()) is not _END:
                    yield item
            finally:  # also when the caller stops listening: the worker closes the task at its next yield
                worker.finish()

        return generator_handler

    @functools.wraps(task)
    def handler(*args, **kwargs):
        worker = _Worker(task, args, kwargs, generator=False)
        try:
            return worker.next()
        finally:
            worker.finish()

    return handler


class _Worker:
    def __init__(self, task, args: tuple, kwargs: dict, generator: bool) -> None:
        self.arguments, self.results = _fork.SimpleQueue(), _fork.SimpleQueue()
        self.stop, self.received = _fork.Event(), _fork.Event()
        self.generator, self.done = generator, False
        self.process = _fork.Process(target=self._run, args=(task, generator), daemon=True)
        self.process.start()
        record("gpu", task.__name__, self.process.pid)
        self.arguments.put((args, kwargs))  # pickled, as ZeroGPU sends them

    def _run(self, task, generator: bool) -> None:
        global IN_WORKER
        IN_WORKER = True
        args, kwargs = self.arguments.get()
        # in a new thread, as spaces does: the forked thread's OpenMP pool lost its threads in the fork
        with ThreadPoolExecutor(1) as thread:
            thread.submit(self._task, task, generator, args, kwargs).result()
        # tensors in the results are shared through this process: it lives until they are received
        self.received.wait(120)

    def _task(self, task, generator: bool, args: tuple, kwargs: dict) -> None:
        try:
            if generator:
                results = task(*args, **kwargs)
                for item in results:
                    if self.stop.is_set():
                        results.close()
                        break
                    self.results.put(("ok", item))
                self.results.put(("end", None))
            else:
                self.results.put(("ok", task(*args, **kwargs)))
        except Exception as error:
            gradio_error = error if isinstance(error, gr.Error) else None
            self.results.put(("error", (gradio_error, type(error).__name__, traceback.format_exc())))

    def next(self):
        while not self.results._reader.poll(1):
            if not self.process.is_alive():
                self.done = True
                raise gr.Error("ZeroGPU worker error: GPU task aborted")
        kind, value = self.results.get()
        if kind == "end":
            self.done = True
            return _END
        if kind == "ok":
            self.done = not self.generator
            return value
        self.done = True
        gradio_error, name, trace = value
        if gradio_error is not None:
            raise gradio_error
        print(trace)
        raise gr.Error(f"ZeroGPU worker error: {name}")

    def finish(self) -> None:
        self.stop.set()
        try:
            while not self.done and self.process.is_alive():  # drain what it sends until it ends
                self.next()
        except gr.Error:
            pass
        self.received.set()
        self.process.join(60)


def record(*fields) -> None:
    path = os.environ.get("ZEROGPU_EMULATOR_LOG")
    if path:
        with open(path, "a") as log:
            log.write("\t".join(map(str, fields)) + "\n")
