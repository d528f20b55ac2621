"""Teacher trajectories in the paper's tag protocol (spec §2.3): a `<problem>` diagnosis, the `<code>` that fixes
the image, and the `<answer>`; plus the checks that decide whether a fix really restored the image.

The code is written the way the policy should learn to write it: OpenCV on `path_to_input_image.jpg`, saved
to `path_to_output_image.png`; the parameters a teacher would read off the image are rounded to one decimal.
"""

from __future__ import annotations

import numpy as np

from arft_core.protocol import PHOTOMETRIC, tips

ROTATE_CODES = {"rotation90": "cv2.ROTATE_90_COUNTERCLOCKWISE", "rotation180": "cv2.ROTATE_180"}  # the undo
DESCRIPTIONS = {
    "rotation90": "rotated 90 degrees clockwise, so the text runs vertically",
    "rotation180": "upside down",
    "dark": "too dark to read",
    "overexposure": "overexposed and washed out",
    "blur": "blurred",
    "noise": "covered in noise",
    "crop": "fine, but the question asks about a small region that should be cropped",
    "none": "clear and correctly oriented",
}


def problem_step(labels: list[str]) -> str:
    said = " and ".join(DESCRIPTIONS[label] for label in labels)
    label_set = "{" + ", ".join(f"'{label}'" for label in labels) + "}"
    return f"<think> The image is {said}. </think>\n<problem> {label_set} </problem>"


def _fix_lines(label: str, params: dict) -> list[str]:
    if label in ROTATE_CODES:
        return [f"img = cv2.rotate(img, {ROTATE_CODES[label]})"]
    if label == "dark":
        return [f"img = cv2.convertScaleAbs(img, alpha={round(1 / params['factor'], 1)}, beta=0)"]
    if label == "overexposure":
        # Clipped pixels were bright before: keep them white, scale the rest back.
        return ["import numpy as np",
                f"img = np.where(img >= 250, 255, img * {round(1 / params['factor'], 2)}).astype(np.uint8)"]
    if label == "blur":
        sigma = round(params["radius"], 1)
        return [f"soft = cv2.GaussianBlur(img, (0, 0), {sigma})", "img = cv2.addWeighted(img, 1.8, soft, -0.8, 0)"]
    if label == "noise":
        # Edge-preserving: a Gaussian blur also smears the text (measured: >= 6 dB gain here vs. < 0 dB there).
        return ["img = cv2.bilateralFilter(img, 9, 75, 75)"]
    raise ValueError(f"no teacher fix for {label!r}")


def fix_code(labels: list[str], params: list[dict], box_norm: list[int] | None = None) -> str | None:
    """The fix as Python/OpenCV, or None for 'none'. Degradations are undone in reverse order of application."""
    if labels == ["none"]:
        return None
    lines = ["import cv2", "img = cv2.imread('path_to_input_image.jpg')"]
    if labels == ["crop"]:
        lines += ["h, w = img.shape[:2]", f"x_min, y_min, x_max, y_max = {box_norm}",
                  "img = img[int(y_min / 1000 * h):int(y_max / 1000 * h), int(x_min / 1000 * w):int(x_max / 1000 * w)]"]
    else:
        for label, p in reversed(list(zip(labels, params, strict=True))):
            lines += _fix_lines(label, p)
    lines.append("cv2.imwrite('path_to_output_image.png', img)")
    return "\n".join(lines)


def code_step(labels: list[str], code: str) -> str:
    what = "crop the region given in the question" if labels == ["crop"] else "undo " + " and ".join(labels)
    return f"<think> I will {what} with OpenCV. </think>\n<code>\n```python\n{code}\n```\n</code>"


def answer_step(answer: str) -> str:
    return f"<think> The processed image is clear now, so I can read the answer. </think>\n<answer> {answer} </answer>"


def trajectory(labels: list[str], params: list[dict], answer: str, box_norm: list[int] | None = None) -> dict:
    """The teacher's steps for one item; `code` is None when no fix is needed."""
    code = fix_code(labels, params, box_norm)
    return {"problem": problem_step(labels), "tips": tips(labels), "code": code,
            "code_step": code_step(labels, code) if code else None, "answer": answer_step(answer)}


# ------------------------------------------------------------------ checks of a fix's output
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    diff = a.astype(np.float32) - b.astype(np.float32)
    mse = float(np.mean(diff * diff, dtype=np.float64))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def crop_box_pixels(box_norm: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """The same integer arithmetic as the teacher code: normalised 0-1000 box -> pixel slice bounds."""
    x1, y1, x2, y2 = box_norm
    return int(x1 / 1000 * width), int(y1 / 1000 * height), int(x2 / 1000 * width), int(y2 / 1000 * height)


def undo_rotations(img: np.ndarray, labels: list[str]) -> np.ndarray:
    """The corrupted image put back upright (to measure the photometric damage alone)."""
    for label in reversed(labels):
        if label == "rotation90":
            img = np.rot90(img, k=1)  # the corruption turned it clockwise
        elif label == "rotation180":
            img = np.rot90(img, k=2)
    return img


def check_fix(labels: list[str], clean: np.ndarray, corrupted: np.ndarray, fixed: np.ndarray | None,
              min_gain_db: dict[str, float], box_norm: list[int] | None = None) -> tuple[bool, str, dict]:
    """(kept, reason, metrics): does `fixed` restore `clean`? Rotations and crops exactly, photometric fixes by
    a PSNR gain of at least the configured dB over the corrupted image."""
    if fixed is None:
        return False, "no output image", {}
    if labels == ["crop"]:
        x1, y1, x2, y2 = crop_box_pixels(box_norm, clean.shape[1], clean.shape[0])
        expected = clean[y1:y2, x1:x2]
        same = fixed.shape == expected.shape and np.array_equal(fixed, expected)
        return same, "ok" if same else f"crop {fixed.shape} is not the region {expected.shape}", {}
    if fixed.shape != clean.shape:
        return False, f"output shape {fixed.shape} differs from the clean image {clean.shape}", {}
    photometric = [label for label in labels if label in PHOTOMETRIC]
    if not photometric:
        same = np.array_equal(fixed, clean)
        return same, "ok" if same else "rotation not exactly undone", {"psnr_db": psnr(fixed, clean)}
    before, after = psnr(undo_rotations(corrupted, labels), clean), psnr(fixed, clean)
    need = min(min_gain_db.get(label, 0.0) for label in photometric)
    metrics = {"psnr_before_db": round(before, 3), "psnr_after_db": round(after, 3),
               "psnr_gain_db": round(after - before, 3)}
    if after - before < need:
        return False, f"PSNR gain {after - before:.2f} dB below {need} dB", metrics
    return True, "ok", metrics
