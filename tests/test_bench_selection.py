"""bench.selection compares this checkout's selection functions with a baseline commit's: the baseline
must be the named commit's code, and swapping it in must reach the method's own calls and be undone."""

import subprocess
from pathlib import Path

import pytest
import torch

import visionzip.methods.divprune as divprune
from bench.selection import baseline_functions, swapped

REPOSITORY = Path(__file__).resolve().parents[1]


def needs_git_history():
    try:
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPOSITORY, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the repository's git history (git and a .git folder)")


def test_the_baseline_is_the_commits_code_and_swapping_it_in_is_undone():
    needs_git_history()
    [(name, baseline)] = baseline_functions("HEAD", "visionzip/methods/divprune.py", ("divprune_select",)).items()
    assert baseline is not divprune.divprune_select and baseline.__module__ == "visionzip.methods._baseline_divprune"
    features = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(baseline(features, 20), divprune_reference_picks(features, 20))

    own, first_rows = divprune.divprune_select, lambda rows, tokens: torch.arange(tokens)
    with swapped(divprune, {name: first_rows}):  # the method's own call goes through the module
        assert divprune.DivPrune().reduce_image(features, _settings(20)).tolist() == list(range(20))
    assert divprune.divprune_select is own


def test_a_method_of_a_class_is_swapped_and_restored():
    """CDPruner's CLIP side is swapped as "ClipText.embed_text": the class's method, put back after."""
    import visionzip.clip_text as clip_text

    needs_git_history()
    own = clip_text.ClipText.embed_text
    [baseline] = baseline_functions("HEAD", "visionzip/clip_text.py", ("ClipText.embed_text",)).values()
    assert baseline is not own and baseline.__qualname__ == "ClipText.embed_text"  # a file with a dataclass loads
    with swapped(clip_text, {"ClipText.embed_text": lambda self, text, device: text.upper()}):
        assert clip_text.ClipText.embed_text(None, "question", None) == "QUESTION"
    assert clip_text.ClipText.embed_text is own


def divprune_reference_picks(features, tokens):
    from method_refs import divprune_reference

    return torch.tensor(divprune_reference(features, tokens))


def _settings(tokens):
    from visionzip.budget import Budget
    from visionzip.settings import Settings

    return Settings(True, Budget(54, 10), method="divprune", tokens=tokens)
