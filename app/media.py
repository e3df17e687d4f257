"""Reading what users upload: images now (video joins later), with a clear error for bad files."""

from __future__ import annotations

import os

from PIL import Image, ImageOps


class MediaError(ValueError):
    """A user-facing problem with an uploaded file; its message is shown as is."""


def load_image(path: str | os.PathLike) -> tuple[Image.Image, list[str]]:
    """Open an uploaded image as RGB, upright.  Returns the image and notes for the user
    (e.g. that it was converted); raises MediaError with a plain message when it cannot."""
    notes: list[str] = []
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise MediaError(f"{os.path.basename(str(path))} is not a readable image ({error}).") from None
    if image.mode != "RGB":
        notes.append(f"converted from {image.mode} to RGB")
        image = image.convert("RGB")
    return image, notes
