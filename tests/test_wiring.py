"""The page's events and the one slot they share: a handler that reads the conversation and writes it, a
side's header or its controls while another such handler runs would write back what it read, after the
other's change (CI saw it: the charts' refresh after an upload put "With Full" back over a new method)."""

import gradio as gr
import pytest

from app.models import ModelRegistry
from app.ui import build_demo

# what shows the conversation's settings: a stale write of any of them contradicts the others
SETTINGS = ("header", "method", "mode", "model", "budget", "dominant", "contextual", "tokens", "tuned")


@pytest.fixture(scope="module")
def demo() -> gr.Blocks:
    return build_demo(ModelRegistry())


def writes_settings(component) -> bool:
    name = getattr(component, "elem_id", None) or ""
    return isinstance(component, gr.State) or any(name.endswith(f"-{part}") for part in SETTINGS)


def test_every_handler_that_writes_the_conversation_or_its_settings_runs_in_the_one_slot(demo):
    writers = [fn for fn in demo.fns.values() if any(writes_settings(out) for out in fn.outputs)]
    outside = sorted({fn.fn.__name__ for fn in writers if fn.concurrency_id != "gpu" or fn.concurrency_limit != 1})
    assert len(writers) > 30  # both pages' events were found
    assert not outside, f"write the conversation or its settings outside the slot: {outside}"


def test_the_slot_holds_only_one_event_at_a_time(demo):
    assert {fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"} == {1}
