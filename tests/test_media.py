"""Uploads: images and videos read by content, odd files loaded with notes, bad ones refused clearly."""

import importlib.util
import struct
import sys
import zlib
from fractions import Fraction

import av  # before anything loads decord (see app/media.py)
import numpy as np
import pytest
from PIL import Image

from app.media import MediaError, detect_media_kind, load_image, load_video

BITS = 12  # a frame's number, drawn as 12 black/white stripes, survives any codec
STRIPE = 8


# -- synthetic clips --------------------------------------------------------------------------------
def frame_array(number, height, width):
    pixels = np.zeros((height, width, 3), np.uint8)
    for bit in range(BITS):
        if number >> bit & 1:
            pixels[:, bit * STRIPE : (bit + 1) * STRIPE] = 255
    pixels[:, BITS * STRIPE :, 0] = number * 37 % 256  # the rest: a colour that changes every frame
    pixels[:, BITS * STRIPE :, 2] = np.linspace(0, 255, width - BITS * STRIPE, dtype=np.uint8)
    return pixels


def frame_number(image, scale=1.0):
    """The number drawn by frame_array, read back from a frame `scale` times the drawn size."""
    pixels = np.asarray(image)
    stripes = [pixels[:, round(bit * STRIPE * scale) : round((bit + 1) * STRIPE * scale)] for bit in range(BITS)]
    return sum(int(stripe.mean() > 128) << bit for bit, stripe in enumerate(stripes))


def write_clip(
    path, codec, num_frames, width=128, height=64, fps=10, pts_ms=None, options=None, container_options=None, rotation=0
):
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)  # as phones record portrait video
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for number in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_array(number, height, width), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[number], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_gif(path, durations_ms, width=128, height=64):
    frames = [Image.fromarray(frame_array(number, height, width)) for number in range(len(durations_ms))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations_ms, loop=0)
    return path


def read_with(backend, monkeypatch, path, num_frames, **kwargs):
    if backend == "decord":
        pytest.importorskip("decord", reason="decord is not installed (wheels exist for x86-64 Linux only)")
    else:
        monkeypatch.setitem(sys.modules, "decord", None)  # as if decord were not installed
    frames, timestamps, info = load_video(path, num_frames, **kwargs)
    assert info["backend"] == backend
    return frames, timestamps, info


CLIPS = {  # name: (codec, frames, width, height)
    "h264.mp4": ("libx264", 30, 128, 64),
    "mpeg4.mp4": ("mpeg4", 20, 96, 64),
    "mpeg4.avi": ("mpeg4", 25, 192, 96),
    "h264.mov": ("libx264", 24, 160, 90),
    "vp9.webm": ("libvpx-vp9", 20, 128, 72),
    "h264.mkv": ("libx264", 20, 96, 48),
    "single.mp4": ("libx264", 1, 96, 64),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    written = {}
    for name, (codec, num_frames, width, height) in CLIPS.items():
        try:
            written[name] = write_clip(folder / name, codec, num_frames, width, height)
        except av.FFmpegError as error:
            written[name] = error  # e.g. libvpx shadowed by an earlier import of decord
    vfr_pts_ms = [0, 40, 80, 300, 310, 320, 900, 1000, 1600]
    written["vfr.mp4"] = write_clip(folder / "vfr.mp4", "libx264", len(vfr_pts_ms), pts_ms=vfr_pts_ms)
    return written


def clip_path(clips, name):
    path = clips[name]
    if isinstance(path, Exception):
        pytest.skip(f"the {CLIPS[name][0]} encoder could not open in this process: {path}")
    return path


def assert_uniform(indices, total, count):
    """One frame from the middle of each of `count` equal spans of the clip."""
    assert len(indices) == min(total, count) and indices == sorted(set(indices))
    centres = (np.arange(len(indices)) + 0.5) * total / len(indices)
    assert np.abs(np.array(indices) - centres).max() < 1


# -- videos -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CLIPS))
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_sampled_frames_are_the_frames_at_their_indices(clips, monkeypatch, name, backend):
    _, total, width, height = CLIPS[name]
    frames, timestamps, info = read_with(backend, monkeypatch, clip_path(clips, name), 6)
    assert info["total_frames"] == total
    assert_uniform(info["indices"], total, 6)
    assert [frame_number(frame) for frame in frames] == info["indices"]
    assert all(frame.mode == "RGB" and frame.size == (width, height) for frame in frames)
    assert timestamps == pytest.approx([index / 10 for index in info["indices"]], abs=1e-3)
    assert info["fps"] == pytest.approx(10, rel=1e-3)
    assert info["duration_s"] == pytest.approx(total / 10, abs=0.05)


@pytest.mark.parametrize("name", list(CLIPS) + ["vfr.mp4"])
def test_decord_and_pyav_agree(clips, monkeypatch, name):
    path = clip_path(clips, name) if name in CLIPS else clips[name]
    by_decord = read_with("decord", monkeypatch, path, 8)
    by_pyav = read_with("pyav", monkeypatch, path, 8)
    assert by_decord[2]["indices"] == by_pyav[2]["indices"]
    assert by_decord[1] == pytest.approx(by_pyav[1], abs=1e-3)
    for mine, theirs in zip(by_decord[0], by_pyav[0]):
        difference = np.abs(np.asarray(mine, np.int16) - np.asarray(theirs, np.int16))
        assert difference.mean() < 2.0  # same stream, two FFmpeg builds' colour conversions


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_variable_frame_rate_keeps_each_frames_own_time(clips, monkeypatch, backend):
    frames, timestamps, info = read_with(backend, monkeypatch, clips["vfr.mp4"], 9)
    assert [frame_number(frame) for frame in frames] == list(range(9))
    assert timestamps == pytest.approx([0, 0.04, 0.08, 0.3, 0.31, 0.32, 0.9, 1.0, 1.6], abs=1e-3)


def test_animated_gif_is_a_video_read_by_pyav_when_decord_fails(tmp_path):
    path = write_gif(tmp_path / "anim.gif", [100] * 6 + [50] * 6)
    assert detect_media_kind(path) == "video"
    frames, timestamps, info = load_video(path, 4)
    assert info["backend"] == "pyav"
    if importlib.util.find_spec("decord"):  # decord cannot read GIF: the fallback must say so
        assert any("decord could not read it" in note for note in info["notes"])
    assert not [note for note in info["notes"] if str(tmp_path) in note or "/" + path.name in note]  # no server path
    assert [frame_number(frame) for frame in frames] == info["indices"]
    starts = np.cumsum([0] + [100] * 6 + [50] * 5) / 1000
    assert timestamps == pytest.approx([starts[index] for index in info["indices"]], abs=1e-3)


def test_missing_decord_falls_back_to_pyav_with_a_note(clips, monkeypatch):
    _, _, info = read_with("pyav", monkeypatch, clip_path(clips, "h264.mp4"), 3)
    assert "decord is not installed: read with PyAV" in info["notes"]


def test_fewer_frames_than_asked_uses_all_with_a_note(clips):
    frames, _, info = load_video(clip_path(clips, "single.mp4"), 8)
    assert len(frames) == 1 and info["indices"] == [0]
    assert "the clip has only 1 frame: all are used" in info["notes"]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_large_frames_are_downscaled_alike(clips, monkeypatch, backend):
    frames, _, info = read_with(backend, monkeypatch, clip_path(clips, "mpeg4.avi"), 3, max_side=96)
    assert all(frame.size == (96, 48) for frame in frames)
    assert "frames downscaled from 192x96 to 96x48" in info["notes"]
    assert [frame_number(frame, scale=0.5) for frame in frames] == info["indices"]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_long_clip_seeks_to_the_right_frames(tmp_path, monkeypatch, backend):
    path = write_clip(tmp_path / "long.mp4", "libx264", 1500, 128, 48, fps=30, options={"g": "250"})
    frames, timestamps, info = read_with(backend, monkeypatch, path, 12)
    assert_uniform(info["indices"], 1500, 12)
    assert [frame_number(frame) for frame in frames] == info["indices"]
    assert timestamps == pytest.approx([index / 30 for index in info["indices"]], abs=1e-3)


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotated_video_is_turned_upright(tmp_path, degrees):
    path = write_clip(tmp_path / "phone.mp4", "libx264", 10, 128, 64, rotation=degrees)
    frames, _, info = load_video(path, 3)
    assert info["backend"] == "pyav"
    assert any(note.startswith("turned upright from its recorded rotation") for note in info["notes"])
    for frame, index in zip(frames, info["indices"]):
        upright = np.rot90(frame_array(index, 64, 128), k=degrees // 90)  # counter-clockwise, as recorded
        assert frame.size == (upright.shape[1], upright.shape[0])
        assert np.abs(np.asarray(frame, np.int16) - upright).mean() < 4


def test_decoding_time_is_bounded(clips):
    with pytest.raises(MediaError, match="took longer than 0 s; try fewer frames or a shorter clip"):
        load_video(clip_path(clips, "h264.mp4"), 8, max_decode_seconds=0)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match="clip.mp4 is empty"):
        detect_media_kind(path)
    with pytest.raises(MediaError, match="clip.mp4 is empty"):
        load_video(path, 4)


def test_video_without_frames_is_refused(tmp_path):
    path = tmp_path / "noframes.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # header and trailer, no frame
    with pytest.raises(MediaError, match="noframes.mp4 has no video frames"):
        load_video(path, 4)


def test_truncated_video_is_refused(tmp_path):
    whole = write_clip(tmp_path / "whole.mp4", "libx264", 30, 128, 64).read_bytes()
    cut = tmp_path / "cut.mp4"  # the index (moov) is written last, so it is lost
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MediaError, match="cut.mp4 is truncated or corrupt"):
        load_video(cut, 4)


def test_truncated_streamable_video_is_refused(tmp_path):
    """With the index first (faststart), half the frames are listed but missing."""
    path = write_clip(tmp_path / "whole.mp4", "libx264", 40, 128, 64, container_options={"movflags": "faststart"})
    whole = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: int(len(whole) * 0.6)])
    with pytest.raises(MediaError, match=r"cut.mp4 is truncated"):
        load_video(cut, 4)


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.mp4", b"hello, this is not a video\n" * 20),
        ("notes.txt", b"hello, this is not a video\n" * 20),  # FFmpeg alone would open this as "tty" video
        ("playlist.mp4", b"#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"),
    ],
)
def test_a_file_that_is_no_video_is_refused_whatever_its_extension(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MediaError, match=f"{name} is not a video in a format we read"):
        load_video(path, 4)
    with pytest.raises(MediaError, match=f"{name} is neither an image nor a video"):
        detect_media_kind(path)


def test_kind_comes_from_content_not_extension(tmp_path, clips):
    disguised_video = tmp_path / "photo.png"
    disguised_video.write_bytes(clip_path(clips, "h264.mp4").read_bytes())
    disguised_image = tmp_path / "clip.mp4"
    Image.new("RGB", (8, 8)).save(disguised_image, format="PNG")
    still_gif = tmp_path / "still.gif"
    Image.new("RGB", (8, 8)).save(still_gif)
    assert detect_media_kind(disguised_video) == "video"
    assert detect_media_kind(disguised_image) == "image"
    assert detect_media_kind(still_gif) == "image"
    assert len(load_video(disguised_video, 2)[0]) == 2
    with pytest.raises(MediaError, match="clip.mp4 is not a video"):
        load_video(disguised_image, 2)
    with pytest.raises(MediaError, match="photo.png is not an image file"):
        load_image(disguised_video)


# -- images -----------------------------------------------------------------------------------------
def test_text_file_is_not_an_image_whatever_its_extension(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("not an image at all\n")
    with pytest.raises(MediaError, match="photo.jpg is not an image file"):
        load_image(path)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_image_is_refused(tmp_path, image_format):
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole"
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(whole, format=image_format)
    cut = tmp_path / f"cut.{image_format.lower()}"
    cut.write_bytes(whole.read_bytes()[:6000])
    assert detect_media_kind(cut) == "image"
    with pytest.raises(MediaError, match=f"cut.{image_format.lower()} is truncated or corrupt"):
        load_image(cut)


def test_decompression_bomb_is_refused(tmp_path):
    """A PNG whose header claims 40000x40000 pixels: refused from the header, nothing decoded."""
    small = tmp_path / "small.png"
    Image.new("L", (10, 10)).save(small)
    data = bytearray(small.read_bytes())
    header = struct.pack(">II", 40000, 40000) + bytes(data[24:29])  # IHDR: width, height, depth...
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(data))
    with pytest.raises(MediaError, match="bomb.png is refused as a possible decompression bomb"):
        load_image(bomb)


def test_huge_image_is_downscaled_with_a_note(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (9000, 1500), (30, 120, 200)).save(path, quality=90)
    image, notes = load_image(path)
    assert image.size == (4096, 683)
    assert "downscaled from 9000x1500 to 4096x683" in notes
    assert any(note.startswith("very wide image (6:1)") for note in notes)
    assert np.abs(np.asarray(image, np.int16) - (30, 120, 200)).mean() < 3


def test_cmyk_image_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(path, quality=95)  # pure cyan ink
    image, notes = load_image(path)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, np.int16) - (0, 255, 255)).max() < 8
    assert "converted from CMYK to RGB" in notes


def test_16_bit_image_keeps_its_brightness(tmp_path):
    path = tmp_path / "scan.png"
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(path)  # half of 65535
    image, notes = load_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image).min() == np.asarray(image).max() == 128
    assert any(note.startswith("converted from high bit depth") for note in notes)


def test_palette_image_keeps_its_colours(tmp_path):
    path = tmp_path / "logo.png"
    palette_image = Image.new("RGB", (20, 10), (200, 30, 40))
    palette_image.paste((10, 180, 60), (10, 0, 20, 10))
    palette_image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    image, notes = load_image(path)
    assert image.getpixel((2, 5)) == (200, 30, 40) and image.getpixel((15, 5)) == (10, 180, 60)
    assert "converted from P to RGB" in notes


@pytest.mark.parametrize("image_format", ["PNG", "GIF"])
def test_transparent_areas_are_composited_on_white(tmp_path, image_format):
    path = tmp_path / f"cutout.{image_format.lower()}"
    if image_format == "GIF":  # palette entry 0 is transparent
        paletted = Image.new("P", (20, 10), 0)
        paletted.putpalette([0, 0, 0, 20, 40, 220])
        paletted.paste(1, (10, 0, 20, 10))
        paletted.save(path, transparency=0)
    else:
        rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
        rgba.paste((20, 40, 220, 255), (10, 0, 20, 10))
        rgba.save(path)
    image, notes = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((2, 5)) == (255, 255, 255)
    assert np.abs(np.subtract(image.getpixel((15, 5)), (20, 40, 220))).max() <= 8
    assert "transparent areas shown on white" in notes


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    stored = Image.new("RGB", (60, 30), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 15, 15))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stored.save(path, exif=exif, quality=95)
    image, notes = load_image(path)
    assert image.size == (30, 60)
    assert image.getpixel((25, 5))[0] > 200 and image.getpixel((5, 5))[2] > 200  # red now top-right
    assert "turned upright from its EXIF orientation" in notes


def test_one_pixel_image_loads_with_a_note(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 99, 199)).save(path)
    image, notes = load_image(path)
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (9, 99, 199)
    assert "very small image (1x1 pixels): the model sees it enlarged" in notes


def test_extreme_panorama_is_padded_with_a_note(tmp_path):
    path = tmp_path / "pano.png"
    Image.new("RGB", (4000, 50), (10, 120, 30)).save(path)
    image, notes = load_image(path)
    assert image.size == (4000, 200)
    assert image.getpixel((2000, 100)) == (10, 120, 30) and image.getpixel((2000, 5)) == (255, 255, 255)
    assert "extreme aspect ratio (80:1): padded with white to 20:1" in notes


@pytest.mark.parametrize("size", [(1, 1), (4000, 50), (50, 4000)])
def test_odd_images_go_through_the_llava_next_processor(tmp_path, tiny_next, size):
    _, processor = tiny_next
    path = tmp_path / "odd.png"
    Image.new("RGB", size, (10, 120, 30)).save(path)
    image, _ = load_image(path)
    inputs = processor(images=image, text="USER: <image>\nWhat is this? ASSISTANT:", return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (336, 336)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) > 0


def test_messages_name_the_file_never_the_server_folder(tmp_path):
    folder = tmp_path / "uploads" / "3f2a9c"
    folder.mkdir(parents=True)
    broken = folder / "holiday.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(MediaError) as refused:
        load_video(broken, 4)
    assert "holiday.mp4" in str(refused.value) and str(tmp_path) not in str(refused.value)
    assert str(MediaError(f"cannot open {broken}: bad header")) == "cannot open holiday.mp4: bad header"
