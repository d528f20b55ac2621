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


def load_processor(path: str | Path) -> ImageOnlyQwenProcessor:
    """Load the processor saved next to a model (ours or a real Qwen2.5-VL checkpoint directory)."""
    return ImageOnlyQwenProcessor.from_pretrained(path)
