"""The library's promises to its users: stock when off, right counts, generate, threads, budgets."""

import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import visionzip
from visionzip.tiny import load_tiny

SIZES = [(336, 336), (672, 672), (480, 640), (1080, 1920), (336, 1008)]


def count_placeholders(inputs, model) -> int:
    return int((inputs.input_ids == model.config.image_token_id).sum())


def test_tiny_checkpoint_has_real_stock_counts(tiny_next, make_image):
    model, processor = tiny_next
    inputs = processor(images=make_image(672, 672), text="<image>\nWhat is this?", return_tensors="pt")
    assert count_placeholders(inputs, model) == 2928
    inputs = processor(images=make_image(336, 336), text="<image>", return_tensors="pt")
    assert count_placeholders(inputs, model) == 1176
    inputs = processor(images=make_image(480, 640), text="<image>", return_tensors="pt")
    assert count_placeholders(inputs, model) == 2340


def test_off_is_bit_identical_to_a_model_that_never_saw_apply(make_image):
    stock, processor = load_tiny("llava_next")
    patched, patched_processor = load_tiny("llava_next")
    image = make_image(480, 640, seed=3)
    prompt = "<image>\nDescribe the picture."
    stock_inputs = processor(images=image, text=prompt, return_tensors="pt")
    handle = visionzip.apply(patched, patched_processor, 54, 10, enabled=False)
    inputs = patched_processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(inputs.input_ids, stock_inputs.input_ids)
    with torch.no_grad():
        expected_logits = stock(**stock_inputs).logits
        expected_ids = stock.generate(**stock_inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(patched(**inputs).logits, expected_logits)
        assert torch.equal(patched.generate(**inputs, max_new_tokens=6, do_sample=False), expected_ids)
        with handle.use(enabled=True):  # on, then off again: nothing lingers
            patched(**patched_processor(images=image, text=prompt, return_tensors="pt"))
        assert torch.equal(patched(**inputs).logits, expected_logits)
        handle.remove()
        assert torch.equal(patched(**processor(images=image, text=prompt, return_tensors="pt")).logits, expected_logits)


@pytest.mark.parametrize("preset", [640, 320, 160])
def test_counts_match_features_for_every_size(tiny_next, make_image, preset):
    model, processor = tiny_next
    budget = visionzip.preset_budget("llava_next", preset)
    handle = visionzip.apply(model, processor, budget.dominant, budget.contextual)
    try:
        for size in SIZES:
            inputs = processor(images=make_image(*size), text="<image>\nhi", return_tensors="pt")
            with torch.no_grad():
                features = model.model.get_image_features(
                    pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes
                )
            tiles = image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, 336)
            expected = tiles * budget.per_tile + (1 if tiles == 1 else 0)
            assert count_placeholders(inputs, model) == features.pooler_output[0].shape[0] == expected
            assert handle.num_image_tokens(size) == expected
            assert handle.last_selection[0].num_tokens == expected
            with handle.use(enabled=False):
                stock_inputs = processor(images=make_image(*size), text="<image>", return_tensors="pt")
                assert handle.num_image_tokens(size) == count_placeholders(stock_inputs, model)
    finally:
        handle.remove()


def test_paper_totals_for_a_2x2_grid(tiny_next, make_image):
    model, processor = tiny_next
    handle = visionzip.apply(model, processor)
    try:
        for preset in (640, 320, 160):
            budget = visionzip.preset_budget("llava_next", preset)
            with handle.use(dominant=budget.dominant, contextual=budget.contextual):
                assert handle.num_image_tokens((672, 672)) == preset
    finally:
        handle.remove()


def test_two_turn_conversation_generates_on_and_off(tiny_next, make_image):
    model, processor = tiny_next
    handle = visionzip.apply(model, processor, 27, 5)
    image = make_image(672, 672, seed=5)
    try:
        for enabled in (True, False):
            with handle.use(enabled=enabled):
                messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
                for _turn in range(2):
                    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
                    inputs = processor(images=image, text=prompt, return_tensors="pt")
                    with torch.no_grad():
                        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
                    answer = processor.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
                    assert out.shape[1] == inputs.input_ids.shape[1] + 4
                    assert count_placeholders(inputs, model) == (160 if enabled else 2928)
                    messages += [
                        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
                    ]
                assert prompt.count("ASSISTANT:") == 2 and prompt.count("<image>") == 1
    finally:
        handle.remove()


def test_batch_of_differently_sized_images_and_multi_image_prompt(tiny_next, make_image):
    model, processor = tiny_next
    handle = visionzip.apply(model, processor, 54, 10)
    images = [make_image(672, 672, seed=1), make_image(480, 640, seed=2), make_image(336, 1008, seed=3)]
    try:
        with torch.no_grad():
            singles = []
            for image in images:
                inputs = processor(images=image, text="<image>", return_tensors="pt")
                singles.append(
                    model.model.get_image_features(
                        pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes
                    ).pooler_output[0]
                )
            batch = processor(
                images=images, text=["<image>\na", "<image> and <image>\nb"], return_tensors="pt", padding=True
            )
            features = model.model.get_image_features(pixel_values=batch.pixel_values, image_sizes=batch.image_sizes)
            for single, batched in zip(singles, features.pooler_output):
                torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
            logits = model(**batch).logits
        assert logits.shape[:2] == batch.input_ids.shape
        assert count_placeholders(batch, model) == sum(single.shape[0] for single in singles)
        assert [image.grid for image in handle.last_selection] == [(2, 2), (2, 2), (1, 3)]
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(make_image, dtype):
    model, processor = load_tiny("llava_next", dtype=dtype)
    visionzip.apply(model, processor, 54, 10)
    inputs = processor(images=make_image(480, 640), text="<image>\nhi", return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert count_placeholders(inputs, model) == 320


def test_llava_15_counts_and_generate(tiny_llava, make_image):
    model, processor = tiny_llava
    handle = visionzip.apply(model, processor, *visionzip.PRESETS["llava"][128])
    try:
        inputs = processor(images=make_image(480, 640), text="<image>\nhi", return_tensors="pt")
        assert count_placeholders(inputs, model) == 128 == handle.num_image_tokens((480, 640))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs.input_ids.shape[1] + 3
        with handle.use(enabled=False):
            inputs = processor(images=make_image(480, 640), text="<image>\nhi", return_tensors="pt")
            assert count_placeholders(inputs, model) == 576 == handle.num_image_tokens((480, 640))
    finally:
        handle.remove()


def test_two_threads_switching_get_what_a_serial_run_gets(make_image):
    model, processor = load_tiny("llava_next")
    handle = visionzip.apply(model, processor, 27, 5)
    image = make_image(672, 672, seed=9)

    def run(enabled: bool):
        with handle.use(enabled=enabled) as call:
            inputs = processor(images=image, text="<image>\nhi", return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0, -1]
        return count_placeholders(inputs, model), logits, call.visual_tokens

    serial = {enabled: run(enabled) for enabled in (True, False)}
    results = {True: [], False: []}
    errors = []

    def worker(enabled: bool):
        try:
            for _ in range(20):
                results[enabled].append(run(enabled))
        except Exception as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(enabled,)) for enabled in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for enabled in (True, False):
        assert len(results[enabled]) == 20
        count, logits, visual = serial[enabled]
        assert count == (160 if enabled else 2928)
        for got_count, got_logits, got_visual in results[enabled]:
            assert got_count == count and got_visual == visual
            torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dominant, contextual, words",
    [
        (0, 10, "dominant=0"),
        (578, 0, "dominant=578"),
        (500, 100, "only 77 tokens remain"),
        (54, -1, "contextual=-1"),
        (2.5, 10, "must be an integer"),
    ],
)
def test_impossible_budgets_say_the_limits(tiny_next, dominant, contextual, words):
    model, processor = tiny_next
    with pytest.raises(ValueError, match="577 tokens") as raised:
        visionzip.apply(model, processor, dominant, contextual)
    assert words in str(raised.value)
    handle = visionzip.apply(model, processor, 54, 10)
    try:
        with pytest.raises(ValueError, match="577 tokens"):
            handle.set_budget(dominant, contextual)
        with pytest.raises(ValueError, match="577 tokens"):
            with handle.use(dominant=dominant, contextual=contextual):
                pass
        assert handle.budget == visionzip.Budget(54, 10)  # a refused budget changes nothing
    finally:
        handle.remove()


def test_unknown_preset_and_model_are_refused(tiny_next):
    with pytest.raises(ValueError, match="presets: \\[640, 320, 160\\]"):
        visionzip.preset_budget("llava_next", 100)
    with pytest.raises(TypeError, match="LLaVA-NeXT and LLaVA-1.5"):
        visionzip.apply(torch.nn.Linear(2, 2))


def test_applying_twice_is_refused(tiny_next):
    model, processor = tiny_next
    handle = visionzip.apply(model, processor)
    try:
        with pytest.raises(ValueError, match="already applied"):
            visionzip.apply(model, processor)
    finally:
        handle.remove()
    visionzip.apply(model, processor).remove()  # and allowed again once removed


def test_processor_survives_save_while_applied(tiny_next, tmp_path):
    model, processor = tiny_next
    handle = visionzip.apply(model, processor)
    try:
        processor.save_pretrained(tmp_path)
        assert (tmp_path / "processor_config.json").exists() or (tmp_path / "preprocessor_config.json").exists()
    finally:
        handle.remove()


def test_wheel_contains_the_package(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("visionzip_hf-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("visionzip/__init__.py", "visionzip/core.py", "visionzip/merge.py", "visionzip/patch/llava_next.py"):
        assert module in names
    assert not [name for name in names if name.startswith(("bench/", "app/", "tests/")) or "bench" in name]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requirements = [line for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    assert {line.split()[1].split(">")[0].split("<")[0].split("=")[0] for line in requirements} == {
        "torch",
        "transformers",
        "tokenizers",
        "pillow",
    }


def test_half_precision_merge_is_the_float32_merge_rounded_once():
    """Groups of hundreds of patches are common at small budgets: a bf16 running sum would stop
    counting at 256 and drift with the order of a GPU's adds."""
    torch.manual_seed(0)
    hidden = (torch.randn(2, 577, 64) * 8).to(torch.bfloat16)
    keys = torch.zeros(2, 577, 8)
    keys[..., 0] = 1  # every token equally like every target: ties all go to the first target
    choice = visionzip.choose_tokens(torch.rand(2, 577), keys, dominant=27, contextual=5)
    assert (choice.merged_into == 0).all() and choice.merged.shape[1] == 545
    for mode in ("sum", "mean"):
        expected = visionzip.merge_tokens(hidden.float(), choice, mode).to(torch.bfloat16)
        assert torch.equal(visionzip.merge_tokens(hidden, choice, mode), expected)


def test_pure_functions_check_the_budget_too():
    with pytest.raises(ValueError, match="577 tokens"):
        visionzip.choose_tokens(torch.rand(1, 577), torch.rand(1, 577, 8), dominant=500, contextual=100)


def test_a_pickled_selection_is_its_tiles_on_the_cpu(tiny_next, make_image):
    """What crosses a process boundary (ZeroGPU sends a GPU call's results back by pickle) holds the
    tiles themselves, read once, and nothing that refers to the device tensors they came from."""
    import pickle

    model, processor = tiny_next
    handle = visionzip.apply(model, processor, 54, 10)
    try:
        inputs = processor(images=make_image(480, 640), text="<image>", return_tensors="pt")
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)
        selection = handle.last_selection[0]
        copy = pickle.loads(pickle.dumps(selection))
    finally:
        handle.remove()
    assert type(copy.tiles) is list and len(copy.tiles) == len(selection.tiles) == 5
    for ours, theirs in zip(copy.tiles, selection.tiles):
        assert ours.side == theirs.side == 24
        for name in ("kept", "targets", "merged", "merged_into", "cls_attention"):
            assert getattr(ours, name).device.type == "cpu"
            assert torch.equal(getattr(ours, name), getattr(theirs, name))
