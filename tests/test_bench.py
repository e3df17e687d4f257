"""`python -m bench.phases`: the tiny preset as a smoke run (contents, never speed), the FLOP
formulas against torch's own FLOP counter, and the authors' approach against VisionZip's tokens."""

import contextlib
import csv
import io
import json

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import visionzip
from bench import phases as bench

BUDGETS = ["640", "320", "160"]
STOCK_TOKENS_672 = 2928  # stock LLaVA-NeXT count for a 672x672 image (spec, processor)
TILES_672 = 5  # base image + 2x2 grid


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    argv = ["--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--new-tokens", "2"]
    argv += ["--out", str(out)]
    with contextlib.redirect_stdout(printed):
        assert bench.main(argv) == 0
    (json_path,) = out.glob("*.json")
    return json_path, printed.getvalue()


@pytest.fixture
def own_tiny():
    """A private tiny model: these tests switch its attention implementation."""
    from visionzip.tiny import load_tiny

    return load_tiny("llava_next")


def _read_csv(path):
    lines = path.read_text().splitlines()
    header = [line for line in lines if line.startswith("# ")]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return header, rows


def test_tiny_results_hold_every_mode_with_the_right_token_counts(tiny_run):
    json_path, _ = tiny_run
    results = json.loads(json_path.read_text())
    rows = results["rows"]
    assert [row["mode"] for row in rows] == ["full", *BUDGETS]
    assert rows[0]["visual_tokens"] == STOCK_TOKENS_672
    for row, name in zip(rows[1:], BUDGETS):
        budget = visionzip.preset_budget("llava_next", name)
        assert (row["dominant"], row["contextual"]) == (budget.dominant, budget.contextual)
        assert row["visual_tokens"] == TILES_672 * (budget.dominant + budget.contextual)
    text_tokens = {row["text_tokens"] for row in rows}
    assert len(text_tokens) == 1 and text_tokens.pop() > 0
    for row in rows:
        assert row["context_tokens"] == row["visual_tokens"] + row["text_tokens"]


def test_tiny_results_measure_every_phase(tiny_run):
    json_path, _ = tiny_run
    results = json.loads(json_path.read_text())
    measured = ["tower_ms", "vision_ms", "decoder_ms", "head_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token"]
    measured += ["peak_mib", "vision_peak_mib"]
    flops = ["tower_gflop", "projector_gflop", "prefill_gflop", "decode_gflop_per_token"]
    for row in results["rows"]:
        for key in measured + flops:
            assert isinstance(row[key], float) and row[key] > 0, (row["mode"], key, row[key])
        # The phases are read inside the same forward, so vision + LM prefill is the whole TTFT.
        assert row["vision_ms"] + row["prefill_ms"] == pytest.approx(row["ttft_ms"], rel=1e-6)
        assert row["decoder_ms"] + row["head_ms"] == pytest.approx(row["prefill_ms"], rel=1e-6)
    for row in results["rows"][1:]:
        assert row["visionzip_ms"] > 0 and row["visionzip_pct_of_tower"] > 0
        assert row["prefill_gflop"] < results["rows"][0]["prefill_gflop"]
    assert results["rows"][0]["visionzip_ms"] is None
    vision = {entry["approach"]: entry for entry in results["vision"]}
    assert set(vision) == {"stock", "visionzip", "authors"}
    assert all(entry["vision_ms"] > 0 and entry["vision_peak_mib"] > 0 for entry in vision.values())
    assert len(results["targets"]) == 5 and all(isinstance(check["met"], bool) for check in results["targets"])


def test_kv_cache_bytes_are_the_cache_the_context_needs(tiny_run):
    json_path, _ = tiny_run
    results = json.loads(json_path.read_text())
    from visionzip.tiny import tiny_checkpoint

    text = transformers.AutoConfig.from_pretrained(tiny_checkpoint("llava_next")).text_config
    head_dim = text.hidden_size // text.num_attention_heads
    for row in results["rows"]:  # keys + values, every layer, float32
        expected = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * row["context_tokens"] * 4
        assert row["kv_cache_bytes"] == expected


def test_header_csv_and_table_name_the_machine_and_versions(tiny_run):
    json_path, printed = tiny_run
    results = json.loads(json_path.read_text())
    meta = results["meta"]
    assert meta["torch"] == torch.__version__ and meta["transformers"] == transformers.__version__
    assert meta["dtype"] == "float32" and meta["device"] == "cpu" and meta["machine"]
    assert json_path.name == f"tiny-float32-cpu-{meta['threads']}t.json"
    header, rows = _read_csv(json_path.with_suffix(".csv"))
    for key in ("machine", "dtype", "torch", "transformers"):
        assert f"# {key}: {meta[key]}" in header
    assert [row["mode"] for row in rows] == ["full", *BUDGETS]
    assert [int(row["visual_tokens"]) for row in rows] == [row["visual_tokens"] for row in results["rows"]]
    _, vision_rows = _read_csv(json_path.with_name(json_path.stem + "-vision.csv"))
    assert [row["approach"] for row in vision_rows] == ["stock", "visionzip", "authors"]
    assert f"- machine: {meta['machine']}" in printed and f"- torch: {torch.__version__}" in printed
    for row in results["rows"]:
        assert f"| {row['mode']} | {row['visual_tokens']} | {row['context_tokens']} |" in printed


def test_plot_draws_ttft_against_visual_tokens(tiny_run, tmp_path):
    import plotly.io

    json_path, _ = tiny_run
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench.main(["--plot", str(json_path), "--out", str(tmp_path)]) == 0
    results = json.loads(json_path.read_text())
    figure = plotly.io.read_json(tmp_path / "ttft.json")
    measured = next(trace for trace in figure.data if trace.name.endswith("measured"))
    assert list(measured.x) == [row["visual_tokens"] for row in results["rows"]]
    assert list(measured.y) == [row["ttft_ms"] for row in results["rows"]]
    assert "<html>" in (tmp_path / "ttft.html").read_text()


def _counted(function) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        function()
    return counter.get_total_flops()


def test_flop_formulas_match_torch_flop_counter(own_tiny, make_image):
    """With eager attention every matmul is visible to FlopCounterMode (norms and activations are
    not, as in the formulas); eager prefill also multiplies the masked half of the causal map, and
    the rotary embedding's small position matmul (d*n FLOPs) is the only other difference."""
    model, processor = own_tiny
    model.set_attn_implementation("eager")
    config, text = model.config, model.config.text_config
    inputs = processor(images=make_image(672, 672), text="<image> what is it?", return_tensors="pt")
    image_inputs = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}
    tiles = inputs["pixel_values"].flatten(0, 1)
    tower = bench.tower_flops(config.vision_config, TILES_672)
    assert _counted(lambda: model.model.vision_tower(tiles)) == pytest.approx(tower, rel=1e-6)
    features = torch.zeros(100, config.vision_config.hidden_size)
    assert _counted(lambda: model.model.multi_modal_projector(features)) == bench.projector_flops(config, 100)

    n = 37
    ids = torch.randint(5, text.vocab_size, (1, n))
    counted_prefill = _counted(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
    masked_half = text.num_hidden_layers * 2 * n * (n - 1) * text.hidden_size
    assert counted_prefill == pytest.approx(bench.prefill_flops(text, n) + masked_half, rel=1e-4)

    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).cache
    counted_decode = _counted(lambda: model(input_ids=ids[:, :1], cache=cache, use_cache=True))
    assert counted_decode == pytest.approx(bench.decode_flops(text, n), rel=1e-4)

    handle = visionzip.apply(model, processor)
    try:
        budget = visionzip.preset_budget("llava_next", 160)
        with handle.use(dominant=budget.dominant, contextual=budget.contextual):
            reduced = _counted(lambda: model.model.get_image_features(**image_inputs))
    finally:
        handle.remove()
    expected = (
        bench.tower_flops(config.vision_config, TILES_672)
        + bench.visionzip_flops(config.vision_config, TILES_672, budget)
        + bench.projector_flops(config, TILES_672 * budget.per_tile)
    )
    assert reduced == pytest.approx(expected, rel=1e-6)


def test_authors_approach_yields_visionzip_tokens_and_restores_sdpa(own_tiny, make_image):
    """The comparison is fair only if both routes make the same tokens: base tile, crops' CLS and
    crops' contextual tokens sit at known places in VisionZip's packing."""
    model, processor = own_tiny
    budget = visionzip.preset_budget("llava_next", 320)
    dominant, contextual = budget.dominant, budget.contextual
    inputs = processor(images=make_image(672, 672, seed=3), text="<image>", return_tensors="pt")
    image_inputs = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}
    handle = visionzip.apply(model, processor)
    try:
        with handle.use(dominant=dominant, contextual=contextual), torch.inference_mode():
            ours = model.model.get_image_features(**image_inputs).pooler_output[0]
    finally:
        handle.remove()
    before = model.config.vision_config._attn_implementation
    with bench.eager_tower(model), torch.inference_mode():
        assert model.config.vision_config._attn_implementation == "eager"
        theirs = bench.authors_image_features(model, inputs["pixel_values"], budget)  # (5, D+C, E)
    assert model.config.vision_config._attn_implementation == before

    crops = TILES_672 - 1
    crop_cls_at = dominant + contextual + crops * (dominant - 1)
    torch.testing.assert_close(theirs[0], ours[: dominant + contextual], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs[1:, 0], ours[crop_cls_at : crop_cls_at + crops], rtol=1e-4, atol=1e-5)
    crops_contextual = theirs[1:, dominant:].reshape(-1, theirs.shape[-1])
    torch.testing.assert_close(crops_contextual, ours[-crops * contextual :], rtol=1e-4, atol=1e-5)


def test_cpu_peak_memory_sees_a_freed_allocation_and_resets():
    memory = bench.PeakMemory(torch.device("cpu"))
    if not memory.available:
        pytest.skip(f"peak RSS cannot be reset here: {memory.method}")
    block = 256  # MiB
    with memory.measure() as peak:
        data = torch.ones(block * 2**20 // 4)  # float32
        del data
    assert peak.mib >= 0.9 * block
    with memory.measure() as quiet:
        pass
    assert quiet.mib < 0.25 * block  # the earlier peak does not leak into the next measurement


# -- Qwen2.5-VL ------------------------------------------------------------------------------------
def test_qwen_run_holds_every_mode_with_its_counts(tmp_path):
    """`--family qwen2_5_vl`: 672x672 px is 24x24 merged cells; every budget's count, VisionZip's and the
    other methods' (Pool 64: 3x3 windows, an 8x8 grid; FastV keeps the placeholders), and no authors' row."""
    argv = ["--family", "qwen2_5_vl", "--preset", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0"]
    argv += ["--new-tokens", "1", "--budgets", "256", "128", "64", "divprune:128", "pool:64", "fastv:128"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("qwen-tiny-float32-cpu-*.json")
    results = json.loads(path.read_text())
    rows = {row["mode"]: row for row in results["rows"]}
    counts = {"full": 576, "256": 256, "128": 128, "64": 64, "divprune:128": 128, "pool:64": 64, "fastv:128": 576}
    assert {name: row["visual_tokens"] for name, row in rows.items()} == counts
    assert rows["full"]["token_ratio"] == 1 and rows["64"]["token_ratio"] == rows["full"]["context_tokens"] / (
        64 + rows["full"]["text_tokens"]
    )
    assert [entry["approach"] for entry in results["vision"]] == ["stock", "visionzip"]  # no CLS: no authors' code
    for row in rows.values():
        assert row["select_merge_ms"] is None and row["tower_ms"] > 0 and row["projector_ms"] > 0
        assert row["vision_ms"] + row["prefill_ms"] == pytest.approx(row["ttft_ms"], rel=1e-6)
        assert row["own_ms"] == pytest.approx(row["vision_ms"] - row["tower_ms"] - row["projector_ms"])
    assert all(rows[name]["visionzip_ms"] >= rows[name]["pack_ms"] for name in ("256", "128", "64"))
    assert all(f"| {name} | {count} |" in printed.getvalue() for name, count in counts.items())


@pytest.mark.parametrize("size", [(672, 672), (392, 560)])  # 6x6 whole windows; 4x5 windows, the last row cut
def test_qwen_flop_formulas_match_torch_flop_counter(make_image, size):
    """The tower's windowed and full blocks, the merger, and VisionZip's signal and merge on Qwen2.5-VL,
    against FlopCounterMode (eager attention: every matmul visible to it)."""
    from visionzip.tiny import load_tiny

    model, processor = load_tiny("qwen2_5_vl")
    model.set_attn_implementation({"vision_config": "eager"})
    vision = model.config.vision_config
    inputs = processor(
        images=make_image(*size), text="<|vision_start|><|image_pad|><|vision_end|>", return_tensors="pt"
    )
    grid = tuple(inputs["image_grid_thw"][0, 1:].tolist())
    assert grid == (size[0] // 14, size[1] // 14)
    cells = grid[0] * grid[1] // 4
    visual = model.model.visual
    tower = _counted(lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))
    merger = _counted(lambda: visual.merger(torch.zeros(cells * 4, vision.hidden_size)))
    assert merger == bench.qwen_merger_flops(vision, cells)
    assert tower == pytest.approx(bench.qwen_tower_flops(vision, grid) + merger, rel=1e-6)

    budget = visionzip.Budget(40, 12)
    handle = visionzip.apply(model, processor)
    try:
        with handle.use(dominant=budget.dominant, contextual=budget.contextual):
            reduced = _counted(lambda: model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]))
    finally:
        handle.remove()
    assert reduced == pytest.approx(tower + bench.qwen_visionzip_flops(vision, grid, budget), rel=1e-6)
