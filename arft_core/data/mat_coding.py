"""The MAT-Coding data engine: seeded items from weighted sources, degraded, each with a teacher trajectory whose
fix is executed in the sandbox and kept only if it really restores the image.

Determinism: candidate k of a (split, level, type) draws everything from `default_rng([seed, split, level, type,
k])`, and items are selected in k order, so the output is the same whatever the number of workers. Each type
of a level gets an equal share of the level's quota (the paper's Simple split is 7 types x 10).
Outputs (under `paths.mat_coding`): `train.json`, `test.json` in the paper's fields plus provenance and the
teacher trajectory (training replays it through the agent loop into step rows, `agent.steps`); `images/`.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import textwrap
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from functools import lru_cache, partial
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from arft_core.config import DataConfig, SandboxConfig
from arft_core.data import corruptions, teacher
from arft_core.io import MANIFESTS, write_json_atomic

LEVELS = ("simple", "hard")
VERIFY_BATCH = 8  # teacher fixes checked per sandbox job (at most sandbox.max_output_images)
CROP_QUESTION = ("Recognize the text within the {box} of the image. The coordinates have been normalized ranging "
                 "from 0 to 1000 by the image width and height. ")


def dhash(img: Image.Image) -> str:
    """64-bit difference hash: equal for the same picture re-encoded or resized (train/test overlap check)."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(img: Image.Image, path: Path) -> None:
    if path.suffix == ".jpg":
        img.save(path, quality=95)
    else:
        img.save(path, compress_level=1)  # fast and lossless; the default level 6 costs several ms per image


# ------------------------------------------------------------------ sources
@lru_cache(maxsize=4)
def _sources(cfg_json: str, root: str, split: str) -> tuple[list, np.ndarray]:
    """(sources, weights) for a data config; built once per process."""
    cfg = DataConfig.model_validate_json(cfg_json)
    w = cfg.sources
    chosen = []
    if w.synthetic:
        from arft_core.data.sources.synthetic import SyntheticScenes

        chosen.append((SyntheticScenes(cjk_fraction=cfg.cjk_fraction, size=tuple(cfg.synthetic_size),
                                       cjk_font=cfg.cjk_font), w.synthetic))
    if w.easy_vqa:
        from arft_core.data.easy_vqa_source import EasyVqa

        chosen.append((EasyVqa(split, cfg.image_size), w.easy_vqa))
    if w.photos:
        from arft_core.data.sources.photos import PhotoLabels

        chosen.append((PhotoLabels(tuple(cfg.synthetic_size)), w.photos))
    if w.pdf:
        from arft_core.data.sources.pdf import PdfPages

        if not cfg.pdf_paths:
            raise ValueError("data.sources.pdf > 0 needs data.pdf_paths")
        chosen.append((PdfPages([Path(root) / p for p in cfg.pdf_paths]), w.pdf))
    if w.vqa_import:
        from arft_core.data.importers import VqaImport

        v = cfg.vqa_import
        if not (v.path and v.image_dir):
            raise ValueError("data.sources.vqa_import > 0 needs data.vqa_import.path and image_dir")
        chosen.append((VqaImport(Path(root) / v.path, Path(root) / v.image_dir, v.fields or None), w.vqa_import))
    if not chosen:
        raise ValueError("data.sources: every weight is 0; give at least one source a positive weight")
    weights = np.array([wt for _, wt in chosen], dtype=float)
    return [s for s, _ in chosen], weights / weights.sum()


def _box_norm(box: tuple[int, int, int, int], size: tuple[int, int], margin: int) -> list[int]:
    """Pixel box plus margin -> the paper's 0-1000 box, rounded outwards so the text stays inside."""
    w, h = size
    x1, y1, x2, y2 = max(0, box[0] - margin), max(0, box[1] - margin), min(w, box[2] + margin), min(h, box[3] + margin)
    return [int(np.floor(x1 / w * 1000)), int(np.floor(y1 / h * 1000)), int(np.ceil(x2 / w * 1000)),
            int(np.ceil(y2 / h * 1000))]


# ------------------------------------------------------------------ one candidate (runs in a worker process)
def level_types(cfg: DataConfig, level: str) -> list[list[str]]:
    return [[t] for t in cfg.simple] if level == "simple" else [list(t) for t in cfg.hard]


def render_candidate(cfg_json: str, root: str, split: str, level: str, type_index: int, k: int,
                     image_dir: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """Draw, degrade and save candidate k of (split, level, type). Returns its record (teacher not yet run),
    the clean pixels and the pixels the model sees (as stored)."""
    cfg = DataConfig.model_validate_json(cfg_json)
    seed = [cfg.seed, MANIFESTS.index(split), LEVELS.index(level), type_index, k]
    rng = np.random.default_rng(seed)
    labels = level_types(cfg, level)[type_index]
    sources, weights = _sources(cfg_json, root, split)
    for _attempt in range(20):  # crop needs a source item with text regions
        source = sources[int(rng.choice(len(sources), p=weights))]
        item = source.sample(rng, k)
        if labels != ["crop"] or item.regions:
            break
    else:
        raise ValueError(f"no source with text regions for crop items (sources: {[s.name for s in sources]})")
    clean = item.image.convert("RGB")
    question, answers, box_norm, params = item.question, list(item.answers), None, []
    if labels == ["crop"]:
        region = item.regions[int(rng.integers(len(item.regions)))]
        box_norm = _box_norm(region.box, clean.size, cfg.ranges.crop_margin)
        question, answers = CROP_QUESTION.format(box=box_norm), [region.text]
        degraded = clean
    else:
        degraded, params = corruptions.apply(clean, [] if labels == ["none"] else labels, rng, cfg.ranges)
    stem = f"{split}_{'+'.join(labels)}_{k}"  # type names are unique within a level, so stems are unique
    # Noise does not compress: PNG costs ~20 ms and ~0.5 MB per image, JPEG q95 a few ms. Everything checked for
    # exact equality (rotations, crops) stays PNG.
    ext = ".jpg" if "noise" in labels else ".png"
    ori, proc = Path(image_dir) / f"{stem}_ori.png", Path(image_dir) / f"{stem}_proc{ext}"
    _save(clean, ori)
    clean_arr = np.asarray(clean)
    if labels == ["crop"]:
        proc, seen_arr = ori, clean_arr  # a crop item is a region question on the clean image
    else:
        _save(degraded, proc)
        seen_arr = np.asarray(Image.open(proc).convert("RGB")) if ext == ".jpg" else np.asarray(degraded)
    record = {
        "question": question, "answers": answers, "type": labels, "split": level, "k": k, "type_index": type_index,
        "ori_image_path": f"images/{ori.name}", "processed_image_path": f"images/{proc.name}",
        "source": item.source, "source_id": item.source_id, "lang": item.lang, "seed": seed,
        "corruption_params": params, "box_norm": box_norm, "width": clean.size[0], "height": clean.size[1],
        "phash": dhash(clean), "teacher": teacher.trajectory(labels, params, answers[0], box_norm),
    }
    return record, clean_arr, seen_arr


# ------------------------------------------------------------------ verification (sandbox)
def batch_code(codes: list[str]) -> str:
    """Several items' teacher code as one sandbox job: item i reads `path_to_input_image_i.jpg`, writes
    `path_to_output_image_i.png`, and runs in its own function so one failure cannot affect the others."""
    parts = []
    for i, code in enumerate(codes):
        body = code.replace("path_to_input_image.jpg", f"path_to_input_image_{i}.jpg").replace(
            "path_to_output_image.png", f"path_to_output_image_{i}.png")
        parts.append(f"def _item_{i}():\n{textwrap.indent(body, '    ')}\n\n\ntry:\n    _item_{i}()\n"
                     f"except Exception as exc:\n    print('item {i} failed:', type(exc).__name__, exc)\n")
    return "\n".join(parts)


def verify_batch(records: list[dict], arrays: list[tuple[np.ndarray, np.ndarray]], data_dir: Path, pool,
                 min_gain: dict[str, float]) -> None:
    """Run the teacher fixes of `records` in one sandbox job; set each record's `verification`."""
    todo = [i for i, r in enumerate(records) if r["teacher"]["code"] is not None]
    for i, r in enumerate(records):
        if i not in todo:
            r["verification"] = {"kept": True, "reason": "ok (no fix needed)"}
    if not todo:
        return
    seen = [data_dir / (records[i]["ori_image_path"] if records[i]["type"] == ["crop"]
                        else records[i]["processed_image_path"]) for i in todo]
    with tempfile.TemporaryDirectory(prefix="arft-teacher-") as out:
        result = pool.run(batch_code([records[i]["teacher"]["code"] for i in todo]), seen, out)
        outputs = {p.name: p for p in result.images}
        failures = dict(re.findall(r"^item (\d+) failed: (.*)$", result.stdout, re.MULTILINE))
        for j, i in enumerate(todo):
            record, (clean, corrupted) = records[i], arrays[i]
            produced = outputs.get(f"output_{j}.png")
            fixed = np.asarray(Image.open(produced).convert("RGB")) if produced else None
            kept, reason, metrics = teacher.check_fix(record["type"], clean, corrupted, fixed, min_gain,
                                                      record["box_norm"])
            if str(j) in failures:
                reason = f"teacher code failed: {failures[str(j)]}"
            elif not result.ok and fixed is None:
                reason = f"teacher code failed: {result.error}"
            if kept:
                fixed_path = data_dir / "images" / Path(record["ori_image_path"]).name.replace("_ori.png", "_fixed.png")
                shutil.copyfile(produced, fixed_path)
                record["fixed_image_path"] = f"images/{fixed_path.name}"
            record["verification"] = {"kept": kept, "reason": reason, **metrics}


# ------------------------------------------------------------------ step samples
# ------------------------------------------------------------------ the whole build
_POOL = None  # this worker process's sandbox, started by its first batch


def _sandbox(sandbox_json: str):
    global _POOL
    if _POOL is None:
        import atexit

        from arft_core.sandbox import SandboxPool

        _POOL = SandboxPool(SandboxConfig.model_validate_json(sandbox_json))
        atexit.register(_POOL.close)
    return _POOL


def build_batch(cfg_json: str, root: str, split: str, jobs: list[tuple[str, int, int]], out_dir: str,
                sandbox_json: str | None) -> list[dict]:
    """Render the candidates `jobs` ((level, type, k) each), verify their teacher fixes in this process's sandbox
    (none: `sandbox_json` None) in one job, and drop the files of the rejected ones."""
    records, arrays = [], []
    for level, type_index, k in jobs:
        record, clean, seen = render_candidate(cfg_json, root, split, level, type_index, k,
                                               str(Path(out_dir) / "images"))
        records.append(record)
        arrays.append((clean, seen))
    if sandbox_json is None:
        for record in records:
            record["verification"] = {"kept": True, "reason": "not verified"}
    else:
        cfg = DataConfig.model_validate_json(cfg_json)
        verify_batch(records, arrays, Path(out_dir), _sandbox(sandbox_json), cfg.teacher.min_psnr_gain_db)
    for record in records:
        if not record["verification"]["kept"]:
            _discard(record, Path(out_dir))
    return records


def _quota(cfg: DataConfig, split: str) -> dict[str, int]:
    n = cfg.n_train if split == "train" else cfg.n_test
    hard = round(n * cfg.hard_fraction) if cfg.hard else 0
    return {"simple": n - hard, "hard": hard}


def _shares(cfg: DataConfig, split: str) -> dict[tuple[str, int], int]:
    """Items wanted per (level, type): equal shares of the level's quota, the first types take the remainder."""
    shares = {}
    for level, need in _quota(cfg, split).items():
        types = level_types(cfg, level)
        for t in range(len(types)):
            shares[(level, t)] = need // len(types) + (t < need % len(types))
    return shares


def generate(cfg: DataConfig, out_dir: Path, root: Path, sandbox: SandboxConfig | None = None,
             progress: Callable[[int], None] = lambda _: None, submit: Callable | None = None) -> dict:
    """Build both manifests under `out_dir` (rebuilt whole); returns the report (counts, rejects, speed).

    The batches run as `submit(*build_batch's arguments)` -> a future with `.result()` when given (e.g. Prefect
    tasks on a Dask cluster, `flows/cluster.py`; every worker must see `out_dir`), else on `cfg.workers` local
    processes. The output is the same either way (items are chosen by k, not by completion order)."""
    started = time.perf_counter()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "images").mkdir(parents=True)
    cfg_json = cfg.model_dump_json()
    sandbox_json = ((sandbox or SandboxConfig()).model_copy(update={"workers": 1}).model_dump_json()
                    if cfg.teacher.verify else None)
    report: dict = {"manifests": {}, "rejects": {}, "candidates": 0, "rejected": 0}
    with ExitStack() as stack:
        if submit is None:
            workers = stack.enter_context(ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn")))
            submit = partial(workers.submit, build_batch)
        for split in MANIFESTS:
            items = _build_split(cfg, cfg_json, str(root), split, out_dir, submit, sandbox_json, report, progress,
                                 min(VERIFY_BATCH, (sandbox or SandboxConfig()).max_output_images))
            for i, item in enumerate(items, start=1):
                item["id"] = i
            report["manifests"][split] = {"n": len(items), **Counter(i["split"] for i in items),
                                          "types": dict(Counter("+".join(i["type"]) for i in items)),
                                          "langs": dict(Counter(i["lang"] for i in items))}
            write_json_atomic(out_dir / f"{split}.json", [_finish(i, out_dir) for i in items])
    elapsed = time.perf_counter() - started
    kept = sum(m["n"] for m in report["manifests"].values())
    # Rejected by the teacher check, among candidates that were checked (spares that were not needed excluded).
    report["reject_rate"] = round(report["rejected"] / max(kept + report["rejected"], 1), 4)
    report["seconds"] = round(elapsed, 2)
    report["items_per_second"] = round(kept / elapsed, 2)
    report["items_per_second_per_worker"] = round(kept / elapsed / cfg.workers, 2)
    return report


def _build_split(cfg, cfg_json, root, split, out_dir, submit, sandbox_json, report, progress,
                 batch_size) -> list[dict]:
    """Kept items of a split: for each (level, type), the kept candidates with the smallest k. Candidates are
    submitted in rounds (all types at once) until every share is filled."""
    shares = _shares(cfg, split)
    kept: dict[tuple[str, int], dict[int, dict]] = {key: {} for key in shares}
    next_k = dict.fromkeys(shares, 0)
    while True:
        jobs = []
        for key, share in shares.items():
            missing = share - len(kept[key])
            if missing <= 0:
                continue
            limit = int(share * cfg.teacher.max_candidates_factor) + 4
            if next_k[key] >= limit:
                level, t = key
                raise RuntimeError(
                    f"{split}/{level}/{'+'.join(level_types(cfg, level)[t])}: only {len(kept[key])} of {share} items "
                    f"passed the teacher check after {next_k[key]} candidates; rejects: {report['rejects']}")
            # A few spares (rejects run at a few percent) so that a second round is rarely needed.
            batch = range(next_k[key], min(limit, next_k[key] + missing + missing // 10))
            next_k[key] = batch.stop
            jobs += [(key, k) for k in batch]
        if not jobs:
            break
        # Batches share one sandbox job (one fork, one image check) instead of one each.
        batches = [[(level, t, k) for (level, t), k in jobs[i:i + batch_size]] for i in range(0, len(jobs), batch_size)]
        futures = [submit(cfg_json, root, split, batch, str(out_dir), sandbox_json) for batch in batches]
        records = [record for future in futures for record in future.result()]
        for record in records:
            key = (record["split"], record["type_index"])
            report["candidates"] += 1
            if record["verification"]["kept"]:
                kept[key][record["k"]] = record
                progress(1) if len(kept[key]) <= shares[key] else None
            else:
                report["rejected"] += 1
                by_type = report["rejects"].setdefault("+".join(record["type"]), {})
                reason = re.sub(r"-?\d+(\.\d+)?", "#", record["verification"]["reason"])[:120]
                by_type[reason] = by_type.get(reason, 0) + 1
        for key, share in shares.items():  # keep the smallest k: the same items whatever finished first
            for k in sorted(kept[key])[share:]:
                _discard(kept[key].pop(k), out_dir)
    return [kept[key][k] for key in shares for k in sorted(kept[key])]


def _discard(record: dict, out_dir: Path) -> None:
    for key in ("ori_image_path", "processed_image_path", "fixed_image_path"):
        if record.get(key):
            (out_dir / record[key]).unlink(missing_ok=True)


def _finish(item: dict, out_dir: Path) -> dict:
    """Paper fields first, then provenance; image hashes computed from the files as written."""
    out = {key: item[key] for key in ("id", "question", "answers", "ori_image_path", "processed_image_path",
                                      "type", "split")}
    out.update({key: item[key] for key in ("source", "source_id", "lang", "seed", "corruption_params",
                                           "box_norm", "width", "height", "phash", "teacher", "verification")})
    out["fixed_image_path"] = item.get("fixed_image_path")
    out["ori_sha256"] = _sha256(out_dir / item["ori_image_path"])
    out["processed_sha256"] = _sha256(out_dir / item["processed_image_path"])
    return out
