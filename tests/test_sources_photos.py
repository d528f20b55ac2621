import numpy as np
from PIL import Image

from arft_core.data.sources.photos import PhotoLabels


def test_real_photos_with_exact_label_text():
    source = PhotoLabels((320, 240))
    for i in range(20):
        item = source.sample(np.random.default_rng(i), i)
        assert item.image.size == (320, 240) and item.source == "photos"
        assert item.answers[0] in [r.text for r in item.regions]
        for r in item.regions:
            x1, y1, x2, y2 = r.box
            assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240
        if len(item.regions) > 1:
            assert item.question.startswith("What does the ")


def test_deterministic():
    a = PhotoLabels().sample(np.random.default_rng(5), 5)
    b = PhotoLabels().sample(np.random.default_rng(5), 5)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.question == b.question
    c = PhotoLabels().sample(np.random.default_rng(6), 6)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_background_is_a_real_photo():
    item = PhotoLabels().sample(np.random.default_rng(1), 1)
    arr = np.asarray(item.image.convert("L"), dtype=np.float32)
    # Natural images have texture everywhere, unlike flat synthetic backgrounds.
    assert arr.std() > 20 and len(np.unique(arr)) > 100
    assert isinstance(item.image, Image.Image)
