"""What every reduction method promises: counts known before any pixel that equal the features made
and the processor's placeholders, generate, video frames, refusals that state the limits, and the
stock model back exactly when off.  Each method's own reference check is in test_methods_<name>.py."""

import pytest
import torch
from method_refs import count_placeholders

import visionzip
from visionzip.layout import stitched_order
from visionzip.methods import METHODS
from visionzip.tiny import load_tiny
from visionzip.tower import TowerSignals
from visionzip.video import frame_features, frame_pixel_values, tokens_per_frame, video_input_ids, video_prompt

BUDGETS = {"random": 64, "pool": 36, "divprune": 320, "vispruner": 64}  # per tile, DivPrune per image
SIZES = [(336, 336), (1080, 1920), (300, 700)]  # the reference tests cover 336x672, 672x672, 480x640, 1008x336


@pytest.fixture(params=sorted(BUDGETS))
def method(request):
    return request.param


@pytest.fixture
def next_handle(tiny_next, method):
    model, processor = tiny_next
    handle = visionzip.apply(model, processor, method=method, tokens=BUDGETS[method])
    try:
        yield model, processor, handle
    finally:
        handle.remove()


def image_features(model, inputs):
    kwargs = {"pixel_values": inputs.pixel_values}
    if "image_sizes" in inputs:
        kwargs["image_sizes"] = inputs.image_sizes
    with torch.no_grad():
        return model.model.get_image_features(**kwargs).pooler_output


def test_registry_describes_every_method():
    for name in ("visionzip", "visionzip_dominant", *BUDGETS):
        method = METHODS[name]
        assert method.name == name and method.reference
        assert method.stage in ("vision tower", "projector", "language model")
        assert method.budget_rule in ("per tile", "per image")
    assert METHODS["divprune"].budget_rule == "per image" and METHODS["vispruner"].needs_attention
    assert not METHODS["random"].needs_attention and not METHODS["pool"].needs_attention


def test_llava_next_counts_predicted_equal_features_and_placeholders(next_handle, make_image):
    model, processor, handle = next_handle
    for size in SIZES:
        predicted = handle.num_image_tokens(size)
        inputs = processor(images=make_image(*size), text="<image>\nhi", return_tensors="pt")
        [features] = image_features(model, inputs)
        assert predicted == count_placeholders(inputs, model) == features.shape[0]
        assert handle.last_selection[0].num_tokens == predicted


def test_llava_next_batch_of_sizes_in_one_call(next_handle, make_image):
    model, processor, handle = next_handle
    sizes = [(672, 672), (480, 640), (336, 1008)]
    images = [make_image(*size, seed=k) for k, size in enumerate(sizes)]
    inputs = processor(
        images=images, text=["<image>\na", "<image>\nb", "<image>\nc"], return_tensors="pt", padding=True
    )
    features = image_features(model, inputs)
    assert [f.shape[0] for f in features] == [handle.num_image_tokens(size) for size in sizes]
    assert sum(f.shape[0] for f in features) == count_placeholders(inputs, model)
    assert [image.num_tokens for image in handle.last_selection] == [f.shape[0] for f in features]


def test_generate_runs_under_every_method(method, tiny_next, tiny_llava, make_image):
    for model, processor in (tiny_next, tiny_llava):
        handle = visionzip.apply(model, processor, method=method, tokens=BUDGETS[method])
        try:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(images=make_image(480, 640, seed=5), text=prompt, return_tensors="pt")
            with torch.no_grad(), handle.use() as call:
                out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            assert out.shape[1] == inputs.input_ids.shape[1] + 2
            assert call.visual_tokens == [count_placeholders(inputs, model)] == [handle.num_image_tokens((480, 640))]
        finally:
            handle.remove()


@pytest.mark.parametrize("family", ["llava_next", "llava"])
def test_video_frames_get_tokens_per_frame(method, family, tiny_next, tiny_llava, make_image):
    model, processor = tiny_next if family == "llava_next" else tiny_llava
    handle = visionzip.apply(model, processor, method=method, tokens=BUDGETS[method])
    try:
        frames = [make_image(360, 640, seed) for seed in range(3)]
        with torch.inference_mode(), handle.use() as call:
            per_frame = tokens_per_frame(handle)
            features = frame_features(handle, frame_pixel_values(processor, frames))
            input_ids = video_input_ids(processor, video_prompt(processor, VIDEO_QUESTION, [0.0, 0.5, 1.0]), per_frame)
        assert per_frame == BUDGETS[method]
        assert features.shape == (3, per_frame, model.config.text_config.hidden_size)
        assert int((input_ids == model.config.image_token_id).sum()) == 3 * per_frame
        assert [(frame.grid, frame.num_tokens, len(frame.tiles)) for frame in call.selection] == [
            ((0, 0), per_frame, 1)
        ] * 3
    finally:
        handle.remove()


VIDEO_QUESTION = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]


def test_descriptions_name_the_budget_and_the_seed(tiny_next):
    model, processor = tiny_next
    handle = visionzip.apply(model, processor)
    try:
        expected = {
            "random": "Random 64/tile, seed 9",
            "pool": "Pool 36/tile (6x6 grid)",
            "divprune": "DivPrune 320/image",
            "vispruner": "VisPruner 64/tile (32 important + 32 diverse)",
        }
        for name, text in expected.items():
            with handle.use(method=name, tokens=BUDGETS[name], seed=9):
                assert handle.settings.describe() == text
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "name, tokens, words",
    [
        ("random", 0, "a tile has 576 patches"),
        ("random", 577, "a tile has 576 patches"),
        ("random", 2.5, "whole number"),
        ("random", None, "needs a budget"),
        ("vispruner", 577, "a tile has 576 patches"),
        ("vispruner", True, "whole number"),
        ("pool", 128, r"valid counts \(window\): 576 \(1x1\), 144 \(2x2\)"),
        ("divprune", 0, "keeps 1 to N of an image's N stock tokens"),
        ("divprune", "64", "keeps 1 to N"),
    ],
)
def test_impossible_budgets_are_refused_with_the_limits(tiny_next, name, tokens, words):
    model, processor = tiny_next
    with pytest.raises(ValueError, match=words):
        visionzip.apply(model, processor, method=name, tokens=tokens)
    handle = visionzip.apply(model, processor)  # the refused apply left the model stock
    try:
        with pytest.raises(ValueError, match=words), handle.use(method=name, tokens=tokens):
            pass
    finally:
        handle.remove()


def test_divprune_budget_above_a_frame_is_refused_for_video(tiny_llava):
    model, processor = tiny_llava
    handle = visionzip.apply(model, processor, method="divprune", tokens=600)
    try:
        with pytest.raises(ValueError, match="need 1 <= tokens <= 576"):
            tokens_per_frame(handle)
    finally:
        handle.remove()


def test_off_is_stock_after_every_method_ran(tiny_next, make_image):
    """The shared model, patched and unpatched by every test before, against one that never was."""
    stock, processor = load_tiny("llava_next")
    patched, patched_processor = tiny_next
    image = make_image(336, 336, seed=3)
    prompt = "<image>\nDescribe the picture."
    stock_inputs = processor(images=image, text=prompt, return_tensors="pt")
    handle = visionzip.apply(patched, patched_processor, enabled=False)
    try:
        with torch.no_grad():
            expected = stock(**stock_inputs).logits
            for name, tokens in BUDGETS.items():
                with handle.use(enabled=True, method=name, tokens=tokens):
                    patched(**patched_processor(images=image, text=prompt, return_tensors="pt"))
                inputs = patched_processor(images=image, text=prompt, return_tensors="pt")
                assert torch.equal(inputs.input_ids, stock_inputs.input_ids)
                assert torch.equal(patched(**inputs).logits, expected), name
    finally:
        handle.remove()


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_a_methods_forward_reads_nothing_back_from_the_device(name):
    """On the meta device no value exists: a method that read one on the host (`.item()`, `.tolist()`,
    a boolean mask, a copy to the CPU), and so would make the host wait for a GPU, fails here."""
    meta = torch.device("meta")
    method = METHODS[name]
    settings = visionzip.Settings(True, visionzip.Budget(54, 10), method=name, tokens=BUDGETS[name])
    if method.budget_rule == "per image":
        kept = method.reduce_image(torch.empty(2928, 128, device=meta), settings)
        assert kept.shape == (320,) and kept.device == meta
        return
    signals = TowerSignals(
        hidden=torch.empty(5, 577, 64, device=meta),
        cls_attn=torch.empty(5, 577, device=meta),
        keys_mean=torch.empty(5, 577, 16, device=meta),
    )
    output = method.reduce_tiles(signals, settings, torch.nn.Linear(64, 128, device=meta))
    assert output.features.shape == (5, BUDGETS[name], 128) and output.features.device == meta
    assert stitched_order(output.positions[1:], 2, 2, 24).shape == (4 * BUDGETS[name],)
