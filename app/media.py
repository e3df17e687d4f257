"""Reading what users upload: images and videos, told apart by content (never by extension), with a
plain message for every file that cannot be used and a note for every change made to one that can."""

from __future__ import annotations

import bisect
import functools
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

# PyAV before decord: decord loads its FFmpeg into the global symbol namespace, and a PyAV loaded
# after it binds to those older libraries (its libvpx encoder then fails to open).
import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_SIDE = 4096  # longer images are downscaled: the model sees at most 1008 pixels a side
MAX_ASPECT = 20  # wider (or taller) images are padded to this ratio: the processors upscale the short side
WIDE_ASPECT = 4  # wider than any LLaVA-NeXT tile grid (3:1): worth a note
TINY_SIDE = 32
MAX_FRAME_SIDE = 1024  # frames are decoded no larger: the model sees 336x336 tiles
SEEK_AFTER_FRAMES = 16  # decode forward over gaps up to this; seek to the keyframe over longer ones

# ISO base media files whose brand says "still image" (HEIF, AVIF) are images, not videos.
_IMAGE_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1", b"avif", b"avis"}
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
VIDEO_FORMATS = "MP4, MOV, WebM/MKV, AVI or animated GIF"
# The image formats PIL may open: photos and screenshots. PIL would also open EPS (run by Ghostscript)
# and dozens of rare formats; an upload in one of those is refused as no image.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")


class MediaError(ValueError):
    """A user-facing problem with an uploaded file; its message is shown as is, less server paths."""

    def __init__(self, message: str) -> None:
        super().__init__(without_paths(message))


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"]+)+[/\\]([^\s/\\'\":,]+)")


def without_paths(text: str) -> str:
    """`text` with every absolute file path cut to the file's name: a decoder's error names the
    server's upload folder, which is no business of the visitor's."""
    return _PATH.sub(r"\1", text)


# -- what a file is ---------------------------------------------------------------------------------
def detect_media_kind(path: str | os.PathLike) -> Literal["image", "video"]:
    """ "image" or "video" from the file's content; MediaError for anything else."""
    name = _name(path)
    container = _video_container(_read_head(path))
    if container == "gif":
        try:
            with Image.open(path, formats=image_formats()) as gif:
                return "video" if getattr(gif, "is_animated", False) else "image"
        except Exception:  # a damaged GIF: let the video reader say what is wrong with it
            return "video"
    if container is not None:
        return "video"
    try:
        with Image.open(path, formats=image_formats()):
            return "image"
    except Image.DecompressionBombError:
        return "image"  # load_image refuses it with the reason
    except (OSError, SyntaxError, ValueError):
        pass
    raise MediaError(f"{name} is neither an image nor a video we can read (videos: {VIDEO_FORMATS}).")


def _video_container(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file starting with `head`, if it is a video container we read.
    FFmpeg is always told the format: left to guess, it opens text files (as "tty") and playlists."""
    if head[4:8] == b"ftyp":
        return None if head[8:12] in _IMAGE_BRANDS else "mov"
    if head[4:8] in _QUICKTIME_ATOMS:
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # also WebM
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def image_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this PIL can open (AVIF and HEIF need optional plugins)."""
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def _read_head(path: str | os.PathLike, size: int = 16) -> bytes:
    try:
        with open(path, "rb") as file:
            head = file.read(size)
    except OSError as error:
        raise MediaError(f"{_name(path)} could not be read ({error.strerror}).") from None
    if not head:
        raise MediaError(f"{_name(path)} is empty (0 bytes).")
    return head


def _name(path: str | os.PathLike) -> str:
    return os.path.basename(str(path))


# -- images -----------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike) -> tuple[Image.Image, list[str]]:
    """Open an uploaded image as RGB, upright.  Returns the image and notes for the user (what was
    changed and why); raises MediaError with a plain message when it cannot be used."""
    name = _name(path)
    _read_head(path)
    notes: list[str] = []
    try:
        with Image.open(path, formats=image_formats()) as opened:
            width, height = opened.size
            if width * height > Image.MAX_IMAGE_PIXELS:  # PIL only warns up to twice its limit
                raise MediaError(
                    f"{name} is refused as a possible decompression bomb: {width}x{height} is "
                    f"{width * height / 1e6:.0f} megapixels, over the "
                    f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit."
                )
            if getattr(opened, "is_animated", False):
                notes.append("animated image: only its first frame is used")
            if max(width, height) > 2 * MAX_IMAGE_SIDE:  # JPEG can decode at 1/2, 1/4, 1/8 scale
                scale = MAX_IMAGE_SIDE / max(width, height)
                opened.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            orientation = opened.getexif().get(0x0112, 1)
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except MediaError:
        raise
    except Image.DecompressionBombError as error:
        raise MediaError(f"{name} is refused as a possible decompression bomb ({error}).") from None
    except UnidentifiedImageError:
        raise MediaError(f"{name} is not an image file (its content is in no image format we can read).") from None
    except MemoryError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for damaged files
        raise MediaError(f"{name} is truncated or corrupt and could not be decoded ({error}).") from None
    if orientation in range(2, 9):
        notes.append("turned upright from its EXIF orientation")
    image = _to_rgb(image, notes)
    if max(image.size) > MAX_IMAGE_SIDE:
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
        notes.append(f"downscaled from {width}x{height} to {image.width}x{image.height}")
    return _bounded_aspect(image, notes), notes


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":  # 16-bit or 32-bit grey: PIL's convert would clip at 255
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or values.max() > 255:
            values = values / 257
        notes.append(f"converted from high bit depth ({mode}) to 8-bit RGB")
        return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("transparent areas shown on white")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return rgba.convert("RGB")
    if mode != "RGB":
        notes.append(f"converted from {mode} to RGB")
        return image.convert("RGB")
    return image


def _bounded_aspect(image: Image.Image, notes: list[str]) -> Image.Image:
    width, height = image.size
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        short = math.ceil(max(width, height) / MAX_ASPECT)
        size = (width, short) if width > height else (short, height)
        padded = Image.new("RGB", size, (255, 255, 255))
        padded.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
        notes.append(f"extreme aspect ratio ({ratio:.0f}:1): padded with white to {MAX_ASPECT}:1")
        image = padded
    elif ratio > WIDE_ASPECT:
        notes.append(f"very {'wide' if width > height else 'tall'} image ({ratio:.0f}:1): fine detail may be lost")
    if max(image.size) < TINY_SIDE:
        notes.append(f"very small image ({width}x{height} pixels): the model sees it enlarged")
    return image


# -- videos -----------------------------------------------------------------------------------------
def load_video(
    path: str | os.PathLike,
    num_frames: int,
    max_decode_seconds: float = 30.0,
    max_side: int = MAX_FRAME_SIDE,
) -> tuple[list[Image.Image], list[float], dict[str, Any]]:
    """`num_frames` RGB frames sampled uniformly over the clip (the centre of each of `num_frames`
    equal spans; all frames if the clip has fewer), their times in seconds from the first frame,
    and info: backend ("decord", or "pyav" when decord is missing or fails on the file), fps,
    duration_s, total_frames, indices, width, height, notes.  Frames larger than `max_side` are
    downscaled.  Raises MediaError for a file that is no readable video or takes longer than
    `max_decode_seconds` to sample."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    name = _name(path)
    container_format = _video_container(_read_head(path))
    if container_format is None:
        raise MediaError(f"{name} is not a video in a format we read ({VIDEO_FORMATS}).")
    deadline = time.monotonic() + max_decode_seconds

    def check_deadline() -> None:
        if time.monotonic() > deadline:
            raise MediaError(
                f"reading {name} took longer than {max_decode_seconds:.0f} s; try fewer frames or a shorter clip."
            )

    probe = _probe(path, container_format, name)
    size = _frame_size(probe["width"], probe["height"], max_side)
    notes = []
    if size != (probe["width"], probe["height"]):
        notes.append(f"frames downscaled from {probe['width']}x{probe['height']} to {size[0]}x{size[1]}")
    try:
        import decord
    except ImportError:
        decord = None
        notes.append("decord is not installed: read with PyAV")
    if probe["rotation"]:
        # decord ignores the display matrix (and returns blank frames for such files).
        notes.append(f"turned upright from its recorded rotation ({probe['rotation']} degrees): read with PyAV")
    result = None
    if decord is not None and not probe["rotation"]:
        try:
            result = _read_decord(decord, path, num_frames, size, probe, check_deadline)
            backend = "decord"
        except MediaError:
            raise
        except Exception as error:  # decord fails on GIF and on some files FFmpeg reads: PyAV next
            notes.append(f"decord could not read it ({_first_line(error)}): read with PyAV")
    if result is None:
        result = _read_pyav(path, container_format, num_frames, size, probe, check_deadline)
        backend = "pyav"
    frames, timestamps, indices, total, fps = result
    if len(indices) < num_frames:
        notes.append(f"the clip has only {total} frame{'s' if total > 1 else ''}: all are used")
    duration = probe["duration_s"] or (total / fps if fps else timestamps[-1])
    info = {
        "backend": backend,
        "fps": fps,
        "duration_s": duration,
        "total_frames": total,
        "indices": indices,
        "width": frames[0].width,
        "height": frames[0].height,
        "notes": notes,
    }
    return frames, timestamps, info


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """The frame at the centre of each of `num_frames` equal spans of the clip (all if fewer)."""
    count = min(total_frames, num_frames)
    return [int((k + 0.5) * total_frames / count) for k in range(count)]


def _probe(path: str | os.PathLike, container_format: str, name: str) -> dict[str, Any]:
    """Open the file with PyAV, telling FFmpeg its format, before any decoder touches it."""
    try:
        with av.open(str(path), format=container_format, metadata_errors="replace") as container:
            if not container.streams.video:
                raise MediaError(f"{name} has no video frames.")
            stream = container.streams.video[0]
            if not stream.width or not stream.height:
                raise MediaError(f"{name} is corrupt: its video stream has no picture size.")
            first = next(container.decode(stream), None)
            if first is None:
                raise MediaError(f"{name} has no video frames.")
            duration = container.duration / av.time_base if container.duration else None
            return {
                "width": stream.width,
                "height": stream.height,
                "frames": stream.frames,
                "duration_s": duration,
                "rotation": round(first.rotation) % 360,  # counter-clockwise, from the display matrix
            }
    except av.FFmpegError as error:
        raise MediaError(
            f"{name} is truncated or corrupt: it cannot be opened as a video ({error.strerror})."
        ) from None


def _frame_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_complete(name: str, readable: int, probe: dict[str, Any]) -> None:
    if readable == 0:
        raise MediaError(f"{name} has no video frames.")
    if probe["frames"] and readable < probe["frames"]:
        raise MediaError(f"{name} is truncated: only {readable} of its {probe['frames']} frames are in the file.")


def _read_decord(decord, path, num_frames, size, probe, check_deadline: Callable[[], None]):
    name = _name(path)
    resize = {} if size == (probe["width"], probe["height"]) else {"width": size[0], "height": size[1]}
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), **resize)
    total = len(reader)
    _check_complete(name, total, probe)
    indices = sample_indices(total, num_frames)
    frames = []
    for index in indices:
        check_deadline()
        frames.append(Image.fromarray(reader[index].asnumpy()))
    starts = reader.get_frame_timestamp([0] + indices)[:, 0]
    timestamps = [float(start - starts[0]) for start in starts[1:]]
    return frames, timestamps, indices, total, float(reader.get_avg_fps())


def _read_pyav(path, container_format, num_frames, size, probe, check_deadline: Callable[[], None]):
    """Index the packets (no decoding), then decode only from the keyframe before each sampled
    frame, so the time taken grows with the frames asked for, not with the clip's length."""
    name = _name(path)
    try:
        with av.open(str(path), format=container_format, metadata_errors="replace") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            times, keyframe_times = [], []
            for count, packet in enumerate(container.demux(stream)):
                if count % 512 == 0:
                    check_deadline()
                stamp = packet.pts if packet.pts is not None else packet.dts
                if packet.size and stamp is not None:
                    times.append(stamp)
                    if packet.is_keyframe:
                        keyframe_times.append(stamp)
            times.sort()
            _check_complete(name, len(times), probe)
            keyframes = sorted(bisect.bisect_left(times, stamp) for stamp in keyframe_times) or [0]
            indices = sample_indices(len(times), num_frames)

            frames, decoded, position = [], None, -1
            for index in indices:
                keyframe = keyframes[max(0, bisect.bisect_right(keyframes, index) - 1)]
                target = times[index]
                if decoded is not None and keyframe - position <= SEEK_AFTER_FRAMES:
                    frame = _next_at_or_after(decoded, target, check_deadline)
                else:
                    decoded = _decode_from(container, stream, times[keyframe] if keyframe else None)
                    frame = _next_at_or_after(decoded, target, check_deadline)
                    if keyframe and frame is not None and frame.pts > target:  # the seek overshot
                        decoded = _decode_from(container, stream, None)
                        frame = _next_at_or_after(decoded, target, check_deadline)
                if frame is None:
                    raise MediaError(
                        f"{name} is truncated or corrupt: frame {index + 1} of {len(times)} cannot be decoded."
                    )
                image = frame.to_image(width=size[0], height=size[1])
                frames.append(image.rotate(frame.rotation, expand=True) if frame.rotation else image)
                position = index
            time_base = float(stream.time_base)
            timestamps = [(times[index] - times[0]) * time_base for index in indices]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else len(times) / (probe["duration_s"] or 1)
    except av.FFmpegError as error:
        raise MediaError(f"{name} is truncated or corrupt: decoding failed ({error.strerror}).") from None
    return frames, timestamps, indices, len(times), fps


def _decode_from(container, stream, stamp: int | None):
    """A fresh frame iterator from the keyframe at or before `stamp` (from the start if None)."""
    container.seek(stamp if stamp is not None else (stream.start_time or 0), stream=stream, backward=True)
    return container.decode(stream)


def _next_at_or_after(decoded, stamp: int, check_deadline: Callable[[], None]):
    for frame in decoded:
        check_deadline()
        if frame.pts is not None and frame.pts >= stamp:
            return frame
    return None


def _first_line(error: Exception) -> str:
    """The gist of a decoder's error, without decord's "[time] source.cc:line:" prefix."""
    lines = str(error).strip().splitlines()
    text = without_paths(re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[-1]))[:160] if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- clips, cached: every turn, side, header and filmstrip of a conversation reads the same frames ----
FRAME_SIDE = 672  # frames are decoded no larger: the model sees 336x336 tiles, and many frames stay cached


@dataclass(frozen=True)
class Clip:
    """Frames sampled uniformly from a video, their times, and load_video's info (backend, fps,
    duration_s, total_frames, indices, width, height, notes).  Shared from a cache: never mutate."""

    frames: tuple[Image.Image, ...]
    timestamps_s: tuple[float, ...]
    info: dict[str, Any]


def load_clip(path: str, num_frames: int) -> Clip:
    """`num_frames` frames of the video at `path` (all of them if it has fewer); raises MediaError.
    Cached: every turn, side, header and filmstrip of a conversation reads the same frames."""
    stat = os.stat(path)
    return _load_clip(path, num_frames, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=6)
def _load_clip(path: str, num_frames: int, mtime_ns: int, size: int) -> Clip:
    frames, timestamps, info = load_video(path, num_frames, max_side=FRAME_SIDE)
    return Clip(tuple(frames), tuple(timestamps), info)
