"""Projector tuning (issue 9) on the tiny models and a small dataset drawn here."""

import json
import threading
from itertools import groupby
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig, LlavaNextForConditionalGeneration

import visionzip
from visionzip import tune
from visionzip.tiny import TINY_VERSION, load_tiny, tiny_checkpoint

COLORS = ["red", "green", "blue", "yellow"]
SIZES = [(336, 336), (336, 500), (672, 672), (500, 336)]  # (H, W): one tile, 1x2, 2x2 and 2x1 grids


def draw_box(path: Path, index: int) -> None:
    height, width = SIZES[index % len(SIZES)]
    image = Image.new("RGB", (width, height), "white")
    left = 20 + 30 * (index % 5)
    ImageDraw.Draw(image).rectangle([left, 40, left + 150, 200], fill=COLORS[index % len(COLORS)])
    image.save(path)


def box_record(index: int, image: str) -> dict:
    return {
        "id": f"box{index}",
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the box?"},
            {"from": "gpt", "value": f"the box is {COLORS[index % len(COLORS)]}"},
        ],
    }


def write_dataset(root: Path, count: int, extra: list[dict] = ()) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        draw_box(root / "images" / f"{index}.png", index)
        records.append(box_record(index, f"images/{index}.png"))
    path = root / "data.json"
    path.write_text(json.dumps(records + list(extra)))
    return path


def batch_of(handle, records) -> dict:
    examples = [tune.encode(handle, record) for record in records]
    return tune.collate(examples, handle.processor.tokenizer.pad_token_id)


def outputs(model, handle, batch) -> SimpleNamespace:
    with torch.no_grad(), handle.use(enabled=True):
        result = model(**batch)
    return SimpleNamespace(loss=result.loss.item(), logits=result.logits)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run on an own model copy, with what the tests compare it against."""
    root = tmp_path_factory.mktemp("tune")
    data = tune.read_dataset(write_dataset(root, 8))
    model, processor = load_tiny("llava_next")
    handle = visionzip.apply(model, processor, dominant=54, contextual=10)
    try:
        batch = batch_of(handle, data.records[:2])  # one lone tile and a 1x2 grid: tiles padded
        before_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        before = outputs(model, handle, batch)
        config = tune.TrainConfig(lr=1e-3, epochs=2, batch_size=2, output=root / "run", progress=False)
        result = tune.train(handle, data, config)
        after = outputs(model, handle, batch)
        yield SimpleNamespace(
            model=model, batch=batch, before=before, after=after, before_state=before_state, result=result
        )
    finally:
        handle.remove()


def test_labels_keep_only_the_answer_tokens(tiny_next, tmp_path):
    model, processor = tiny_next
    draw_box(tmp_path / "box.png", 2)
    conversations = [
        {"from": "human", "value": "<image>\nwhat color is the box?"},
        {"from": "gpt", "value": "the box is blue"},
        {"from": "human", "value": "where is it?"},
        {"from": "gpt", "value": "on the left"},
    ]
    record = tune.Record("r", tmp_path / "box.png", tune.to_messages(conversations))
    handle = visionzip.apply(model, processor, dominant=54, contextual=10)
    try:
        example = tune.encode(handle, record)
        # The prompt of the first turn is tokenized exactly as at inference time.
        prompt = processor.apply_chat_template(record.messages[:1], add_generation_prompt=True)
        inference_ids = processor(images=[Image.open(tmp_path / "box.png")], text=prompt)["input_ids"][0]
    finally:
        handle.remove()

    assert example.input_ids[: len(inference_ids)].tolist() == list(inference_ids)
    answer = example.labels != tune.IGNORE_INDEX
    assert torch.equal(example.labels[answer], example.input_ids[answer])
    assert not answer[example.input_ids == processor.image_token_id].any()
    pairs = zip(example.input_ids.tolist(), answer.tolist())
    runs = [[token for token, _ in run] for labelled, run in groupby(pairs, key=lambda pair: pair[1]) if labelled]
    assert [processor.tokenizer.decode(run) for run in runs] == [" the box is blue</s>", " on the left</s>"]


def test_training_lowers_the_loss_on_a_fixed_batch(trained):
    assert trained.result.steps == 8
    assert trained.after.loss < trained.before.loss


def test_training_changes_only_the_projector(trained):
    after_state = trained.model.state_dict()
    assert after_state.keys() == trained.before_state.keys()
    projector = [name for name in after_state if ".multi_modal_projector." in name]
    assert projector  # the projector's weights are found under this name
    for name, before in trained.before_state.items():
        if name in projector:
            assert not torch.equal(after_state[name], before), f"{name} did not train"
        else:
            assert torch.equal(after_state[name], before), f"frozen {name} changed"


def test_saved_projector_reloads_on_a_fresh_model(trained):
    assert trained.result.path.name == "projector.safetensors"
    model, processor = load_tiny("llava_next")
    handle = visionzip.apply(model, processor, dominant=54, contextual=10)
    try:
        tuned = tune.load_projector(model, trained.result.path)
        assert tuned.info.budget == visionzip.Budget(54, 10)
        assert tuned.info.steps == trained.result.steps
        with tune.use_projector(model, tuned):
            reloaded = outputs(model, handle, trained.batch)
        base = outputs(model, handle, trained.batch)  # outside the block: the base projector again
        with tune.use_projector(model, tune.load_projector(model, trained.result.path)):  # loaded while routed
            reloaded_again = outputs(model, handle, trained.batch)
    finally:
        handle.remove()
    assert torch.equal(reloaded.logits, trained.after.logits)
    assert torch.equal(reloaded_again.logits, trained.after.logits)
    assert torch.equal(base.logits, trained.before.logits)


def test_bf16_training_leaves_a_bf16_model_that_still_runs(tmp_path):
    data = tune.read_dataset(write_dataset(tmp_path, 2))
    model, processor = load_tiny("llava_next", dtype=torch.bfloat16)
    handle = visionzip.apply(model, processor, dominant=54, contextual=10)
    try:
        before = {name: tensor.clone() for name, tensor in model.model.multi_modal_projector.state_dict().items()}
        result = tune.train(handle, data, tune.TrainConfig(lr=1e-2, max_steps=2, output=tmp_path, progress=False))
        assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
        after = outputs(model, handle, batch_of(handle, data.records))
    finally:
        handle.remove()
    assert torch.isfinite(after.logits).all()
    trained = model.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(tensor, before[name]) for name, tensor in trained.items())
    tuned = tune.load_projector(model, result.path)  # fp32 in the file, cast to the model's bf16
    for name, tensor in tuned.module.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, trained[name])


def test_tuned_projector_applies_only_in_its_own_thread(trained):
    model, processor = load_tiny("llava_next")
    handle = visionzip.apply(model, processor, dominant=54, contextual=10)
    try:
        tuned = tune.load_projector(model, trained.result.path)
        other_thread = {}
        with tune.use_projector(model, tuned):
            worker = threading.Thread(target=lambda: other_thread.update(out=outputs(model, handle, trained.batch)))
            worker.start()
            worker.join()
            this_thread = outputs(model, handle, trained.batch)
    finally:
        handle.remove()
    assert torch.equal(other_thread["out"].logits, trained.before.logits)
    assert torch.equal(this_thread.logits, trained.after.logits)


def test_missing_and_unreadable_images_are_skipped_and_counted(tiny_next, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"this is not a png")
    extra = [box_record(90, "images/nowhere.png"), box_record(91, "images/broken.png")]
    data = tune.read_dataset(write_dataset(tmp_path, 2, extra))
    assert len(data.records) == 3 and data.skipped.count("missing image") == 1

    model, processor = load_tiny("llava_next")
    handle = visionzip.apply(model, processor, dominant=27, contextual=5)
    try:
        result = tune.train(handle, data, tune.TrainConfig(epochs=2, progress=False))
    finally:
        handle.remove()
    assert result.steps == 4  # 2 usable records, 2 epochs
    assert result.skipped.count("missing image") == 1
    assert result.skipped.count("unreadable image") == 1  # met in both epochs, counted once
    assert "box90" in str(result.skipped) and "box91" in str(result.skipped)


def test_a_dataset_of_unreadable_images_stops_with_a_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([box_record(0, "broken.png")]))
    model, processor = load_tiny("llava_next")
    handle = visionzip.apply(model, processor, dominant=27, contextual=5)
    try:
        with pytest.raises(ValueError, match="no usable records.*1 unreadable image"):
            tune.train(handle, tune.read_dataset(path), tune.TrainConfig(progress=False))
    finally:
        handle.remove()


def test_empty_datasets_are_refused(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        tune.read_dataset(empty)
    all_missing = tmp_path / "missing.json"
    all_missing.write_text(json.dumps([box_record(0, "gone.png"), {"id": "text", "conversations": []}]))
    with pytest.raises(ValueError, match=r"no usable records.*1 missing image.*1 no image"):
        tune.read_dataset(all_missing)


def test_fraction_is_sampled_by_seed(tmp_path):
    path = write_dataset(tmp_path, 10)

    def ids(seed):
        return [record.id for record in tune.read_dataset(path, fraction=0.5, seed=seed).records]

    assert len(ids(0)) == 5
    assert ids(0) == ids(0)
    assert ids(0) != ids(1)


def test_projector_for_another_hidden_size_is_refused(tiny_next, tmp_path):
    config = AutoConfig.from_pretrained(tiny_checkpoint("llava_next"))
    config.text_config.hidden_size, config.text_config.intermediate_size = 96, 192
    other = LlavaNextForConditionalGeneration(config)
    path = tune.save_projector(other, tmp_path / "wide.safetensors", visionzip.Budget(54, 10), "sum", 0)
    with pytest.raises(ValueError, match=r"hidden sizes \(64, 96\).*this model has \(64, 128\)"):
        tune.load_projector(tiny_next[0], path)


def test_projector_from_another_base_model_warns_or_is_refused(tiny_next, tiny_llava, tmp_path):
    path = tune.save_projector(tiny_llava[0], tmp_path / "llava.safetensors", visionzip.Budget(54, 10), "sum", 3)
    with pytest.warns(UserWarning, match=f"tiny-llava-v{TINY_VERSION}"):
        tuned = tune.load_projector(tiny_next[0], path)
    assert tuned.info.steps == 3
    with pytest.raises(ValueError, match="trained on base model"):
        tune.load_projector(tiny_next[0], path, strict=True)


def test_a_file_that_is_no_tuned_projector_is_refused(tiny_next, tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a VisionZip tuned projector"):
        tune.load_projector(tiny_next[0], tmp_path / "plain.safetensors")


@pytest.mark.parametrize(
    "family, budget_args, budget",
    [("llava_next", ["--preset", "320"], (54, 10)), ("llava", ["--dominant", "27", "--contextual", "5"], (27, 5))],
)
def test_command_line_trains_and_saves_the_projector(family, budget_args, budget, tmp_path):
    data = write_dataset(tmp_path, 4)
    checkpoint = str(tiny_checkpoint(family))
    args = ["--model", checkpoint, "--data", str(data), "--output", str(tmp_path / "out"), "--max-steps", "2"]
    tune.main(args + budget_args + ["--save-every", "1", "--lr", "1e-3"])
    assert (tmp_path / "out" / "projector-step1.safetensors").is_file()
    model = load_tiny(family)[0]
    tuned = tune.load_projector(model, tmp_path / "out" / "projector.safetensors", strict=True)
    assert tuned.info.base_model == checkpoint
    assert tuned.info.model_type == family
    assert (tuned.info.budget.dominant, tuned.info.budget.contextual, tuned.info.steps) == (*budget, 2)
    base = model.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(tensor, base[name]) for name, tensor in tuned.module.state_dict().items())


def test_command_line_requires_a_budget(tmp_path):
    with pytest.raises(SystemExit):
        tune.parse_args(["--model", "m", "--data", "d.json", "--output", str(tmp_path)])
