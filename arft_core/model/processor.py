"""A Qwen2.5-VL processor that needs no torchvision.

transformers' AutoProcessor always builds the torchvision-backed video processor for Qwen2.5-VL, which cannot be
imported on CPU machines (environment-notes.md). Images are all this project feeds, so the processor is built
with the PIL image processor and without a video processor.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Qwen2_5_VLProcessor, Qwen2TokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` with a PIL image processor and no video processor."""

    # transformers derives the sub-processors from this signature: leaving `video_processor` out drops it.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ImageOnlyQwenProcessor":
        tokenizer = Qwen2TokenizerFast.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def build_processor(tokenizer, min_pixels: int, max_pixels: int) -> ImageOnlyQwenProcessor:
    """Processor with Qwen2.5-VL's image settings (patch 14, merge 2) and the given pixel budget."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    return ImageOnlyQwenProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=tokenizer.chat_template)


def load_processor(path: str | Path, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> ImageOnlyQwenProcessor:
    """Load the processor saved next to a model (ours or a real Qwen2.5-VL checkpoint directory), with the given
    pixel budget instead of the folder's where one is given."""
    processor = ImageOnlyQwenProcessor.from_pretrained(path)
    set_pixel_budget(processor, min_pixels, max_pixels)
    return processor


def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set the image processor's pixel bounds (None keeps one): `size` (shortest_edge / longest_edge, in pixels) is
    what Qwen2-VL's image processor resizes by; older transformers also read min_pixels / max_pixels attributes."""
    from dataclasses import is_dataclass, replace

    ip = processor.image_processor
    updates = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v}
    ip.size = replace(ip.size, **updates) if is_dataclass(ip.size) else {**(ip.size or {}), **updates}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value and getattr(ip, name, None) is not None:
            setattr(ip, name, value)


def pixel_budget(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) the image processor resizes by."""
    size = processor.image_processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    return get("shortest_edge"), get("longest_edge")


VLLM_PROCESSOR_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                       "merge_size", "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")


def vllm_model_folder(model_dir: Path, dest: Path) -> Path:
    """`model_dir` as vLLM loads it: vLLM builds the stock `Qwen2_5_VLProcessor`, video processor included, so a
    folder saved with `ImageOnlyQwenProcessor` gets a stock `processor_config.json` and a
    `video_preprocessor_config.json` (the image settings). The files are linked into `dest`, the original folder
    stays as it is (its processor still loads without torchvision). A folder with the stock files is returned
    as is."""
    import json
    import os

    config = json.loads((model_dir / "processor_config.json").read_text()) \
        if (model_dir / "processor_config.json").is_file() else {}
    if config.get("processor_class") != ImageOnlyQwenProcessor.__name__:
        return model_dir
    dest.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "processor_config.json" and not (dest / f.name).exists():
            os.symlink(f.resolve(), dest / f.name)
    image = config["image_processor"]
    video = {k: image[k] for k in VLLM_PROCESSOR_KEYS if k in image}
    (dest / "processor_config.json").write_text(json.dumps({**config, "processor_class": "Qwen2_5_VLProcessor"},
                                                           indent=2))
    (dest / "video_preprocessor_config.json").write_text(json.dumps(
        {**video, "video_processor_type": "Qwen2VLVideoProcessor"}, indent=2))
    return dest
