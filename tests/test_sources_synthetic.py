import time

import numpy as np
import pytest

from arft_core.data.sources.synthetic import KINDS, ZH_CHARSET, SyntheticScenes, find_cjk_font, font_covers

CJK_FONT = find_cjk_font()


def _items(source: SyntheticScenes, seeds: range) -> list:
    return [source.sample(np.random.default_rng(seed), seed) for seed in seeds]


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_same_seed_same_item_and_different_seed_different_item():
    source = SyntheticScenes(cjk_fraction=0.5)
    for seed in range(20):
        a, b = (source.sample(np.random.default_rng(seed), seed) for _ in range(2))
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert (a.question, a.answers, a.regions, a.source_id, a.lang) == (b.question, b.answers, b.regions,
                                                                          b.source_id, b.lang)
    for kind in KINDS:
        a, b = (SyntheticScenes([kind]).sample(np.random.default_rng(seed), 0) for seed in (1, 2))
        assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


@pytest.mark.parametrize("size", [(512, 384), (640, 480), (384, 288)])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_with_exact_regions(kind: str, size: tuple[int, int]):
    source = SyntheticScenes([kind], cjk_fraction=0.5, size=size)
    for item in _items(source, range(25)):
        assert item.image.mode == "RGB" and item.image.size == size
        assert item.source == "synthetic" and item.source_id.startswith(f"{kind}/{item.lang}/")
        assert item.question and item.answers and all(a.strip() for a in item.answers)
        assert np.asarray(item.image).std() > 10  # not a flat or blank image
        assert len(item.regions) >= 3
        w, h = size
        for r in item.regions:
            x0, y0, x1, y1 = r.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (item.source_id, r)
            assert r.text.strip() and len(r.text) < 40, (item.source_id, r)
        for i, a in enumerate(item.regions):
            for b in item.regions[i + 1:]:
                assert not _overlap(a.box, b.box), (item.source_id, a, b)


def test_answers_are_drawn():
    # The first answer is drawn text, except for counting questions and the invoice extraction's dict, whose
    # values are drawn. (Joined with spaces because a long book title is drawn on two lines.)
    for item in _items(SyntheticScenes(cjk_fraction=0.5), range(300)):
        drawn = " ".join(r.text for r in item.regions)
        first = item.answers[0]
        if first.startswith("{"):
            for pair in first.strip("{}").split(", "):
                assert pair.split(": ")[1].strip("'") in drawn, (item.source_id, item.question, first)
        elif "How many" not in item.question and "几" not in item.question:
            assert first in drawn, (item.source_id, item.question, first)
        else:
            assert first.isdigit()


def test_chinese_items_when_a_cjk_font_is_available():
    source = SyntheticScenes(cjk_fraction=0.5)
    items = _items(source, range(60))
    if CJK_FONT is None:
        assert source.cjk_font is None and all(i.lang == "en" for i in items)
        pytest.skip("no CJK-capable font found (set ARFT_CJK_FONT or install pylopdf-fonts-zh-cn)")
    zh = [i for i in items if i.lang == "zh"]
    assert zh and any(i.source_id.split("/")[1] == "zh" for i in zh)
    # No tofu: every character drawn in a Chinese scene is one the font was checked to cover.
    drawn = "".join(r.text for i in zh for r in i.regions)
    assert {c for c in drawn if ord(c) > 127} <= set(ZH_CHARSET)
    assert font_covers(CJK_FONT, ZH_CHARSET)


def test_without_cjk_font_everything_is_english(monkeypatch):
    monkeypatch.setattr("arft_core.data.sources.synthetic.find_cjk_font", lambda explicit=None: None)
    items = _items(SyntheticScenes(cjk_fraction=1.0), range(10))
    assert all(i.lang == "en" and "/en/" in i.source_id for i in items)


def test_font_checks_reject_fonts_without_chinese():
    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    assert not font_covers("/nonexistent/font.ttf", "发")
    with pytest.raises(ValueError, match="cjk_font"):
        SyntheticScenes(cjk_font="/nonexistent/font.ttf")
    try:
        import PIL.ImageFont

        PIL.ImageFont.truetype(dejavu, 10)
    except OSError:
        return
    assert font_covers(dejavu, "Invoice $12.40") and not font_covers(dejavu, "发票")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="poster"):
        SyntheticScenes(["poster"])
    with pytest.raises(ValueError, match="cjk_fraction"):
        SyntheticScenes(cjk_fraction=1.5)


def test_rendering_is_fast():
    source = SyntheticScenes(cjk_fraction=0.25)
    _items(source, range(20))  # warm the font cache
    start = time.perf_counter()
    _items(source, range(200))
    per_item = (time.perf_counter() - start) / 200
    print(f"synthetic scenes: {1 / per_item:.0f} items/s ({per_item * 1e3:.2f} ms/item)")
    assert per_item < 0.05  # generous bound for slow CI machines; ~2-3 ms on a workstation
