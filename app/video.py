"""Video in the app: how many frames the "same budget" mode gives a reducing side, the clip's info
line, and the filmstrip of what a method keeps on each frame, or on each frame pair for a model that pairs
frames in time (Qwen2.5-VL); clips load in app.media."""

from __future__ import annotations

from PIL import Image, ImageOps

from app import overlay
from app.media import Clip
from visionzip import ImageSelection

DEFAULT_FRAMES = 4  # a 4096-token context holds about 6 full frames (576 tokens each)
MAX_FRAMES = 32  # the slider's top: far past what a full side fits, so a refusal can be seen
FILMSTRIP_PX = 320  # drawn size of each filmstrip frame


def same_budget_frames(num_frames: int, full_tokens_per_frame: int, tokens_per_frame: int, total_frames: int) -> int:
    """Frames a side with `tokens_per_frame` tokens a frame fits in the tokens `num_frames` full
    frames take (the VisionZip authors' demonstration: more frames in the same context), at most
    the clip's `total_frames` and never fewer than `num_frames`."""
    return min(total_frames, max(num_frames, num_frames * full_tokens_per_frame // tokens_per_frame))


def describe_clip(name: str, clip: Clip) -> str:
    """One line for the user: the clip, how many frames were sampled, which decoder read them."""
    info = clip.info
    notes = "; ".join(info["notes"])
    return (
        f"{info['width']}x{info['height']} video `{name}`, {info['duration_s']:.1f} s at {info['fps']:.0f} fps "
        f"({info['total_frames']} frames): {len(clip.frames)} sampled, decoded with {info['backend']}"
        + (f" ({notes})" if notes else "")
    )


def frame_tile(frame: Image.Image, family: str) -> Image.Image:
    """The picture the model's single tile sees: LLaVA-NeXT squashes the whole frame into its 336x336
    base tile, LLaVA-OneVision into its 384x384 one; LLaVA-1.5 resizes the shortest edge and crops the centre."""
    side = overlay.TILE_PX if family != "llava_onevision" else overlay.TILE_GEOMETRY[27][0]
    size = (side, side)
    return ImageOps.fit(frame, size) if family == "llava" else frame.resize(size, Image.Resampling.BICUBIC)


def clip_metadata(clip: Clip) -> dict:
    """What a model that spaces a clip's temporal positions by time needs (Qwen2.5-VL's processor: its
    seconds per frame pair): the video's frame count and rate, and which frames were sampled."""
    info = clip.info
    return {
        "total_num_frames": info["total_frames"],
        "fps": info["fps"] or None,
        "frames_indices": list(info["indices"]),
    }


def frame_pairs(clip: Clip) -> list[tuple[int, int]]:
    """(first, last) frame index of each pair a model with temporal patch 2 sees: an odd last frame pairs
    with itself (the processor repeats it)."""
    count = len(clip.frames)
    return [(first, min(first + 1, count - 1)) for first in range(0, count, 2)]


def pair_filmstrip(
    clip: Clip, selections: list[ImageSelection] | None, full_tokens_per_pair: int
) -> list[tuple[Image.Image, str]]:
    """(picture, caption) per frame pair for a gr.Gallery: the pair's first frame, whole (the model's cells
    cover the whole resized frame), with what the method kept on the pair's merged cells drawn on it."""
    pairs = frame_pairs(clip)
    if selections is not None and len(selections) != len(pairs):
        raise ValueError(f"{len(selections)} selections for {len(pairs)} frame pairs")
    strip = []
    for k, (first, last) in enumerate(pairs):
        frame = clip.frames[first]
        if selections is None:
            picture, tokens = frame, f"all {full_tokens_per_pair} tokens"
        else:
            chosen = selections[k].tiles[0]
            picture = overlay.draw_overlay(frame, selections[k])
            tokens = f"{len(chosen.kept)} kept + {len(chosen.targets)} merged tokens"
        picture = picture.copy()
        picture.thumbnail((FILMSTRIP_PX, FILMSTRIP_PX), Image.Resampling.BICUBIC)
        times = f"{clip.timestamps_s[first]:.1f}–{clip.timestamps_s[last]:.1f} s"
        strip.append((picture, f"frames {first + 1}–{last + 1} · {times} · {tokens}"))
    return strip


def filmstrip(
    clip: Clip, family: str, selections: list[ImageSelection] | None, full_tokens_per_frame: int
) -> list[tuple[Image.Image, str]]:
    """(picture, caption) per frame for a gr.Gallery: each frame's tile with its kept and merged
    tokens drawn on it, or the plain tile when no side reduces (`selections` None)."""
    if selections is not None and len(selections) != len(clip.frames):
        raise ValueError(f"{len(selections)} selections for {len(clip.frames)} frames")
    strip = []
    for k, (frame, seconds) in enumerate(zip(clip.frames, clip.timestamps_s)):
        tile = frame_tile(frame, family)
        if selections is None:
            picture, tokens = tile, f"all {full_tokens_per_frame} tokens"
        else:
            chosen = selections[k].tiles[0]
            picture = overlay.draw_overlay(tile, selections[k])
            cls = 1 if overlay.keeps_cls(selections[k].method, chosen) else 0
            tokens = f"{len(chosen.kept) + cls} kept + {len(chosen.targets)} merged tokens"
        picture = picture.resize((FILMSTRIP_PX, FILMSTRIP_PX), Image.Resampling.BICUBIC)
        strip.append((picture, f"frame {k + 1} · {seconds:.1f} s · {tokens}"))
    return strip
