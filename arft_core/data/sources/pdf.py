"""Source of image-QA items from PDF pages: the page rendered with pypdfium2, questions and regions from its text layer.

Each item is one page: the clean render, a question about one text line (the first or last line of the page, the
text after a label on the same line, or the text directly below a label) with that line's exact text as the answer,
and `regions`, one per line or word group, with pixel boxes for crop questions. PDFium does no layout analysis, so
characters are grouped here: a group ends at a line break, a large horizontal gap or a jump in height.
"""

from __future__ import annotations

import ctypes
import math
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from arft_core.data.sources import Region, SourceItem
from arft_core.protocol import has_cjk

_MAX_OPEN_DOCUMENTS = 32
_GAP_FACTOR = 1.2          # a horizontal gap wider than this many line heights starts a new word group
_MIN_LINE_OVERLAP = 0.3   # characters on one line overlap vertically by at least this share of the smaller height
_LABEL_GAP_FACTOR = 1.5   # "text after a label" only across a gap this many line heights wide
_MIN_LABEL_ALNUM = 3
_MAX_LABEL_CHARS = 60
_MAX_ANSWER_CHARS = 100


@dataclass
class _Char:
    text: str
    box: tuple[float, float, float, float] | None   # device pixels (x0, y0, x1, y1); None for whitespace
    breaks: bool                                     # a line break or a character that cannot be placed


@dataclass(frozen=True)
class _Question:
    question: str
    answer: str


class PdfPages:
    """Pages of the given PDFs as `SourceItem`s. Documents are opened once to check and count them, then cached."""

    name = "pdf"

    def __init__(self, paths: list[str | Path], dpi: int = 100, max_side: int = 1024) -> None:
        if not paths:
            raise ValueError("PdfPages needs at least one PDF path")
        if dpi <= 0 or max_side <= 0:
            raise ValueError(f"dpi and max_side must be positive, got dpi={dpi}, max_side={max_side}")
        self.paths = [Path(p) for p in paths]
        self.dpi = dpi
        self.max_side = max_side
        self._documents: OrderedDict[Path, pdfium.PdfDocument] = OrderedDict()
        self._page_counts = [len(self._document(p)) for p in self.paths]
        self._total_pages = sum(self._page_counts)
        if self._total_pages == 0:
            raise ValueError(f"the PDFs have no pages: {', '.join(map(str, self.paths))}")
        names = [p.name for p in self.paths]
        self._labels = [p.name if names.count(p.name) == 1 else str(p) for p in self.paths]

    def sample(self, rng: np.random.Generator, index: int) -> SourceItem:
        """A question about one page chosen with `rng`; pages without usable text give way to the next page."""
        start = int(rng.integers(self._total_pages))
        for step in range(self._total_pages):
            doc_index, page_index = self._locate((start + step) % self._total_pages)
            item = self._page_item(doc_index, page_index, rng)
            if item is not None:
                return item
        raise ValueError(f"no page with a usable text layer in: {', '.join(map(str, self.paths))}")

    def close(self) -> None:
        while self._documents:
            self._documents.popitem(last=False)[1].close()

    def _locate(self, flat: int) -> tuple[int, int]:
        for doc_index, count in enumerate(self._page_counts):
            if flat < count:
                return doc_index, flat
            flat -= count
        raise IndexError(flat)

    def _document(self, path: Path) -> pdfium.PdfDocument:
        if path in self._documents:
            self._documents.move_to_end(path)
            return self._documents[path]
        if not path.is_file():
            raise FileNotFoundError(f"PDF not found: {path}")
        try:
            doc = pdfium.PdfDocument(path)
        except pdfium.PdfiumError as e:
            raise ValueError(f"cannot read PDF {path}: {e}") from e
        self._documents[path] = doc
        if len(self._documents) > _MAX_OPEN_DOCUMENTS:
            self._documents.popitem(last=False)[1].close()
        return doc

    def _page_item(self, doc_index: int, page_index: int, rng: np.random.Generator) -> SourceItem | None:
        document = self._document(self.paths[doc_index])
        try:
            page = document[page_index]
        except pdfium.PdfiumError:
            return None  # one damaged page in a readable file is skipped like a page without text
        try:
            width, height = page.get_size()
            if min(width, height) <= 0:
                return None
            scale = min(self.dpi / 72, self.max_side / max(width, height))
            image = page.render(scale=scale).to_pil().convert("RGB")
            textpage = page.get_textpage()
            try:
                chars = _read_chars(page, textpage, image.size)
            finally:
                textpage.close()
        finally:
            page.close()
        regions = _visible(_group(chars), image)
        questions = _questions(regions)
        if not questions:
            return None
        chosen = questions[int(rng.integers(len(questions)))]
        return SourceItem(
            image=image,
            question=chosen.question,
            answers=[chosen.answer],
            source=self.name,
            source_id=f"{self._labels[doc_index]}/page{page_index + 1}",
            regions=regions,
            lang="zh" if has_cjk(chosen.answer) else "en",
        )


def _to_device(page: pdfium.PdfPage, size: tuple[int, int], x: float, y: float) -> tuple[int, int]:
    # PDFium's own page-to-device transform accounts for the crop box origin and the page's /Rotate.
    dx, dy = ctypes.c_int(), ctypes.c_int()
    pdfium_c.FPDF_PageToDevice(page.raw, 0, 0, size[0], size[1], 0, x, y, dx, dy)
    return dx.value, dy.value


def _is_upright(page: pdfium.PdfPage, textpage: pdfium.PdfTextPage, size: tuple[int, int], index: int) -> bool:
    angle = pdfium_c.FPDFText_GetCharAngle(textpage.raw, index)
    ox, oy = ctypes.c_double(), ctypes.c_double()
    if angle < 0 or not pdfium_c.FPDFText_GetCharOrigin(textpage.raw, index, ox, oy):
        return False
    x0, y0 = _to_device(page, size, ox.value, oy.value)
    x1, y1 = _to_device(page, size, ox.value + 100 * math.cos(angle), oy.value + 100 * math.sin(angle))
    return x1 - x0 > 0 and abs(y1 - y0) <= 0.05 * (x1 - x0) + 1


def _read_chars(page: pdfium.PdfPage, textpage: pdfium.PdfTextPage, size: tuple[int, int]) -> list[_Char]:
    chars = []
    for i in range(textpage.count_chars()):
        code = pdfium_c.FPDFText_GetUnicode(textpage.raw, i)
        text = chr(code) if 0 < code < 0x110000 else ""
        if text in ("\r", "\n"):
            chars.append(_Char(text, None, True))
        elif text.isspace():
            chars.append(_Char(" ", None, False))
        elif text and unicodedata.category(text) in ("Cc", "Cf"):
            continue  # invisible controls and format marks (soft hyphen, zero-width joiner)
        elif (not text or text == "\ufffd" or unicodedata.category(text) in ("Cs", "Co", "Cn")
              or pdfium_c.FPDFText_HasUnicodeMapError(textpage.raw, i) == 1
              or not _is_upright(page, textpage, size, i)):
            # The glyph is drawn but its exact text is unknown, or it runs sideways: no region may include it.
            chars.append(_Char("", None, True))
        else:
            left, bottom, right, top = textpage.get_charbox(i)
            corners = [_to_device(page, size, x, y) for x in (left, right) for y in (bottom, top)]
            xs, ys = [c[0] for c in corners], [c[1] for c in corners]
            # Ligature glyphs (U+FB00-FB06) carry one code point for several letters; the image shows the letters.
            if "\ufb00" <= text <= "\ufb06":
                text = unicodedata.normalize("NFKC", text)
            # Device corners are whole pixels; a hyphen or dot can round to zero height and seem off the line.
            chars.append(_Char(text, (min(xs), min(ys), max(max(xs), min(xs) + 1), max(max(ys), min(ys) + 1)),
                               False))
    return chars


def _group(chars: list[_Char]) -> list[Region]:
    """Runs of characters on one line without a wide gap, as regions with the union of their boxes."""
    regions: list[Region] = []
    text: list[str] = []
    box: list[float] = []

    def flush() -> None:
        joined = " ".join("".join(text).split())
        if joined and box:
            x0, y0, x1, y1 = box
            regions.append(Region((math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)), joined))
        text.clear()
        box.clear()

    for ch in chars:
        if ch.breaks:
            flush()
            continue
        if ch.box is None:
            if box:
                text.append(" ")
            continue
        if box and not _continues(box, ch.box):
            flush()
        text.append(ch.text)
        box[:] = ch.box if not box else [min(box[0], ch.box[0]), min(box[1], ch.box[1]),
                                         max(box[2], ch.box[2]), max(box[3], ch.box[3])]
    flush()
    return regions


def _continues(box: list[float], char: tuple[float, float, float, float]) -> bool:
    """Whether `char` extends the run `box`: on the same line, not far back to the left, no wide gap. Commas and
    dots hang below the other letters, so the same line means overlapping by part of the smaller height."""
    line_height = max(box[3] - box[1], char[3] - char[1], 1.0)
    overlap = min(box[3], char[3]) - max(box[1], char[1])
    same_line = overlap >= _MIN_LINE_OVERLAP * max(min(box[3] - box[1], char[3] - char[1]), 1.0)
    return same_line and char[0] >= box[2] - line_height and char[0] - box[2] <= _GAP_FACTOR * line_height


def _visible(regions: list[Region], image: Image.Image) -> list[Region]:
    """Regions clipped to the image; those off the page or drawn invisibly (a flat patch of pixels) are dropped."""
    width, height = image.size
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    kept = []
    for r in regions:
        x0, y0 = max(r.box[0], 0), max(r.box[1], 0)
        x1, y1 = min(r.box[2], width), min(r.box[3], height)
        if x1 - x0 < 2 or y1 - y0 < 2 or pixels[y0:y1, x0:x1].std() < 1.0:
            continue
        kept.append(Region((x0, y0, x1, y1), r.text))
    return kept


def _lines(regions: list[Region]) -> list[list[Region]]:
    """Regions in reading order, grouped into bands of vertically overlapping regions, each sorted left to right."""
    bands: list[list[Region]] = []
    for r in sorted(regions, key=lambda r: ((r.box[1] + r.box[3]) / 2, r.box[0])):
        centre = (r.box[1] + r.box[3]) / 2
        if bands and min(b.box[1] for b in bands[-1]) <= centre <= max(b.box[3] for b in bands[-1]):
            bands[-1].append(r)
        else:
            bands.append([r])
    return [sorted(band, key=lambda r: r.box[0]) for band in bands]


def _answerable(text: str, limit: int) -> bool:
    return len(text) <= limit and any(c.isalnum() for c in text)


def _questions(regions: list[Region]) -> list[_Question]:
    """Every question whose answer is one region's exact text and that the page answers unambiguously."""
    bands = _lines(regions)
    counts: dict[str, int] = {}
    for r in regions:
        counts[r.text] = counts.get(r.text, 0) + 1

    def is_label(r: Region) -> bool:
        return (counts[r.text] == 1 and '"' not in r.text and _answerable(r.text, _MAX_LABEL_CHARS)
                and sum(c.isalnum() for c in r.text) >= _MIN_LABEL_ALNUM)

    out: list[_Question] = []
    if bands and len(bands[0]) == 1 and _answerable(bands[0][0].text, _MAX_ANSWER_CHARS):
        out.append(_Question("What is the first line of text on the page?", bands[0][0].text))
    if len(bands) > 1 and len(bands[-1]) == 1 and _answerable(bands[-1][0].text, _MAX_ANSWER_CHARS):
        out.append(_Question("What is the last line of text on the page?", bands[-1][0].text))
    for band in bands:
        for left, right in zip(band, band[1:], strict=False):
            # A narrow gap means one visual phrase that the text layer happens to split; "after" would mislead.
            wide_gap = right.box[0] - left.box[2] >= _LABEL_GAP_FACTOR * (left.box[3] - left.box[1])
            if (wide_gap and is_label(left) and _answerable(right.text, _MAX_ANSWER_CHARS)
                    and right.text != left.text):
                out.append(_Question(f'What text comes right after "{left.text}" on the same line?', right.text))
    for label in regions:
        below = _directly_below(label, regions)
        if below is not None and is_label(label) and _answerable(below.text, _MAX_ANSWER_CHARS):
            out.append(_Question(f'What text is written directly below "{label.text}"?', below.text))
    return out


def _directly_below(label: Region, regions: list[Region]) -> Region | None:
    """The region on the next line under `label`, overlapping it horizontally, if it is close and has no tie."""
    lx0, _, lx1, ly1 = label.box
    height = label.box[3] - label.box[1]
    under = sorted((r for r in regions if r is not label and r.box[1] >= ly1 - 1
                    and min(r.box[2], lx1) > max(r.box[0], lx0)), key=lambda r: r.box[1])
    if not under or under[0].box[1] - ly1 > 2 * height:
        return None
    if len(under) > 1 and under[1].box[1] - under[0].box[1] < 2:
        return None
    # Another line in between, even off to the side, would make "directly below" ambiguous.
    if any(ly1 < (r.box[1] + r.box[3]) / 2 < under[0].box[1] for r in regions):
        return None
    return under[0] if under[0].text != label.text else None
