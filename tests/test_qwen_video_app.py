"""Qwen2.5-VL video in the app, through its handlers (no server): a Qwen side takes a clip natively (frames
paired in time), its count is known before anything runs and equals what the turn feeds the model, two turns
with the quality signal, the filmstrip per frame pair with the kept cells, "same budget" frames, and FastV
refused on video with its reason while the other side answers."""

from dataclasses import replace

import pytest
import torch
from test_app_video import write_clip  # noqa: I001 (imports av before anything loads decord)

from app.handlers import Handlers, new_conversation
from app.media import load_clip
from app.models import TINY_QWEN_LABEL, ModelRegistry
from app.modes import make_mode, use_mode
from app.video import frame_pairs

QWEN = "qwen2_5_vl"
FRAMES = 5  # odd: the last frame pairs with itself
CELLS = 13 * 23  # a 360x640 frame resized to 364x644 px: 13 x 23 merged cells per frame pair
PAIRS = 3


@pytest.fixture(scope="module")
def registry():
    registry = ModelRegistry()
    registry.get(TINY_QWEN_LABEL)  # the side headers count tokens with a loaded model
    return registry


@pytest.fixture(scope="module")
def handlers(registry, tmp_path_factory):
    return Handlers(registry, max_new_tokens=3, stops=tmp_path_factory.mktemp("stops"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return str(write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", width=640, height=360))


def qwen_video(handlers, clip, left: str, right: str, **options):
    conversation = handlers.set_model(new_conversation(handlers.registry), TINY_QWEN_LABEL, TINY_QWEN_LABEL)["state"]
    same_budget = options.pop("same_budget", False)
    conversation = replace(conversation, **options)
    conversation = handlers.set_media(None, conversation, {"path": clip}, FRAMES, same_budget)["state"]
    titles = [make_mode(name, QWEN).method_title for name in (left, right)]
    return handlers.set_mode(conversation, left, 54, 10, right, 54, 10, False, False, *titles)


def test_two_turns_over_a_clip_count_pairs_and_draw_the_kept_cells(handlers, clip):
    results = qwen_video(handlers, clip, "Full", "VisionZip 128", quality_check=True)
    conversation = results["state"]
    assert conversation.media_kind == "video"
    # before anything runs, each side's header counts frame pairs of the clip's merged cells
    headers = handlers.headers(conversation)
    assert f"{PAIRS} frame pairs × {CELLS} = {PAIRS * CELLS:,} visual tokens" in headers["left_header"]
    assert f"{PAIRS} frame pairs × 128 = {PAIRS * 128:,} visual tokens" in headers["right_header"]

    for question in ["What happens in the video?", "What colour is the bar?"]:
        conversation = list(handlers.ask(question, conversation))[-1]["state"]
        turn = conversation.turns[-1]
        for side, visual in (("left", PAIRS * CELLS), ("right", PAIRS * 128)):
            stats = turn.stats[side]
            assert stats.error is None and stats.visual_tokens == visual and stats.new_tokens > 0, (side, stats)
            assert turn.frames[side] == FRAMES
        assert turn.stats["right"].kl_to_full is not None and turn.stats["right"].kl_to_full >= 0
        # what the turn recorded: one choice per frame pair, 128 of the pair's cells each
        selections = turn.selections["right"]
        assert [image.num_tokens for image in selections] == [128] * PAIRS
        assert all(image.grid == (13, 23) for image in selections)
    assert conversation.turns[0].stats["left"].text_tokens < conversation.turns[1].stats["left"].text_tokens

    strip = handlers.refresh_filmstrip(conversation)
    gallery = strip["filmstrip"]
    captions = [item["caption"] for item in gallery.value]
    assert len(captions) == PAIRS  # only the reducing side draws, one picture per frame pair
    assert captions[0].startswith("frames 1–2 · ") and captions[-1].startswith("frames 5–5 · ")
    for image, caption in zip(selections, captions):  # VisionZip 128 on Qwen: 108 dominant + 20 contextual a pair
        assert f"{len(image.tiles[0].kept)} kept + {len(image.tiles[0].targets)} merged tokens" in caption
        assert (len(image.tiles[0].kept), len(image.tiles[0].targets)) == (108, 20)
    assert "frame pairs" in strip["legend"] and "13x23 merged cells" in strip["legend"]


def test_the_filmstrip_choice_is_the_turns_choice(handlers, clip):
    """The filmstrip's tower-only run chooses the same cells per pair as the turn's own prefill did."""
    conversation = qwen_video(handlers, clip, "Full", "DivPrune 64")["state"]
    conversation = list(handlers.ask("What moves?", conversation))[-1]["state"]
    turn_choice = [image.tiles[0].kept.tolist() for image in conversation.turns[-1].selections["right"]]
    loaded = handlers.registry.get(TINY_QWEN_LABEL)
    frames = load_clip(clip, FRAMES).frames
    drawn = handlers.select_tokens(TINY_QWEN_LABEL, conversation.sides["right"].mode, frames, True)
    assert [image.tiles[0].kept.tolist() for image in drawn] == turn_choice
    assert len(frame_pairs(load_clip(clip, FRAMES))) == PAIRS
    with use_mode(loaded, conversation.sides["right"].mode):
        assert loaded.handle.family.num_video_tokens(loaded.handle, (FRAMES, 360, 640), loaded.handle.settings) == 192


def test_same_budget_gives_the_reducing_side_more_frames(handlers, clip):
    conversation = qwen_video(handlers, clip, "Full", "Pool 64", same_budget=True)["state"]
    headers = handlers.headers(conversation)
    pooled = 5 * 8  # Pool 64 on 13x23 cells: window 3, a 5x8 grid per pair
    more = min(60, FRAMES * CELLS // pooled)  # as many frames as fit in the full side's tokens
    assert f"{(more + 1) // 2} frame pairs × {pooled} =" in headers["right_header"]
    conversation = list(handlers.ask("What happens?", conversation))[-1]["state"]
    assert conversation.turns[-1].frames == {"left": FRAMES, "right": more}
    assert conversation.turns[-1].stats["right"].visual_tokens == (more + 1) // 2 * pooled


def test_fastv_is_refused_on_qwen_video_and_the_other_side_answers(handlers, clip):
    conversation = qwen_video(handlers, clip, "FastV 128", "VisionZip 64")["state"]
    assert "⚠️ FastV chooses among the image placeholders" in handlers.headers(conversation)["left_header"]
    conversation = list(handlers.ask("What happens?", conversation))[-1]["state"]
    left, right = conversation.turns[-1].stats["left"], conversation.turns[-1].stats["right"]
    assert "does not run on video" in left.error and "/" not in left.error  # a reason, no server path
    assert right.error is None and right.visual_tokens == PAIRS * 64


def test_a_turn_feeds_the_model_what_the_header_counted(registry, clip):
    """The prompt the turn builds holds exactly the counted placeholders, and its prefill's logits equal the
    library's own call on the processor's inputs (no hand-built embeddings)."""
    from app.conversation import Conversation, SideConfig, messages_for
    from app.turn import PairedVideoPrepared, prepare_video

    loaded = registry.get(TINY_QWEN_LABEL)
    mode = make_mode("VisPruner 64", QWEN)
    sides = {side: SideConfig(TINY_QWEN_LABEL, mode) for side in ("left", "right")}
    conversation = Conversation(sides, media_path=clip, media_kind="video", num_frames=FRAMES)
    prepared = prepare_video(loaded, mode, conversation, messages_for(conversation, "left", "Why?"), 4)
    assert isinstance(prepared, PairedVideoPrepared) and prepared.visual_tokens == PAIRS * 64
    ids = prepared.inputs["input_ids"]
    assert int((ids == loaded.model.config.video_token_id).sum()) == prepared.visual_tokens
    with torch.inference_mode(), prepared.use():
        features = prepared.encode()
        logits = loaded.model(**prepared.generate_inputs(features)).logits
        direct = loaded.model(**prepared.inputs).logits
    torch.testing.assert_close(logits, direct)
