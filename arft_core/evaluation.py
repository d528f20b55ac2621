"""Evaluation on the MAT-Coding test manifest: generate one answer step per item, score F1/EM (paper metric)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from arft_core import metrics
from arft_core.config import EvalConfig
from arft_core.data.mat_coding import load_manifest
from arft_core.protocol import coding_prompt, extract_answer
from arft_core.training import input_image_path


def generate_answers(model, processor, questions: list[str], images: list, cfg: EvalConfig,
                     progress: Callable[[int], None] = lambda _: None) -> list[str]:
    """Raw completions for (question, image) pairs, batched with left padding."""
    import torch

    processor.tokenizer.padding_side = "left"
    torch.manual_seed(cfg.seed)
    outputs = []
    model.eval()
    for start in range(0, len(questions), cfg.batch_size):
        qs, ims = questions[start:start + cfg.batch_size], images[start:start + cfg.batch_size]
        texts = [processor.apply_chat_template(coding_prompt(q), tokenize=False, add_generation_prompt=True)
                 for q in qs]
        inputs = processor(text=texts, images=ims, return_tensors="pt", padding=True).to(model.device)
        gen = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample)
        if cfg.do_sample:
            gen["temperature"] = cfg.temperature
        with torch.no_grad():
            out = model.generate(**inputs, **gen)
        outputs += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        progress(len(qs))
    return outputs


def evaluate(model_dir: Path, data_dir: Path, cfg: EvalConfig, dtype: str = "float32",
             progress: Callable[[int], None] = lambda _: None) -> tuple[dict, list[dict]]:
    """(metrics, predictions): metrics in percent per split; predictions in the authors' released format."""
    from PIL import Image

    from arft_core.model.embedded import load_model

    items = load_manifest(data_dir, "test")
    model, processor = load_model(model_dir, dtype)
    images = [Image.open(data_dir / input_image_path(i)).convert("RGB") for i in items]
    completions = generate_answers(model, processor, [i["question"] for i in items], images, cfg, progress)
    predictions, rows = [], []
    for item, completion in zip(items, completions, strict=True):
        pred = extract_answer(completion)
        s = metrics.score(pred, item["answers"], cjk=True)
        predictions.append({"id": item["id"], "gt": item["answers"], "pred_answer": pred, "completion": completion,
                            "split": item["split"], "type": item["type"]})
        rows.append({**s, "split": item["split"], "answered": pred is not None})
    return metrics.aggregate(rows), predictions
