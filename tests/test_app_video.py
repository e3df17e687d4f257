"""Video in the demo, driven through its named endpoints with gradio_client on the tiny offline
LLaVA-NeXT: clips written with PyAV here, counts from the model's geometry and the presets."""

import av  # before anything loads decord (see app/media.py)
import numpy as np
import pytest
import torch
from gradio_client import handle_file
from PIL import Image

from app import overlay
from app.media import Clip
from app.models import TINY_LABEL, ModelRegistry
from app.video import filmstrip, frame_tile
from visionzip import preset_budget
from visionzip.video import frame_pixel_values

CLIP_FRAMES, FPS = 60, 10
VISIONZIP_320 = preset_budget("llava_next", 320)  # the right side's default mode: D + C tokens a frame


def write_clip(path, codec="libx264", frames=CLIP_FRAMES, width=320, height=180):
    """A clip whose frames all differ: a bar that grows and a red level that rises with time."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for number in range(frames):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[..., 0] = number * 255 // frames
            pixels[: (number * 7) % height, :, 1] = 200
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def registry():
    registry = ModelRegistry()
    registry.get(TINY_LABEL)  # the side headers count tokens with a loaded model
    return registry


@pytest.fixture(scope="module")
def max_new_tokens():
    return 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4")


@pytest.fixture(scope="module")
def patches_per_frame(tiny_next):
    """Stock LLaVA's tokens for one 336x336 tile: its patches, from the vision tower's geometry."""
    vision = tiny_next[0].config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def set_video(client, path, num_frames=4, same_budget=False) -> tuple:
    """Upload a clip; returns (media info, left header, right header)."""
    result = client.predict(None, handle_file(str(path)), num_frames, same_budget, api_name="/set_media")
    return result[4:7]


def ask(client, question):
    return client.predict(question, api_name="/ask")


def by_side(stats, turn):
    return {record["side"]: record for record in stats if record["turn"] == turn}


def assert_answered(record, visual_tokens):
    assert record["error"] is None
    assert record["visual_tokens"] == visual_tokens
    assert record["context_tokens"] == visual_tokens + record["text_tokens"]
    assert record["vision_ms"] > 0 and record["ttft_ms"] >= record["vision_ms"]
    assert record["llm_prefill_ms"] == pytest.approx(record["ttft_ms"] - record["vision_ms"])
    assert record["new_tokens"] > 0


@pytest.mark.parametrize(
    "name, codec", [("clip.webm", "libvpx-vp9"), ("clip.mov", "libx264"), ("clip.avi", "mpeg4"), ("clip.gif", None)]
)
def test_each_video_format_is_accepted(client, tmp_path, name, codec):
    path = tmp_path / name
    if codec is None:
        frames = [Image.new("RGB", (96, 64), (k * 20, 90, 200 - k * 20)) for k in range(8)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    else:
        write_clip(path, codec, frames=12, width=128, height=72)
    info, *_ = set_video(client, path, num_frames=3)
    assert "3 sampled" in info
    assert "decoded with decord" in info or "decoded with pyav" in info


def test_two_turns_over_a_clip_on_both_sides(client, clip, patches_per_frame):
    full, reduced = 4 * patches_per_frame, 4 * VISIONZIP_320.per_tile
    info, _, _ = set_video(client, clip)
    assert f"({CLIP_FRAMES} frames): 4 sampled" in info
    # before anything runs, each side's header gives its count and whether it fits
    left_header, right_header = client.predict(4, False, api_name="/set_frames")[1:]
    assert f"{full:,} visual tokens" in left_header and "fits" in left_header
    assert f"{reduced:,} visual tokens" in right_header and "fits" in right_header

    text_tokens = []
    for number, question in enumerate(["What happens in the video?", "What colour is the bar?"], start=1):
        left, right, stats, summary = ask(client, question)
        for history in (left, right):
            assert len(history) == 2 * number
            assert "4 frames" in history[-1]["content"][0]["text"]
        sides = by_side(stats, number)
        assert_answered(sides["left"], full)
        assert_answered(sides["right"], reduced)
        assert f"{full} -> {reduced} visual tokens" in summary
        text_tokens.append(sides["left"]["text_tokens"])
    assert text_tokens[0] < text_tokens[1]  # the second turn re-reads the first question and answer


def test_same_budget_gives_the_visionzip_side_more_frames(client, clip, patches_per_frame):
    more = 4 * patches_per_frame // VISIONZIP_320.per_tile  # frames that fit in the full side's tokens
    assert 4 < more <= CLIP_FRAMES
    set_video(client, clip, num_frames=4, same_budget=True)
    left, right, stats, _ = ask(client, "What happens in the video?")
    sides = by_side(stats, 1)
    assert_answered(sides["left"], 4 * patches_per_frame)
    assert_answered(sides["right"], more * VISIONZIP_320.per_tile)
    assert f"{more} frames" in right[-1]["content"][0]["text"]
    # the frame labels in the prompt grow with the frames: the right side reads more text
    assert sides["right"]["text_tokens"] > sides["left"]["text_tokens"]


def test_a_clip_too_long_for_the_full_side_is_refused_there_while_the_other_answers(client, clip, patches_per_frame):
    frames = 8
    assert frames * patches_per_frame > 4096 > frames * VISIONZIP_320.per_tile  # the tiny model's context window
    set_video(client, clip, num_frames=frames)
    left_header, right_header = client.predict(frames, False, api_name="/set_frames")[1:]
    assert "refused" in left_header and f"{frames * patches_per_frame:,} visual tokens" in left_header
    assert "fits" in right_header

    left, right, stats, _ = ask(client, "What happens in the video?")
    sides = by_side(stats, 1)
    assert "context window" in sides["left"]["error"] and "fewer frames" in sides["left"]["error"]
    assert sides["left"]["new_tokens"] == 0  # refused before anything ran, never truncated
    assert_answered(sides["right"], frames * VISIONZIP_320.per_tile)
    assert "context window" in left[-1]["content"][0]["text"]


def test_a_broken_video_is_refused_and_the_conversation_goes_on(client, clip, tmp_path, patches_per_frame):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip.read_bytes()[:600])  # the header survives, the frames do not
    set_video(client, clip)
    ask(client, "What happens in the video?")
    with pytest.raises(Exception, match="broken.mp4 is truncated or corrupt"):
        set_video(client, broken)
    left, right, stats, _ = ask(client, "And then?")
    assert len(left) == len(right) == 4
    assert by_side(stats, 2)["left"]["visual_tokens"] == 4 * patches_per_frame  # still the first clip


# -- the filmstrip: drawn where the model looked --------------------------------------------------
def gradient_frame(shift: int) -> Image.Image:
    """A smooth bluish 640x360 frame: a cell's centre pixel survives any resampling."""
    y, x = np.mgrid[0:360, 0:640]
    pixels = np.stack([(x + shift) % 640 * 100 // 640, y * 100 // 360, np.full_like(x, 180)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("family, fixture", [("llava_next", "tiny_next"), ("llava", "tiny_llava")])
def test_filmstrip_frames_are_the_tiles_the_model_sees(request, family, fixture):
    _, processor = request.getfixturevalue(fixture)
    y, x = np.mgrid[0:360, 0:640]  # 16:9 ramps: squashing and centre-cropping differ
    frame = Image.fromarray(np.stack([x * 255 // 640, y * 255 // 360, np.full_like(x, 128)], axis=-1).astype(np.uint8))
    pixels = frame_pixel_values(processor, [frame])[0]
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    seen = ((pixels * std + mean) * 255).permute(1, 2, 0).numpy()
    other = "llava" if family == "llava_next" else "llava_next"

    def error(tile):
        return np.abs(np.asarray(tile, dtype=np.float32) - seen).mean()

    assert error(frame_tile(frame, family)) < 2
    assert error(frame_tile(frame, other)) > 5


def test_filmstrip_marks_each_frames_kept_tokens(registry):
    from app.modes import make_mode
    from app.overlay import frame_selections

    loaded = registry.get(TINY_LABEL)
    mode = make_mode("VisionZip 320", "llava_next")
    clip = Clip(tuple(gradient_frame(shift) for shift in (0, 200, 400)), (0.0, 0.5, 1.0), {})
    selections = frame_selections(loaded, clip.frames, mode)
    strip = filmstrip(clip, "llava_next", selections, 576)
    assert len(strip) == 3
    for (picture, caption), selection, frame in zip(strip, selections, clip.frames):
        assert f"{mode.dominant} kept + {mode.contextual} merged tokens" in caption
        tile = selection.tiles[0]
        # each cell's centre pixel, drawn and plain: kept cells show the picture tinted yellow, the others do not
        centres = ((np.arange(tile.side) + 0.5) * picture.width / tile.side).astype(int)
        drawn = np.asarray(picture, dtype=np.float32)[centres][:, centres]
        plain = np.asarray(frame_tile(frame, "llava_next").resize(picture.size), dtype=np.float32)[centres][:, centres]
        tinted = (1 - overlay.KEPT_TINT) * plain + overlay.KEPT_TINT * np.array(overlay.KEPT_RGB)
        miss = np.abs(drawn - tinted).mean(axis=-1)
        kept = tile.groups().numpy() == -1
        assert kept.sum() == mode.dominant - 1  # the CLS token is kept too, but is no cell
        assert miss[kept].mean() < 10 and miss[~kept].mean() > 40
