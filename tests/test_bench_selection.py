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


def test_a_baseline_method_file_runs_with_the_baselines_own_similarity_module():
    """An older divprune.py must not borrow this checkout's faster similarity.py: the run would credit the
    baseline with the change it measures."""
    import visionzip.similarity as similarity

    needs_git_history()
    [baseline] = baseline_functions("HEAD", "visionzip/methods/divprune.py", ("screened_order",)).values()
    assert baseline.__globals__["screening_products"] is not similarity.screening_products
    assert baseline.__globals__["screening_products"].__module__ == "visionzip._baseline_similarity"


def test_cdpruners_selection_before_dpp_select_is_its_kernel_then_its_greedy_map():
    from bench.selection import baseline_selection
    from visionzip.methods.cdpruner import dpp_kernel, fast_greedy_map

    needs_git_history()
    commit = "c5c03c7"  # the last commit without dpp_select
    if subprocess.run(["git", "cat-file", "-e", commit], cwd=REPOSITORY, capture_output=True).returncode:
        pytest.skip(f"needs commit {commit} in the repository's history (a shallow clone lacks it)")
    old = baseline_selection(commit, "cdpruner")
    features, scores = torch.randn(2, 40, 16, dtype=torch.float64), torch.rand(2, 40, dtype=torch.float64)
    assert torch.equal(old(features, scores, 9), fast_greedy_map(dpp_kernel(features, scores), 9))
