"""A visual check of the data: one row per corruption type with the clean, corrupted and teacher-fixed images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

THUMB = 200  # pixels, the longer side of each thumbnail


def _thumb(path: Path | None) -> Image.Image:
    if path is None or not path.is_file():
        tile = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
        ImageDraw.Draw(tile).text((10, THUMB // 2), "(no fix needed)", fill=(90, 90, 90))
        return tile
    img = Image.open(path).convert("RGB")
    img.thumbnail((THUMB, THUMB))
    return img


def contact_sheet(items: list[dict], data_dir: Path, out: Path) -> Path:
    """Write a PNG grid (clean / corrupted / fixed) with the first item of each type found in `items`."""
    firsts: dict[str, dict] = {}
    for item in items:
        firsts.setdefault("+".join(item["type"]), item)
    font = ImageFont.load_default(size=14)
    label_w, pad, header = 190, 8, 28
    sheet = Image.new("RGB", (label_w + 3 * (THUMB + pad) + pad, header + len(firsts) * (THUMB + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(("clean", "corrupted (model input)", "fixed by the teacher's code")):
        draw.text((label_w + pad + col * (THUMB + pad), 6), title, fill="black", font=font)
    for row, (type_name, item) in enumerate(sorted(firsts.items())):
        y = header + row * (THUMB + pad)
        draw.text((pad, y + THUMB // 2 - 10), type_name, fill="black", font=font)
        fixed = item.get("fixed_image_path")
        seen = item["ori_image_path"] if item["type"] == ["crop"] else item["processed_image_path"]
        for col, rel in enumerate((item["ori_image_path"], seen, fixed)):
            sheet.paste(_thumb(data_dir / rel if rel else None), (label_w + pad + col * (THUMB + pad), y))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
