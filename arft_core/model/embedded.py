"""The embedded default policy: a tiny random-weight Qwen2.5-VL with the real Qwen2.5 tokenizer, built offline."""

from __future__ import annotations

import json
from pathlib import Path

from arft_core.config import ModelConfig

REFERENCE_FILE = "checkpoint_reference.json"


def build_embedded_model(cfg: ModelConfig):
    """(model, processor) for `cfg.embedded`: a `Qwen2_5_VLForConditionalGeneration` built from a config."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from arft_core.model.processor import build_processor
    from arft_core.model.tokenizer import build_qwen_tokenizer

    e = cfg.embedded
    head_dim = e.hidden_size // e.num_attention_heads
    if sum(e.mrope_section) * 2 != head_dim:
        raise ValueError(f"model.embedded.mrope_section must sum to head_dim/2 = {head_dim // 2}, "
                         f"got {e.mrope_section} (sum {sum(e.mrope_section)})")
    tokenizer = build_qwen_tokenizer(e.vocab_size)
    processor = build_processor(tokenizer, cfg.min_pixels, cfg.max_pixels)
    tid = tokenizer.convert_tokens_to_ids
    special = dict(bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=e.hidden_size, intermediate_size=e.intermediate_size,
            num_hidden_layers=e.num_hidden_layers, num_attention_heads=e.num_attention_heads,
            num_key_value_heads=e.num_key_value_heads, max_position_embeddings=32768, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(e.mrope_section)},
            **special,
        ),
        vision_config=dict(
            depth=e.vision_depth, hidden_size=e.vision_hidden_size, intermediate_size=e.vision_intermediate_size,
            num_heads=e.vision_num_heads, out_hidden_size=e.hidden_size, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[e.vision_depth - 1],
        ),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True, **special,
    )
    torch.manual_seed(e.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = special["eos_token_id"]
    model.generation_config.pad_token_id = special["pad_token_id"]
    return model, processor


def prepare_base_model(cfg: ModelConfig, out_dir: Path) -> dict:
    """Write the base model to `out_dir`: the embedded model's weights, or a reference to a real checkpoint.

    A real checkpoint is not copied (it can be tens of GB): its processor is checked to load and its path recorded.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.name_or_path == "embedded":
        model, processor = build_embedded_model(cfg)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        n_params = sum(p.numel() for p in model.parameters())
        return {"source": "embedded", "parameters": n_params, "vocab_size": len(processor.tokenizer)}
    from arft_core.model.processor import load_processor, pixel_budget

    src = Path(cfg.name_or_path).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path: no config.json in {src} (expected a Qwen2.5-VL checkpoint folder)")
    processor = load_processor(src, cfg.min_pixels, cfg.max_pixels)
    (out_dir / REFERENCE_FILE).write_text(json.dumps({"name_or_path": str(src)}, indent=2))
    min_pixels, max_pixels = pixel_budget(processor)
    return {"source": str(src), "min_pixels": min_pixels, "max_pixels": max_pixels}


def resolve_model_dir(model_dir: Path) -> Path:
    """The folder holding the weights for a stage output (follows a real-checkpoint reference)."""
    ref = model_dir / REFERENCE_FILE
    return Path(json.loads(ref.read_text())["name_or_path"]) if ref.is_file() else model_dir


def load_model(model_dir: Path, dtype: str = "float32", min_pixels: int | None = None,
               max_pixels: int | None = None):
    """(model, processor) from a model stage output or a checkpoint folder; the pixel bounds given (model.min_pixels,
    max_pixels) replace the folder's processor's, whatever checkpoint it is."""
    import torch
    from transformers import AutoModelForImageTextToText

    from arft_core.model.processor import load_processor

    path = resolve_model_dir(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    return model, load_processor(path, min_pixels, max_pixels)
