"""Synthetic text scenes with exact ground truth: signs, receipts, invoices, forms, tables, bar charts, book covers.

Every scene is drawn with Pillow from a seeded generator, so its question, its answers and the box of every text
line drawn (`Region`s, measured with `textbbox`) are known exactly. English and Chinese scenes share the layouts;
Chinese ones are made only when a font that covers every Chinese character used here is found (see
`find_cjk_font`), so no scene ever shows a missing-glyph box.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from arft_core.data.sources import Region, SourceItem

KINDS = ("sign", "receipt", "invoice", "form", "table", "chart", "book_cover")

Box = tuple[int, int, int, int]
Color = tuple[int, int, int]
T = TypeVar("T")

MIN_SIZE = 9  # smallest font size (px) a layout may shrink to; below that text stops being legible

# ---------------------------------------------------------------------------------------------------- fonts

DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")
# (regular, bold) pairs an English scene picks from.
LATIN_FAMILIES = (
    ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
    ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"),
    ("DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf"),
)
LATIN_MONO = "DejaVuSansMono.ttf"

CJK_SYSTEM_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)
# Python packages that ship a CJK font: (import name, file inside the package).
CJK_PACKAGES = (
    ("pylopdf_fonts_zh_cn", "NotoSansSC-Regular.otf"),
    ("paperang_p2_fonts_cjk", "fonts/wqy-microhei.ttc"),
)


@functools.lru_cache(maxsize=512)
def _font(face: str | None, size: int) -> ImageFont.FreeTypeFont:
    """A loaded font; `face` None is Pillow's built-in scalable font. BASIC layout: no shaping needed, and faster."""
    if face is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(face, size, layout_engine=ImageFont.Layout.BASIC)


# The tallest and deepest glyphs the scenes draw: a line's ink lies between their top and bottom. Font ascent and
# descent would be safe too, but CJK fonts declare far more than they ink (1.45 em for Noto Sans SC, whose ink
# spans 1.1 em), which would make their text needlessly small.
_PROBE = "Hgjqy()$@国"


@functools.lru_cache(maxsize=512)
def _vextent(face: str | None, size: int) -> tuple[int, int]:
    """Top and bottom of a line's ink, relative to the ascender line (Pillow's 'a' anchors)."""
    _, top, _, bottom = _font(face, size).getbbox(_PROBE, anchor="la")
    return int(top), int(bottom)


def _line_height(face: str | None, size: int) -> int:
    top, bottom = _vextent(face, size)
    return bottom - top


def _width(face: str | None, size: int, text: str) -> float:
    return _font(face, size).getlength(text)


def _fit(face: str | None, text: str, size: int, max_width: float) -> int:
    """The largest size <= `size` (and >= MIN_SIZE) at which `text` is at most `max_width` pixels wide."""
    size = max(MIN_SIZE, int(size))
    while size > MIN_SIZE and (w := _width(face, size, text)) > max_width:
        size = max(MIN_SIZE, min(size - 1, int(size * max_width / w)))
    return size


def _size_for_height(face: str | None, height: float) -> int:
    """The largest size whose line height (ascent + descent) is at most `height`, but never below MIN_SIZE."""
    size = max(MIN_SIZE, int(height * 100 / _line_height(face, 100)))
    while size > MIN_SIZE and _line_height(face, size) > height:
        size -= 1
    return size


def _glyph(font: ImageFont.FreeTypeFont, char: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


@functools.lru_cache(maxsize=32)
def font_covers(path: str, text: str) -> bool:
    """Whether the font at `path` has a real glyph for every non-space character of `text`.

    A missing character renders as the font's .notdef glyph (the "tofu" box), which is what a code point no font
    maps (a noncharacter-adjacent private-use one) also renders as; comparing the two masks finds it.
    """
    try:
        font = ImageFont.truetype(path, 24, layout_engine=ImageFont.Layout.BASIC)
    except OSError:
        return False
    notdef = _glyph(font, "\U0010fffd")
    return all(_glyph(font, ch) != notdef for ch in dict.fromkeys(text) if not ch.isspace())


def _packaged_cjk_fonts() -> Iterable[str]:
    for module, rel in CJK_PACKAGES:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                yield str(Path(folder) / rel)


def find_cjk_font(explicit: str | None = None) -> str | None:
    """The first font that covers every Chinese character these scenes draw, or None.

    Looked for in order: `explicit`, the ARFT_CJK_FONT environment variable, common system paths, then Python
    packages that ship one (CJK_PACKAGES). An explicit font that is missing or lacks characters is an error.
    """
    if explicit is not None:
        if not font_covers(str(explicit), ZH_CHARSET):
            raise ValueError(f"cjk_font {explicit!r} is missing or lacks glyphs for the Chinese scene text")
        return str(explicit)
    env = os.environ.get("ARFT_CJK_FONT")
    candidates = [env] if env else []
    candidates += [p for p in CJK_SYSTEM_PATHS if Path(p).is_file()]
    candidates += list(_packaged_cjk_fonts())
    return next((p for p in candidates if Path(p).is_file() and font_covers(p, ZH_CHARSET)), None)


@functools.lru_cache(maxsize=1)
def _latin_faces() -> tuple[tuple[tuple[str | None, str | None], ...], str | None]:
    """(regular, bold) families and a monospace face for English text; Pillow's built-in font if DejaVu is absent."""
    families = tuple((str(DEJAVU_DIR / r), str(DEJAVU_DIR / b)) for r, b in LATIN_FAMILIES
                     if (DEJAVU_DIR / r).is_file() and (DEJAVU_DIR / b).is_file())
    mono = str(DEJAVU_DIR / LATIN_MONO) if (DEJAVU_DIR / LATIN_MONO).is_file() else None
    return families or ((None, None),), mono


@dataclass(frozen=True)
class Faces:
    regular: str | None
    bold: str | None
    mono: str | None


# ---------------------------------------------------------------------------------------------- vocabulary

_MONTHS_EN = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS_ZH = ("一月", "二月", "三月", "四月", "五月", "六月", "七月", "八月", "九月", "十月", "十一月", "十二月")
_CITIES_EN = ("Boston", "Denver", "Austin", "Seattle", "Chicago", "Portland", "Atlanta", "Phoenix", "Dallas")
_CITIES_ZH = ("北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "南京", "西安")

# Every string a scene draws comes from here (or is digits/punctuation), so ZH_CHARSET covers all Chinese text.
VOCAB: dict[str, dict[str, tuple]] = {
    "en": {
        "shop_prefix": ("Golden", "Blue Moon", "Red Lantern", "Silver", "Sunny", "Lucky Star", "Royal", "Happy",
                        "Corner", "Maple", "Harbor", "River", "Urban", "Old Town"),
        "shop_type": ("Cafe", "Bakery", "Books", "Pharmacy", "Market", "Noodles", "Pizza", "Florist", "Hardware",
                      "Deli", "Tea House", "Barber"),
        "tagline": ("Fresh bread daily", "Open 7 days a week", "Family owned", "Best coffee in town",
                    "Takeaway available", "Free Wi-Fi", "Welcome!", "Grand opening"),
        "street": ("Maple Street", "Oak Avenue", "Elm Road", "Cedar Lane", "Pine Street", "Main Street",
                   "Church Road", "Mill Lane", "Park Avenue", "Bridge Street"),
        "item": ("Coffee", "Bagel", "Milk", "Bread", "Eggs (12)", "Orange Juice", "Apples", "Bananas", "Cheese",
                 "Butter", "Green Tea", "Muffin", "Sandwich", "Water", "Yogurt", "Pasta", "Rice", "Tomatoes",
                 "Chicken", "Soap"),
        "company": ("Northwind Trading", "Bluebird Supplies", "Summit Logistics", "Pioneer Foods",
                    "Evergreen Systems", "Redwood Tools", "Lakeside Paper", "Keystone Parts"),
        "company_suffix": ("Ltd", "Inc", "LLC", "Co"),
        "invoice_title": ("INVOICE", "TAX INVOICE", "SALES INVOICE"),
        "form_title": ("Registration Form", "Application Form", "Membership Form", "Visitor Form",
                       "Patient Intake Form", "Enrollment Form"),
        "first_name": ("Anna", "James", "Maria", "David", "Sofia", "Henry", "Clara", "Lucas", "Emma", "Noah"),
        "last_name": ("Whitfield", "Moreno", "Hartley", "Okafor", "Lindqvist", "Bennett", "Castillo", "Nakamura",
                      "Fischer", "Dubois"),
        "city": _CITIES_EN,
        "occupation": ("Teacher", "Nurse", "Engineer", "Student", "Accountant", "Driver", "Chef", "Designer"),
        "table_topic": (("City", _CITIES_EN),
                        ("Product", ("Laptops", "Phones", "Tablets", "Monitors", "Printers", "Cameras")),
                        ("Team", ("Falcons", "Tigers", "Wolves", "Sharks", "Eagles", "Bears"))),
        "table_columns": (_MONTHS_EN, ("Q1", "Q2", "Q3", "Q4"), ("2019", "2020", "2021", "2022", "2023", "2024")),
        "chart_topic": (("Fruit Sales", ("Apples", "Pears", "Grapes", "Plums", "Kiwis", "Mangos", "Cherries")),
                        ("Visitors by City", _CITIES_EN),
                        ("Monthly Revenue", _MONTHS_EN),
                        ("Staff by Department", ("Sales", "R&D", "Finance", "HR", "Support", "Legal"))),
        "book_adjective": ("Silent", "Hidden", "Last", "Broken", "Golden", "Distant", "Secret", "Winter",
                           "Burning", "Forgotten"),
        "book_noun": ("River", "Garden", "Kingdom", "Letter", "Mountain", "Harbor", "Orchard", "Lighthouse",
                      "Empire", "Voyage"),
        "book_subtitle": ("A Novel", "Stories", "Poems", "A Memoir"),
        "publisher": ("Lantern Press", "Blue Fox Books", "Northgate Publishing", "Paperleaf", "Harbor House"),
    },
    "zh": {
        "shop_prefix": ("老王", "幸福", "春风", "好运", "金龙", "小李", "阳光", "大华", "新民", "百味", "东方", "和平"),
        "shop_type": ("面馆", "超市", "书店", "药房", "茶馆", "饺子馆", "水果店", "面包房", "花店", "五金店",
                      "咖啡馆", "便利店"),
        "tagline": ("欢迎光临", "诚信经营", "新店开业", "全场八折", "百年老字号", "外卖送到家"),
        "street": ("中山路", "人民路", "解放路", "建设路", "长江路", "南京路", "和平街", "文化路"),
        "item": ("苹果", "香蕉", "牛奶", "面包", "鸡蛋", "大米", "酸奶", "矿泉水", "可乐", "饼干", "茶叶", "橙汁",
                 "白菜", "猪肉", "牙膏", "洗发水", "方便面", "巧克力"),
        "company": ("华信科技", "恒通贸易", "盛达商贸", "金源电子", "宏图建材", "天和餐饮", "新科电子", "永安贸易"),
        "company_prefix": ("杭州", "上海", "北京", "深圳", "广州", "南京", "成都", "武汉"),
        "invoice_title": ("增值税普通发票", "电子发票(普通发票)", "增值税专用发票"),
        "form_title": ("入学登记表", "会员申请表", "访客登记表", "员工信息表", "报名表"),
        "surname": ("王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴"),
        "given_name": ("伟", "芳", "娜", "敏", "静", "磊", "洋", "勇", "艳", "杰", "军", "丽", "建国", "晓明"),
        "gender": ("男", "女"),
        "city": _CITIES_ZH,
        "occupation": ("教师", "医生", "工程师", "学生", "会计", "司机", "厨师", "护士"),
        "table_topic": (("城市", _CITIES_ZH),
                        ("产品", ("电脑", "手机", "平板", "显示器", "打印机", "相机")),
                        ("部门", ("销售部", "技术部", "财务部", "人事部", "市场部", "客服部"))),
        "table_columns": (_MONTHS_ZH, ("第一季度", "第二季度", "第三季度", "第四季度"),
                          ("2019年", "2020年", "2021年", "2022年", "2023年", "2024年")),
        "chart_topic": (("水果销量", ("苹果", "香蕉", "葡萄", "橙子", "西瓜", "草莓", "梨")),
                        ("各城市游客数", _CITIES_ZH),
                        ("月度销售额", _MONTHS_ZH),
                        ("各部门人数", ("销售部", "技术部", "财务部", "人事部", "市场部", "客服部"))),
        "book_adjective": ("遥远的", "沉默的", "金色的", "最后的", "秘密的", "冬天的", "燃烧的", "被遗忘的"),
        "book_noun": ("河流", "花园", "王国", "来信", "山脉", "港湾", "灯塔", "旅程", "果园"),
        "book_subtitle": ("长篇小说", "短篇小说集", "诗集", "散文集"),
        "publisher": ("星河出版社", "青松出版社", "东方文艺出版社", "长河书局", "南山出版社"),
    },
}

# Fixed words drawn next to values.
LABELS: dict[str, dict[str, str]] = {
    "en": {"currency": "$", "open": "Open ", "tel": "Tel ", "total": "TOTAL", "colon": ":",
           "invoice_no": "Invoice No.", "invoice_code": "Invoice Code", "date": "Date", "buyer": "Bill To",
           "amount": "Amount", "name": "Name", "birth": "Date of Birth", "phone": "Phone", "city": "City",
           "email": "Email", "occupation": "Occupation", "id": "ID Number", "author_suffix": ""},
    "zh": {"currency": "¥", "open": "营业时间 ", "tel": "电话 ", "total": "合计", "colon": "：",
           "invoice_no": "发票号码", "invoice_code": "发票代码", "date": "日期", "buyer": "购买方", "amount": "金额",
           "name": "姓名", "gender": "性别", "birth": "出生日期", "phone": "电话", "city": "城市",
           "occupation": "职业", "id": "编号", "author_suffix": " 著"},
}
# Chinese characters the scene code writes around vocabulary words (dates, addresses, company names).
ZH_TEMPLATE_TEXT = "年月日号有限公司"


def _strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


ZH_CHARSET = "".join(dict.fromkeys(
    ch for s in (*_strings(VOCAB["zh"]), *_strings(LABELS["zh"]), ZH_TEMPLATE_TEXT) for ch in s if ord(ch) > 127))

# ------------------------------------------------------------------------------------------------ drawing


def _money(cents: int, thousands: bool = False) -> str:
    return f"{cents // 100:,}.{cents % 100:02d}" if thousands else f"{cents // 100}.{cents % 100:02d}"


class Scene:
    """One image being drawn: its generator, language, fonts, and the regions of the text drawn so far."""

    def __init__(self, rng: np.random.Generator, lang: str, faces: Faces, image: Image.Image):
        self.rng, self.lang, self.faces, self.image = rng, lang, faces, image
        self.draw = ImageDraw.Draw(image)
        self.regions: list[Region] = []

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def zh(self) -> bool:
        return self.lang == "zh"

    def pick(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def sample(self, options: Sequence[T], n: int, ordered: bool = False) -> list[T]:
        """`n` distinct options; `ordered` keeps their order in `options` (months stay in calendar order)."""
        idx = self.rng.choice(len(options), n, replace=False)
        return [options[i] for i in (sorted(idx) if ordered else idx)]

    def vocab(self, key: str) -> tuple:
        return VOCAB[self.lang][key]

    def word(self, key: str) -> str:
        return self.pick(VOCAB[self.lang][key])

    def label(self, key: str) -> str:
        return LABELS[self.lang][key]

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def digits(self, n: int) -> str:
        first = str(int(self.rng.integers(1, 10)))
        return first + "".join(str(int(d)) for d in self.rng.integers(0, 10, n - 1))

    def date(self, lo: int = 2016, hi: int = 2025) -> tuple[int, int, int]:
        return int(self.rng.integers(lo, hi + 1)), int(self.rng.integers(1, 13)), int(self.rng.integers(1, 29))

    def ask(self, *candidates: tuple[str, str, list[str]]) -> tuple[str, list[str]]:
        """Pick one (English question, Chinese question, answers) and return it in the scene's language."""
        en, zh, answers = self.pick(candidates)
        return (zh if self.zh else en), answers

    def text(self, xy: tuple[float, float], text: str, face: str | None, size: int, fill: Color,
             anchor: str = "la") -> Box:
        """Draw one line of text whose line (`_line_height` tall) starts at y = xy[1]; record its exact box.

        `anchor` is one of Pillow's "la", "ma", "ra": x is the left edge, the centre or the right edge.
        """
        font = _font(face, size)
        xy = (int(round(xy[0])), int(round(xy[1] - _vextent(face, size)[0])))
        box = tuple(int(v) for v in self.draw.textbbox(xy, text, font=font, anchor=anchor))
        w, h = self.size
        if not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
            raise RuntimeError(f"layout bug: {text!r} drawn at {box} leaves the {w}x{h} image")
        self.draw.text(xy, text, font=font, fill=fill, anchor=anchor)
        self.regions.append(Region(box, text))  # type: ignore[arg-type]
        return box  # type: ignore[return-value]

    def panel(self, box: Sequence[float], fill: Color, radius: int = 0, outline: Color | None = None,
              width: int = 0, shadow: bool = True) -> None:
        """A filled (optionally rounded) rectangle, with a soft offset shadow so it stands off the background."""
        x0, y0, x1, y1 = (int(v) for v in box)
        if shadow:
            off = max(2, (x1 - x0) // 80)
            self.draw.rounded_rectangle((x0 + off, y0 + off, x1 + off, y1 + off), radius, fill=(40, 40, 40))
        self.draw.rounded_rectangle((x0, y0, x1, y1), radius, fill=fill, outline=outline, width=width)


@dataclass(frozen=True)
class Line:
    text: str
    face: str | None
    size: int
    fill: Color
    align: str = "center"  # "left", "center" or "right"


def _stack(s: Scene, lines: Sequence[Line], box: Sequence[float]) -> list[Box]:
    """Draw `lines` top to bottom inside `box`, shrinking them until they fit and spreading the spare height."""
    x0, y0, x1, y1 = box
    sizes = [_fit(line.face, line.text, line.size, x1 - x0) for line in lines]
    while True:
        heights = [_line_height(line.face, size) for line, size in zip(lines, sizes, strict=True)]
        if sum(heights) <= y1 - y0:
            break
        if all(size <= MIN_SIZE for size in sizes):
            raise RuntimeError(f"{len(lines)} lines cannot fit in a box {y1 - y0:.0f} px high")
        scale = (y1 - y0) / sum(heights)
        sizes = [max(MIN_SIZE, min(size - 1, int(size * scale))) for size in sizes]
    gap = (y1 - y0 - sum(heights)) / (len(lines) + 1)
    y, boxes = y0 + gap, []
    for line, size, height in zip(lines, sizes, heights, strict=True):
        x, anchor = {"left": (x0, "la"), "center": ((x0 + x1) / 2, "ma"), "right": (x1, "ra")}[line.align]
        boxes.append(s.text((x, y), line.text, line.face, size, line.fill, anchor))
        y += height + gap
    return boxes


def _light(rng: np.random.Generator) -> Color:
    return tuple(int(v) for v in rng.integers(215, 256, 3))  # type: ignore[return-value]


def _dark(rng: np.random.Generator) -> Color:
    return tuple(int(v) for v in rng.integers(0, 70, 3))  # type: ignore[return-value]


def _accent(rng: np.random.Generator) -> Color:
    """A saturated mid-tone colour: one strong channel, one middle, one weak, in random order."""
    channels = [int(rng.integers(150, 230)), int(rng.integers(50, 130)), int(rng.integers(0, 60))]
    return tuple(channels[i] for i in rng.permutation(3))  # type: ignore[return-value]


def _paper_ink(rng: np.random.Generator, dark_chance: float = 0.2) -> tuple[Color, Color]:
    """A background colour and a text colour that contrast: light on dark or dark on light."""
    if rng.random() < dark_chance:
        return _dark(rng), _light(rng)
    return _light(rng), _dark(rng)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A mild backdrop: a solid colour, a four-corner gradient, or a soft blotchy texture."""
    w, h = size
    base = rng.integers(70, 210, 3)
    style = int(rng.integers(3))
    if style == 0:
        return Image.new("RGB", size, tuple(int(v) for v in base))
    if style == 1:
        corners = np.clip(base + rng.integers(-40, 41, (2, 2, 1)) + rng.integers(-20, 21, (2, 2, 3)), 0, 255)
        corners = corners.astype(np.uint8)
        return Image.fromarray(corners).resize(size, Image.Resampling.BILINEAR)
    # Mostly brightness variation shared by the channels, with a little tint, so the texture stays mild.
    grid = (max(2, h // 32), max(2, w // 32))
    cells = base + rng.integers(-22, 23, (*grid, 1)) + rng.integers(-6, 7, (*grid, 3))
    return Image.fromarray(np.clip(cells, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


def _dashed(s: Scene, x0: float, x1: float, y: float, fill: Color, dash: int = 6) -> None:
    for x in range(int(x0), int(x1) - dash, 2 * dash):
        s.draw.line((x, int(y), x + dash, int(y)), fill=fill, width=1)


def _pair_row(s: Scene, y: float, left: str, right: str, x0: float, x1: float, face: str | None, size: int,
              fill: Color) -> None:
    """`left` flush left and `right` flush right on one line (a receipt item and its price)."""
    s.text((x0, y), left, face, size, fill, "la")
    s.text((x1, y), right, face, size, fill, "ra")


def _pair_size(face: str | None, pairs: Sequence[tuple[str, str]], size: int, width: float) -> int:
    """A size at which every (left, right) pair fits in `width` with at least two spaces between them."""
    return min(_fit(face, f"{a}  {b}", size, width) for a, b in pairs)


# ------------------------------------------------------------------------------------------------- scenes


def _sign(s: Scene) -> tuple[str, list[str]]:
    w, h = s.size
    pw, ph = w * s.uniform(0.65, 0.95), h * s.uniform(0.55, 0.85)
    x0, y0 = s.uniform(0.02 * w, w - pw - 0.02 * w), s.uniform(0.03 * h, h - ph - 0.03 * h)
    paper, ink = _paper_ink(s.rng, dark_chance=0.5)
    accent = _accent(s.rng)
    if y0 > 0.08 * h:  # a hanging sign: two cords up to the top edge
        for fx in (0.2, 0.8):
            s.draw.line((int(x0 + fx * pw), 0, int(x0 + fx * pw), int(y0)), fill=(60, 60, 60), width=3)
    s.panel((x0, y0, x0 + pw, y0 + ph), paper, radius=int(min(pw, ph) * 0.06), outline=accent,
            width=max(2, int(ph * 0.025)))

    name = s.word("shop_prefix") + ("" if s.zh else " ") + s.word("shop_type")
    tagline = s.word("tagline")
    opens, closes = int(s.rng.integers(6, 11)), int(s.rng.integers(17, 24))
    hours = f"{opens}:00-{closes}:00" if s.zh else f"{opens}:00 - {closes}:00"
    phone = (f"{s.pick(('010', '021', '020', '0571', '027', '028'))}-{s.digits(8)}" if s.zh
             else f"{s.digits(3)}-{s.digits(4)}")
    number = int(s.rng.integers(1, 300))
    address = f"{s.word('street')}{number}号" if s.zh else f"{number} {s.word('street')}"

    f = s.faces
    lines = [Line(name, f.bold, int(ph * 0.22), accent if s.rng.random() < 0.4 else ink),
             Line(tagline, f.regular, int(ph * 0.09), ink),
             Line(s.label("open") + hours, f.regular, int(ph * 0.08), ink),
             Line(s.label("tel") + phone, f.regular, int(ph * 0.08), ink),
             Line(address, f.regular, int(ph * 0.08), ink)]
    pad = min(pw, ph) * 0.07
    _stack(s, lines, (x0 + pad, y0 + pad, x0 + pw - pad, y0 + ph - pad))
    return s.ask(
        ("What is the name of the shop on the sign?", "招牌上店铺的名称是什么？", [name]),
        ("What are the opening hours on the sign?", "招牌上的营业时间是什么？", [hours, hours.replace(" ", "")]),
        ("What phone number is shown on the sign?", "招牌上的电话号码是多少？", [phone]),
        ("What is the address on the sign?", "招牌上的地址是什么？", [address]),
    )


def _receipt(s: Scene) -> tuple[str, list[str]]:
    w, h = s.size
    pw, ph = w * s.uniform(0.45, 0.62), h * s.uniform(0.9, 0.98)
    x0, y0 = s.uniform(0.03 * w, w - pw - 0.03 * w), s.uniform(0.01 * h, h - ph - 0.01 * h)
    paper, ink = _light(s.rng), _dark(s.rng)
    s.panel((x0, y0, x0 + pw, y0 + ph), paper)

    n = int(s.rng.integers(3, 7))
    items = s.sample(s.vocab("item"), n)
    cents = [int(c) for c in s.rng.integers(50, 2500, n)]
    prices, total = [_money(c) for c in cents], _money(sum(cents))
    cur = s.label("currency")
    shop = s.word("shop_prefix") + ("" if s.zh else " ") + s.word("shop_type")
    year, month, day = s.date()
    stamp = f"{year}-{month:02d}-{day:02d} {int(s.rng.integers(8, 22)):02d}:{int(s.rng.integers(0, 60)):02d}"

    face = s.faces.regular if s.zh or s.faces.mono is None or s.rng.random() < 0.3 else s.faces.mono
    bold = s.faces.bold if s.zh or face != s.faces.mono else face
    pad_x, pad_y = pw * 0.08, ph * 0.03
    ix0, ix1, iy0 = x0 + pad_x, x0 + pw - pad_x, y0 + pad_y
    # Height in units of one item row: header 1.6, date 1, two separators 0.6 each, total 1.3.
    unit = (ph - 2 * pad_y) / (n + 1.6 + 1 + 1.2 + 1.3)
    size = _size_for_height(face, unit * 0.8)
    rows = [*zip(items, prices, strict=True), (s.label("total"), cur + total)]
    size = _pair_size(face, rows, size, ix1 - ix0)
    head = _fit(bold, shop, _size_for_height(bold, unit * 1.6 * 0.8), ix1 - ix0)

    y = iy0
    s.text(((ix0 + ix1) / 2, y + (1.6 * unit - _line_height(bold, head)) / 2), shop, bold, head, ink, "ma")
    y += 1.6 * unit
    s.text(((ix0 + ix1) / 2, y), stamp, face, _fit(face, stamp, size, ix1 - ix0), ink, "ma")
    y += unit
    _dashed(s, ix0, ix1, y + 0.3 * unit, ink)
    y += 0.6 * unit
    for item, price in zip(items, prices, strict=True):
        _pair_row(s, y, item, price, ix0, ix1, face, size, ink)
        y += unit
    _dashed(s, ix0, ix1, y + 0.3 * unit, ink)
    y += 0.6 * unit
    total_size = _pair_size(bold, rows[-1:], size, ix1 - ix0)
    _pair_row(s, y + 0.15 * unit, s.label("total"), cur + total, ix0, ix1, bold, total_size, ink)

    pick = int(s.rng.integers(n))
    return s.ask(
        ("What is the total on the receipt?", "小票上的合计金额是多少？", [cur + total, total]),
        (f"What is the price of {items[pick]} on the receipt?", f"小票上「{items[pick]}」的价格是多少？",
         [prices[pick], cur + prices[pick]]),
        ("How many items are listed on the receipt?", "小票上一共列出了几件商品？", [str(n)]),
        ("What is the name of the store on the receipt?", "小票上的店铺名称是什么？", [shop]),
    )


def _field_rows(s: Scene, fields: Sequence[tuple[str, str]], box: Sequence[float], ink: Color,
                value_ink: Color, boxed: bool, rules: bool) -> None:
    """Label/value rows: labels in a left column, values after them (optionally in an outlined entry box)."""
    x0, y0, x1, y1 = box
    pitch = (y1 - y0) / len(fields)
    colon = s.label("colon")
    labels = [label + colon for label, _ in fields]
    size = _size_for_height(s.faces.bold, pitch * (0.5 if boxed else 0.62))
    size = min(_fit(s.faces.bold, label, size, (x1 - x0) * 0.38) for label in labels)
    label_w = max(_width(s.faces.bold, size, label) for label in labels)
    vx0 = x0 + label_w + max(8.0, size * 0.8)
    pad = size * 0.4 if boxed else 0.0
    for i, (label, (_, value)) in enumerate(zip(labels, fields, strict=True)):
        top = y0 + i * pitch
        vsize = _fit(s.faces.regular, value, size, x1 - vx0 - 2 * pad)
        if rules and i:
            s.draw.line((int(x0), int(top), int(x1), int(top)), fill=ink, width=1)
        if boxed:
            s.draw.rectangle((int(vx0), int(top + pitch * 0.12), int(x1), int(top + pitch * 0.88)), outline=ink,
                             width=1)
        s.text((x0, top + (pitch - _line_height(s.faces.bold, size)) / 2), label, s.faces.bold, size, ink)
        s.text((vx0 + pad, top + (pitch - _line_height(s.faces.regular, vsize)) / 2), value, s.faces.regular, vsize,
               value_ink)


def _title(s: Scene, text: str, box: Sequence[float], fill: Color, size: int) -> Box:
    """A bold centred title, shrunk to fit `box`, vertically centred in it."""
    x0, y0, x1, y1 = box
    size = min(_fit(s.faces.bold, text, size, x1 - x0), _size_for_height(s.faces.bold, y1 - y0))
    return s.text(((x0 + x1) / 2, y0 + (y1 - y0 - _line_height(s.faces.bold, size)) / 2), text, s.faces.bold,
                  size, fill, "ma")


def _invoice(s: Scene) -> tuple[str, list[str]]:
    w, h = s.size
    pw, ph = w * s.uniform(0.84, 0.96), h * s.uniform(0.84, 0.96)
    x0, y0 = s.uniform(0.01 * w, w - pw - 0.01 * w), s.uniform(0.01 * h, h - ph - 0.01 * h)
    paper, ink = _light(s.rng), _dark(s.rng)
    title_ink = (int(s.rng.integers(130, 200)), int(s.rng.integers(30, 70)), int(s.rng.integers(20, 60))) \
        if s.zh else _dark(s.rng)
    s.panel((x0, y0, x0 + pw, y0 + ph), paper, outline=title_ink if s.zh else None, width=2)

    number, code = s.digits(8), s.digits(12)
    year, month, day = s.date()
    date = f"{year}年{month:02d}月{day:02d}日" if s.zh else f"{year}-{month:02d}-{day:02d}"
    cents = int(s.rng.integers(1000, 999999))
    amount = s.label("currency") + _money(cents, thousands=not s.zh)
    buyer = (s.word("company_prefix") + s.word("company") + "有限公司" if s.zh
             else f"{s.word('company')} {s.word('company_suffix')}")
    keys = ("invoice_code", "invoice_no", "date", "buyer", "amount")
    values = dict(zip(keys, (code, number, date, buyer, amount), strict=True))
    fields = [(s.label(k), values[k]) for k in keys]

    pad = min(pw, ph) * 0.06
    title_h = ph * 0.2
    title_box = _title(s, s.word("invoice_title"), (x0 + pad, y0 + pad * 0.6, x0 + pw - pad, y0 + title_h),
                       title_ink, int(ph * 0.12))
    s.draw.line((int(x0 + pad), title_box[3] + 4, int(x0 + pw - pad), title_box[3] + 4), fill=title_ink, width=2)
    _field_rows(s, fields, (x0 + pad, title_box[3] + 8, x0 + pw - pad, y0 + ph - pad * 0.5), ink, ink,
                boxed=False, rules=s.zh)

    if s.zh:
        if s.rng.random() < 0.25:
            return "这张发票的金额是多少？", [amount, _money(cents)]
        # The paper's extraction prompts name one or more fields; the answer is a dict of them.
        picked = s.sample([s.label(k) for k in ("invoice_no", "invoice_code", "date", "amount")],
                          int(s.rng.integers(1, 3)), ordered=True)
        by_label = dict(fields)
        answer = "{" + ", ".join(f"'{k}': '{by_label[k]}'" for k in picked) + "}"
        return "从图中提取: " + ", ".join(picked), [answer] + ([by_label[picked[0]]] if len(picked) == 1 else [])
    return s.pick([
        ("What is the invoice number?", [number]),
        ("What is the invoice code?", [code]),
        ("What is the date on the invoice?", [date]),
        ("What is the amount on the invoice?", [amount, _money(cents, thousands=True), _money(cents)]),
        ("Who is the invoice billed to?", [buyer]),
    ])


def _form_fields(s: Scene) -> list[tuple[str, str]]:
    """All fields a form can hold, as (label, value); a form shows a few of them, in this order."""
    year, month, day = s.date(1950, 2008)
    if s.zh:
        return [(s.label("name"), s.word("surname") + s.word("given_name")),
                (s.label("gender"), s.word("gender")),
                (s.label("birth"), f"{year}年{month:02d}月{day:02d}日"),
                (s.label("phone"), "1" + s.pick("358") + s.digits(9)),
                (s.label("city"), s.word("city")),
                (s.label("occupation"), s.word("occupation")),
                (s.label("id"), s.digits(6))]
    first, last = s.word("first_name"), s.word("last_name")
    return [(s.label("name"), f"{first} {last}"),
            (s.label("birth"), f"{year}-{month:02d}-{day:02d}"),
            (s.label("phone"), f"({s.digits(3)}) {s.digits(3)}-{s.digits(4)}"),
            (s.label("email"), f"{first.lower()}.{last.lower()}@example.com"),
            (s.label("city"), s.word("city")),
            (s.label("occupation"), s.word("occupation")),
            (s.label("id"), s.digits(9))]


def _form(s: Scene) -> tuple[str, list[str]]:
    w, h = s.size
    pw, ph = w * s.uniform(0.8, 0.96), h * s.uniform(0.82, 0.96)
    x0, y0 = s.uniform(0.01 * w, w - pw - 0.01 * w), s.uniform(0.01 * h, h - ph - 0.01 * h)
    paper, ink = _light(s.rng), _dark(s.rng)
    pen = (int(s.rng.integers(10, 60)), int(s.rng.integers(30, 90)), int(s.rng.integers(120, 200)))
    s.panel((x0, y0, x0 + pw, y0 + ph), paper)

    candidates = _form_fields(s)
    fields = s.sample(candidates, int(s.rng.integers(4, 7)), ordered=True)
    title = s.word("form_title")
    pad = min(pw, ph) * 0.06
    tbox = _title(s, title, (x0 + pad, y0 + pad * 0.5, x0 + pw - pad, y0 + ph * 0.17), ink, int(ph * 0.09))
    _field_rows(s, fields, (x0 + pad, tbox[3] + pad * 0.5, x0 + pw - pad, y0 + ph - pad * 0.6), ink,
                pen if s.rng.random() < 0.7 else ink, boxed=True, rules=False)

    label, value = s.pick(fields)
    return s.ask(
        (f"What is written in the '{label}' field of the form?", f"表格中「{label}」一栏填写的是什么？", [value]),
        ("What is the title of the form?", "这张表格的标题是什么？", [title]),
        (f"Which field of the form contains '{value}'?", f"表格中哪一栏填写的是「{value}」？", [label]),
    )


def _table(s: Scene) -> tuple[str, list[str]]:
    w, h = s.size
    corner, row_pool = s.word("table_topic")
    n_rows, n_cols = int(s.rng.integers(3, 6)), int(s.rng.integers(2, 5))
    rows = s.sample(row_pool, n_rows)
    col_set = s.word("table_columns")
    start = int(s.rng.integers(0, len(col_set) - n_cols + 1))
    cols = list(col_set[start:start + n_cols])
    # Distinct values within a column so "which row is highest" has one answer.
    grid = np.stack([s.rng.choice(np.arange(10, 1000), n_rows, replace=False) for _ in cols], axis=1)
    decimals = s.rng.random() < 0.3
    cells = [[f"{v / 10:.1f}" if decimals else str(int(v)) for v in row] for row in grid]

    tw = w * s.uniform(0.7, 0.94)
    th = min(h * s.uniform(0.55, 0.9), (n_rows + 1) * h * 0.14)
    x0, y0 = s.uniform(0.03 * w, w - tw - 0.03 * w), s.uniform(0.03 * h, h - th - 0.03 * h)
    paper, ink = _light(s.rng), _dark(s.rng)
    header_fill = tuple(int(c * 0.35 + p * 0.65) for c, p in zip(_accent(s.rng), paper, strict=True))
    s.panel((x0 - 6, y0 - 6, x0 + tw + 6, y0 + th + 6), paper, shadow=s.rng.random() < 0.5)

    f = s.faces
    row_h = th / (n_rows + 1)
    size = _size_for_height(f.bold, row_h * 0.62)
    while True:  # shrink until the label column and the value columns fit the table width
        pad = size * 0.5
        label_w = max(_width(f.bold, size, corner), *(_width(f.regular, size, r) for r in rows))
        value_w = max(*(_width(f.bold, size, c) for c in cols), *(_width(f.regular, size, v) for r in cells
                                                                   for v in r))
        need = label_w + n_cols * value_w + 2 * pad * (n_cols + 1)
        if need <= tw or size <= MIN_SIZE:
            break
        size = max(MIN_SIZE, min(size - 1, int(size * tw / need)))
    spare = max(0.0, tw - need)
    label_col = label_w + 2 * pad + spare * 0.3
    value_col = (tw - label_col) / n_cols
    lh = _line_height(f.bold, size)

    s.draw.rectangle((int(x0), int(y0), int(x0 + tw), int(y0 + row_h)), fill=header_fill)
    for i in range(n_rows + 2):
        y = int(y0 + i * row_h)
        s.draw.line((int(x0), y, int(x0 + tw), y), fill=ink, width=2 if i in (0, 1, n_rows + 1) else 1)
    for x in [x0, *(x0 + label_col + j * value_col for j in range(n_cols + 1))]:
        s.draw.line((int(x), int(y0), int(x), int(y0 + th)), fill=ink, width=1)

    def cell_y(r: int) -> float:
        return y0 + r * row_h + (row_h - lh) / 2

    s.text((x0 + pad, cell_y(0)), corner, f.bold, size, ink)
    for j, col in enumerate(cols):
        s.text((x0 + label_col + (j + 0.5) * value_col, cell_y(0)), col, f.bold, size, ink, "ma")
    for i, (row, values) in enumerate(zip(rows, cells, strict=True)):
        s.text((x0 + pad, cell_y(i + 1)), row, f.regular, size, ink)
        for j, value in enumerate(values):
            s.text((x0 + label_col + (j + 1) * value_col - pad, cell_y(i + 1)), value, f.regular, size, ink, "ra")

    r, c = int(s.rng.integers(n_rows)), int(s.rng.integers(n_cols))
    best = rows[int(np.argmax(grid[:, c]))]
    return s.ask(
        (f"In the table, what is the value in row '{rows[r]}' under column '{cols[c]}'?",
         f"表格中「{rows[r]}」行「{cols[c]}」列的数值是多少？", [cells[r][c]]),
        (f"Which row of the table has the highest value in column '{cols[c]}'?",
         f"表格中「{cols[c]}」列数值最大的是哪一行？", [best]),
        ("How many data rows does the table have (not counting the header)?", "表格中共有几行数据（不含表头）？",
         [str(n_rows)]),
    )


def _chart(s: Scene) -> tuple[str, list[str]]:
    w, h = s.size
    title, pool = s.word("chart_topic")
    n = int(s.rng.integers(3, min(6, len(pool)) + 1))
    cats = s.sample(pool, n, ordered=True)
    step = int(s.pick((1, 5, 10)))
    values = [int(v) * step for v in s.rng.choice(np.arange(2, 100), n, replace=False)]
    pw, ph = w * s.uniform(0.82, 0.97), h * s.uniform(0.82, 0.97)
    x0, y0 = s.uniform(0.01 * w, w - pw - 0.01 * w), s.uniform(0.01 * h, h - ph - 0.01 * h)
    paper, ink = _light(s.rng), _dark(s.rng)
    s.panel((x0, y0, x0 + pw, y0 + ph), paper, shadow=s.rng.random() < 0.5)
    per_bar = s.rng.random() < 0.4
    bar_colors = [_accent(s.rng) for _ in range(n if per_bar else 1)]

    f = s.faces
    pad = min(pw, ph) * 0.05
    ix0, iy0, ix1, iy1 = x0 + pad * 1.5, y0 + pad * 0.5, x0 + pw - pad, y0 + ph - pad * 0.5
    tbox = _title(s, title, (ix0, iy0, ix1, iy0 + ph * 0.13), ink, int(ph * 0.08))
    slot = (ix1 - ix0) / n
    base = _size_for_height(f.regular, ph * 0.08)
    size = min(_fit(f.regular, text, base, slot * 0.9) for text in [*cats, *map(str, values)])
    lh = _line_height(f.regular, size)
    axis_y = iy1 - lh - 4
    top = tbox[3] + 6 + lh + 3  # tallest bar leaves room for its value label under the title
    bar_w = slot * s.uniform(0.45, 0.75)

    for k in (1, 2, 3):  # light gridlines behind the bars
        gy = int(axis_y - k / 3 * (axis_y - top))
        s.draw.line((int(ix0), gy, int(ix1), gy), fill=tuple(int(c * 0.85) for c in paper), width=1)
    s.draw.line((int(ix0), int(axis_y), int(ix1), int(axis_y)), fill=ink, width=2)
    s.draw.line((int(ix0), int(top), int(ix0), int(axis_y)), fill=ink, width=2)
    for i, (cat, value) in enumerate(zip(cats, values, strict=True)):
        cx = ix0 + (i + 0.5) * slot
        bar_top = axis_y - value / max(values) * (axis_y - top)
        s.draw.rectangle((int(cx - bar_w / 2), int(bar_top), int(cx + bar_w / 2), int(axis_y) - 1),
                         fill=bar_colors[i % len(bar_colors)])
        s.text((cx, bar_top - 3 - lh), str(value), f.regular, size, ink, "ma")
        s.text((cx, axis_y + 4), cat, f.regular, size, ink, "ma")

    pick = int(s.rng.integers(n))
    best = cats[int(np.argmax(values))]
    return s.ask(
        (f"What is the value of the bar labelled '{cats[pick]}'?", f"图中「{cats[pick]}」对应柱子的数值是多少？",
         [str(values[pick])]),
        ("Which category has the highest value in the chart?", "图中数值最高的是哪一项？", [best]),
        ("What is the title of the chart?", "这张图表的标题是什么？", [title]),
    )


def _split_title(title: str) -> list[str]:
    """Long multi-word titles go on two lines, split at the space nearest the middle."""
    words = title.split(" ")
    if len(title) <= 14 or len(words) < 2:
        return [title]
    cut = min(range(1, len(words)), key=lambda k: abs(len(" ".join(words[:k])) - len(" ".join(words[k:]))))
    return [" ".join(words[:cut]), " ".join(words[cut:])]


def _book_cover(s: Scene) -> tuple[str, list[str]]:
    w, h = s.size
    ch = h * s.uniform(0.86, 0.97)
    cw = min(ch * s.uniform(0.62, 0.78), w * 0.9)
    x0, y0 = s.uniform(0.03 * w, w - cw - 0.03 * w), (h - ch) / 2
    cover, ink = _paper_ink(s.rng, dark_chance=0.55)
    accent = _accent(s.rng)
    s.panel((x0, y0, x0 + cw, y0 + ch), cover, radius=int(cw * 0.02))

    if s.zh:
        title = s.word("book_adjective") + s.word("book_noun")
        author = s.word("surname") + s.word("given_name")
    else:
        title = ("The " if s.rng.random() < 0.6 else "") + f"{s.word('book_adjective')} {s.word('book_noun')}"
        author = f"{s.word('first_name')} {s.word('last_name')}"
    publisher = s.word("publisher")
    subtitle = s.word("book_subtitle") if s.rng.random() < 0.5 else None

    # Decoration only in the middle band, which no text uses.
    band = (x0, y0 + ch * 0.47, x0 + cw, y0 + ch * 0.64)
    if s.rng.random() < 0.5:
        s.draw.rectangle(tuple(int(v) for v in band), fill=accent)
    else:
        r = (band[3] - band[1]) / 2
        cx, cy = x0 + cw * s.uniform(0.3, 0.7), (band[1] + band[3]) / 2
        s.draw.ellipse((int(cx - r), int(cy - r), int(cx + r), int(cy + r)), fill=accent)

    f = s.faces
    pad = cw * 0.08
    top = [Line(t, f.bold, int(ch * 0.11), ink) for t in _split_title(title)]
    if subtitle:
        top.append(Line(subtitle, f.regular, int(ch * 0.05), ink))
    _stack(s, top, (x0 + pad, y0 + ch * 0.04, x0 + cw - pad, y0 + ch * 0.45))
    author_line = author + s.label("author_suffix")
    _stack(s, [Line(author_line, f.regular, int(ch * 0.065), ink), Line(publisher, f.regular, int(ch * 0.045), ink)],
           (x0 + pad, y0 + ch * 0.66, x0 + cw - pad, y0 + ch * 0.97))
    return s.ask(
        ("What is the title of the book?", "这本书的书名是什么？", [title] + ([f"《{title}》"] if s.zh else [])),
        ("Who is the author of the book?", "这本书的作者是谁？", [author]),
        ("Which publisher is shown on the book cover?", "这本书的出版社是什么？", [publisher]),
    )


SCENES: dict[str, Callable[[Scene], tuple[str, list[str]]]] = {
    "sign": _sign, "receipt": _receipt, "invoice": _invoice, "form": _form, "table": _table, "chart": _chart,
    "book_cover": _book_cover,
}

# ------------------------------------------------------------------------------------------------- source


class SyntheticScenes:
    """Synthetic text scenes (`KINDS`), English and, when a CJK font is found, Chinese (`cjk_fraction` of items)."""

    name = "synthetic"

    def __init__(self, kinds: list[str] | None = None, cjk_fraction: float = 0.25,
                 size: tuple[int, int] = (512, 384), cjk_font: str | None = None):
        self.kinds = list(kinds) if kinds is not None else list(KINDS)
        unknown = [k for k in self.kinds if k not in SCENES]
        if unknown or not self.kinds:
            raise ValueError(f"unknown or no scene kinds {unknown or self.kinds}; choose from {list(KINDS)}")
        if not 0.0 <= cjk_fraction <= 1.0:
            raise ValueError(f"cjk_fraction must be in [0, 1], got {cjk_fraction}")
        self.size = (int(size[0]), int(size[1]))
        self.cjk_font = find_cjk_font(cjk_font)
        # Without a CJK font every item is English: never draw missing-glyph boxes.
        self.cjk_fraction = cjk_fraction if self.cjk_font else 0.0

    def _faces(self, rng: np.random.Generator, lang: str) -> Faces:
        if lang == "zh":
            return Faces(self.cjk_font, self.cjk_font, self.cjk_font)
        families, mono = _latin_faces()
        regular, bold = families[int(rng.integers(len(families)))]
        return Faces(regular, bold, mono)

    def sample(self, rng: np.random.Generator, index: int) -> SourceItem:
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        lang = "zh" if rng.random() < self.cjk_fraction else "en"
        scene = Scene(rng, lang, self._faces(rng, lang), _background(rng, self.size))
        question, answers = SCENES[kind](scene)
        answers = list(dict.fromkeys(answers))  # accepted forms can coincide, e.g. hours drawn without spaces
        return SourceItem(image=scene.image, question=question, answers=answers, source=self.name,
                          source_id=f"{kind}/{lang}/{index}", regions=scene.regions, lang=lang)
