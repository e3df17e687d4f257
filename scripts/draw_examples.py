"""Draw the presenter view's example pictures and clip into assets/ (Pillow only, no font files, no
network): `python scripts/draw_examples.py`.  Each probes a known strength or weak spot of visual-token
reduction; assets/examples.json pairs them with their questions and assets/CREDITS.md credits them."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's built-in font


def price_board() -> Image.Image:
    """Reading text: a café board with a large title and small prices (small text is what reduction loses first)."""
    image = Image.new("RGB", (896, 672), (214, 196, 170))
    draw = ImageDraw.Draw(image)
    draw.rectangle((96, 60, 800, 610), fill=(34, 52, 40), outline=(120, 80, 40), width=14)
    draw.text((448, 130), "CAFE LUNA", font=font(72), fill=(250, 250, 240), anchor="mm")
    items = [("Espresso", "2.40"), ("Green tea", "3.10"), ("Lemon cake", "4.75"), ("Soup of the day", "6.20")]
    for row, (item, price) in enumerate(items):
        y = 250 + row * 80
        draw.text((150, y), item, font=font(30), fill=(235, 235, 220))
        draw.text((740, y), price, font=font(30), fill=(255, 214, 90), anchor="ra")
    draw.text((448, 580), "closed on Mondays", font=font(18), fill=(200, 200, 190), anchor="mm")
    return image


def fruit_bowl() -> Image.Image:
    """Counting: seven red apples and three oranges on a table."""
    image = Image.new("RGB", (672, 672), (236, 232, 222))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 430, 672, 672), fill=(150, 104, 64))
    apples = [(110, 380), (200, 360), (290, 385), (380, 355), (470, 380), (160, 300), (330, 290)]
    for x, y in apples:
        draw.ellipse((x - 38, y - 38, x + 38, y + 38), fill=(200, 30, 40), outline=(120, 10, 20), width=3)
        draw.line((x, y - 38, x + 6, y - 56), fill=(80, 50, 20), width=5)
    for x, y in [(560, 380), (610, 300), (520, 300)]:
        draw.ellipse((x - 34, y - 34, x + 34, y + 34), fill=(245, 150, 20), outline=(180, 100, 10), width=3)
    return image


def kite_field() -> Image.Image:
    """A small object: a wide meadow and sky with one small red kite near the top right corner."""
    image = Image.new("RGB", (1024, 576), (150, 200, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 360, 1024, 576), fill=(90, 160, 70))
    for x in range(0, 1024, 160):
        draw.ellipse((x - 60, 320, x + 140, 400), fill=(70, 140, 60))
    draw.ellipse((80, 60, 160, 140), fill=(255, 230, 120))
    draw.polygon([(880, 70), (896, 92), (880, 118), (864, 92)], fill=(220, 20, 30))
    draw.line((880, 118, 700, 420), fill=(60, 60, 60), width=1)
    return image


def clock_and_door() -> Image.Image:
    """Two regions: a clock on the left and a numbered door on the right, for a later question about the other one."""
    image = Image.new("RGB", (1008, 672), (245, 240, 228))
    draw = ImageDraw.Draw(image)
    draw.ellipse((80, 180, 400, 500), fill=(255, 255, 255), outline=(40, 40, 40), width=10)
    draw.line((240, 340, 240, 220), fill=(20, 20, 20), width=10)  # minute hand at 12
    draw.line((240, 340, 330, 340), fill=(20, 20, 20), width=14)  # hour hand at 3
    for hour in range(12):
        angle = math.radians(hour * 30)
        x, y = 240 + 135 * math.sin(angle), 340 - 135 * math.cos(angle)
        draw.ellipse((x - 6, y - 6, x + 6, y + 6), fill=(40, 40, 40))
    draw.rectangle((640, 110, 900, 640), fill=(40, 90, 170), outline=(20, 40, 90), width=8)
    draw.ellipse((860, 370, 880, 390), fill=(230, 200, 60))
    draw.text((770, 200), "42", font=font(64), fill=(255, 255, 255), anchor="mm")
    return image


def rolling_ball() -> list[Image.Image]:
    """A short clip: a blue ball rolls from left to right past a red flag (12 frames)."""
    frames = []
    for index in range(12):
        frame = Image.new("RGB", (336, 224), (200, 230, 250))
        draw = ImageDraw.Draw(frame)
        draw.rectangle((0, 170, 336, 224), fill=(110, 170, 90))
        draw.line((250, 60, 250, 170), fill=(60, 60, 60), width=4)
        draw.polygon([(252, 60), (300, 75), (252, 90)], fill=(220, 30, 30))
        x = 20 + index * 26
        draw.ellipse((x - 16, 138, x + 16, 170), fill=(40, 70, 210))
        frames.append(frame)
    return frames


def main() -> None:
    pictures = {
        "price_board.png": price_board(),
        "fruit_bowl.png": fruit_bowl(),
        "kite_field.png": kite_field(),
        "clock_and_door.png": clock_and_door(),
    }
    for name, picture in pictures.items():
        picture.save(ASSETS / name, optimize=True)
    frames = rolling_ball()
    frames[0].save(ASSETS / "rolling_ball.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    for name in [*pictures, "rolling_ball.gif"]:
        print(f"{name}: {(ASSETS / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
