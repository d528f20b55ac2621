"""Real photographs (the images bundled with scikit-image) carrying coloured text labels drawn at seeded places:
a real-image source with exact ground truth and text regions (for crop questions).

scikit-image's photos come with no questions, so the question is about the labels drawn on them: "What does
the red label say?" with the label's exact text as the answer.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from arft_core.data.sources import Region, SourceItem

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg", "color.png")
COLOURS = {"red": (200, 30, 40), "blue": (30, 70, 190), "green": (20, 130, 60), "yellow": (240, 200, 20),
           "white": (245, 245, 245), "black": (20, 20, 20)}
WORDS = ("EXIT", "SALE", "ROOM", "GATE", "OPEN", "DOCK", "LAB", "CAFE", "BUS", "STOP", "ZONE", "TRACK", "HALL")
FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    for path in FONT_PATHS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=len(PHOTOS))
def _photo(name: str) -> Image.Image:
    with resources.as_file(resources.files("skimage") / "data" / name) as path:
        return Image.open(path).convert("RGB")


class PhotoLabels:
    """Bundled scikit-image photos, cropped to `size`, with 1-3 coloured text labels."""

    name = "photos"

    def __init__(self, size: tuple[int, int] = (512, 384)):
        self.size = size

    def _background(self, rng: np.random.Generator) -> tuple[Image.Image, str]:
        name = PHOTOS[int(rng.integers(len(PHOTOS)))]
        photo = _photo(name)
        w, h = self.size
        scale = max(w / photo.width, h / photo.height) * float(rng.uniform(1.0, 1.4))
        photo = photo.resize((max(w, round(photo.width * scale)), max(h, round(photo.height * scale))),
                             Image.BILINEAR)
        x, y = int(rng.integers(photo.width - w + 1)), int(rng.integers(photo.height - h + 1))
        return photo.crop((x, y, x + w, y + h)), name

    def sample(self, rng: np.random.Generator, index: int) -> SourceItem:
        img, photo = self._background(rng)
        draw = ImageDraw.Draw(img)
        w, h = self.size
        n = int(rng.integers(1, 4))
        colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n]]
        regions, boxes = [], []
        for colour in colours:
            text = f"{WORDS[int(rng.integers(len(WORDS)))]} {int(rng.integers(1, 999))}"
            font = _font(int(rng.integers(18, 34)))
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tw, th, pad = right - left, bottom - top, 8
            for _ in range(30):  # a place that overlaps no other label
                x, y = int(rng.integers(pad, w - tw - 2 * pad)), int(rng.integers(pad, h - th - 2 * pad))
                box = (x - pad, y - pad, x + tw + pad, y + th + pad)
                if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in boxes):
                    break
            else:
                continue
            boxes.append(box)
            fill = COLOURS[colour]
            ink = (0, 0, 0) if sum(fill) > 400 else (255, 255, 255)
            draw.rounded_rectangle(box, radius=6, fill=fill, outline=(0, 0, 0), width=2)
            draw.text((x - left, y - top), text, font=font, fill=ink)
            regions.append((colour, Region(box=(x, y, x + tw, y + th), text=text)))
        colour, target = regions[int(rng.integers(len(regions)))]
        question = (f"What does the {colour} label say?" if len(regions) > 1
                    else "What is written on the label in the picture?")
        return SourceItem(image=img, question=question, answers=[target.text], source=self.name,
                          source_id=f"{photo}/{index}", regions=[r for _, r in regions])
