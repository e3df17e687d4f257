"""Video in the app: how many frames the "same budget" mode gives a reducing side, the clip's info
line, and the filmstrip of what a method keeps on each frame (clips load in app.media)."""

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
