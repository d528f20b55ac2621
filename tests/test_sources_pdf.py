"""The PDF page source: rendering size, regions from the text layer at the right pixel positions, questions,
determinism, skipping pages without text, and errors for missing or unreadable files."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages as MplPdfPages  # noqa: E402

from arft_core.data.sources import Region, SourceItem  # noqa: E402
from arft_core.data.sources.pdf import PdfPages  # noqa: E402

FIG_SIZE = (4.0, 3.0)  # inches: 288 x 216 points, 400 x 300 pixels at 100 dpi
# (text, x, y) in figure fractions, drawn centred on that point
PAGE_TEXT = [
    ("Invoice Summary", 0.5, 0.85),
    ("Customer:", 0.15, 0.6),
    ("ACME Widgets Ltd", 0.7, 0.6),
    ("Total due 42.50 EUR", 0.5, 0.3),
    ("Thank you", 0.5, 0.1),
]


def _blank_page(pdf: MplPdfPages) -> None:
    fig = plt.figure(figsize=FIG_SIZE)
    pdf.savefig(fig)
    plt.close(fig)


def _text_page(pdf: MplPdfPages) -> None:
    fig = plt.figure(figsize=FIG_SIZE)
    for text, x, y in PAGE_TEXT:
        fig.text(x, y, text, ha="center", va="center", fontsize=12)
    pdf.savefig(fig)
    plt.close(fig)


@pytest.fixture
def two_page_pdf(tmp_path: Path) -> Path:
    """Page 1 has no text, page 2 has PAGE_TEXT."""
    path = tmp_path / "doc.pdf"
    with MplPdfPages(path) as pdf:
        _blank_page(pdf)
        _text_page(pdf)
    return path


def _region(item: SourceItem, text: str) -> Region:
    matches = [r for r in item.regions if r.text == text]
    assert len(matches) == 1, f"{text!r} not found once in {[r.text for r in item.regions]}"
    return matches[0]


def test_renders_page_with_text_and_regions(two_page_pdf: Path) -> None:
    item = PdfPages([two_page_pdf], dpi=100).sample(np.random.default_rng(0), 0)
    assert item.image.mode == "RGB"
    assert item.image.size == (400, 300)
    assert item.source == "pdf"
    assert item.source_id == "doc.pdf/page2"  # page 1 is blank, so every draw lands on page 2
    width, height = item.image.size
    for text, x, y in PAGE_TEXT:
        x0, y0, x1, y1 = _region(item, text).box
        px, py = x * width, (1 - y) * height   # figure origin is bottom-left, image origin top-left
        assert x0 <= px <= x1 and y0 <= py <= y1, (text, (px, py), (x0, y0, x1, y1))
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert y1 - y0 < 30  # one line of 12 pt text, not the whole page


def test_questions_are_answered_by_one_region(two_page_pdf: Path) -> None:
    source = PdfPages([two_page_pdf])
    seen = set()
    for seed in range(40):
        item = source.sample(np.random.default_rng(seed), seed)
        assert item.answers[0] in {r.text for r in item.regions}
        seen.add((item.question, item.answers[0]))
    assert ("What is the first line of text on the page?", "Invoice Summary") in seen
    assert ("What is the last line of text on the page?", "Thank you") in seen
    assert ('What text comes right after "Customer:" on the same line?', "ACME Widgets Ltd") in seen
    # Every question is one of the fixed forms; none is a vague "what is written at the top".
    assert all(q.startswith(("What is the first", "What is the last", "What text comes right after",
                             "What text is written directly below")) for q, _ in seen)


def test_max_side_caps_the_render(two_page_pdf: Path) -> None:
    item = PdfPages([two_page_pdf], dpi=300, max_side=500).sample(np.random.default_rng(1), 0)
    assert item.image.size == (500, 375)
    assert all(0 <= r.box[0] < r.box[2] <= 500 and 0 <= r.box[1] < r.box[3] <= 375 for r in item.regions)


def test_deterministic(two_page_pdf: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.pdf"
    with MplPdfPages(second) as pdf:
        _text_page(pdf)
        _text_page(pdf)
    a = PdfPages([two_page_pdf, second]).sample(np.random.default_rng(7), 3)
    b = PdfPages([two_page_pdf, second]).sample(np.random.default_rng(7), 3)
    assert (a.question, a.answers, a.source_id, a.regions) == (b.question, b.answers, b.source_id, b.regions)
    assert a.image.tobytes() == b.image.tobytes()
    ids = {PdfPages([two_page_pdf, second]).sample(np.random.default_rng(s), s).source_id for s in range(30)}
    assert ids == {"doc.pdf/page2", "second.pdf/page1", "second.pdf/page2"}


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pdf"
    with pytest.raises(FileNotFoundError, match="nope.pdf"):
        PdfPages([missing])
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"this is not a pdf")
    with pytest.raises(ValueError, match="broken.pdf"):
        PdfPages([broken])


def test_no_text_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "blank.pdf"
    with MplPdfPages(path) as pdf:
        _blank_page(pdf)
    with pytest.raises(ValueError, match="blank.pdf"):
        PdfPages([path]).sample(np.random.default_rng(0), 0)
