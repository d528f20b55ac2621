from pathlib import Path

import pytest
import torch
from PIL import Image

from arft_core.config import ModelConfig
from arft_core.model.embedded import build_embedded_model, load_model, prepare_base_model, resolve_model_dir

SMALL = ModelConfig(embedded={"vocab_size": 1024})


def test_embedded_model_saves_and_reloads_with_auto_classes(tmp_path: Path):
    from transformers import AutoModelForImageTextToText

    summary = prepare_base_model(SMALL, tmp_path)
    assert summary["source"] == "embedded" and summary["vocab_size"] == 1024 + 22
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    model, processor = load_model(tmp_path)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (112, 112), "red")], return_tensors="pt")
    # 112x112 -> 8x8 patches of 14 -> merged 2x2 -> 16 image tokens in the prompt.
    assert (inputs["input_ids"] == processor.image_token_id).sum().item() == 16
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5 or processor.tokenizer.eos_token_id in out[0].tolist()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_same_seed_same_weights():
    a, _ = build_embedded_model(SMALL)
    b, _ = build_embedded_model(SMALL)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_bad_mrope_sections_are_explained():
    cfg = ModelConfig(embedded={"vocab_size": 1024, "mrope_section": [2, 2, 2]})
    with pytest.raises(ValueError, match="mrope_section must sum to head_dim/2 = 16"):
        build_embedded_model(cfg)


def test_real_checkpoint_is_referenced_not_copied(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    prepare_base_model(SMALL, ckpt)  # stands in for a downloaded Qwen2.5-VL folder
    out = tmp_path / "base"
    summary = prepare_base_model(ModelConfig(name_or_path=str(ckpt)), out)
    assert summary["source"] == str(ckpt.resolve())
    assert not (out / "model.safetensors").exists() and resolve_model_dir(out) == ckpt.resolve()
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        prepare_base_model(ModelConfig(name_or_path=str(tmp_path / "nope")), tmp_path / "x")


def test_vllm_view_of_an_embedded_model_adds_the_stock_processor_files_and_leaves_the_folder_alone(tmp_path: Path):
    """vLLM builds the stock Qwen2_5_VLProcessor (video processor included): the embedded model's folder is shown
    to it through linked files plus a stock processor config and a video processor config (issue 18; checked
    against vLLM 0.31 in .vllm-venv: 16 of 16 MAT-Coding items equal to the HF back-end in float32)."""
    import json

    from arft_core.model.processor import load_processor, vllm_model_folder

    prepare_base_model(SMALL, tmp_path / "m")
    before = (tmp_path / "m" / "processor_config.json").read_text()
    view = vllm_model_folder(tmp_path / "m", tmp_path / "v")
    assert view == tmp_path / "v"
    assert json.loads((view / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    video = json.loads((view / "video_preprocessor_config.json").read_text())
    image = json.loads(before)["image_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert (video["patch_size"], video["merge_size"], video["size"]) == (14, 2, image["size"])
    assert (view / "model.safetensors").resolve() == (tmp_path / "m" / "model.safetensors").resolve()
    assert (tmp_path / "m" / "processor_config.json").read_text() == before  # the original is untouched
    assert not (tmp_path / "m" / "video_preprocessor_config.json").exists()
    load_processor(tmp_path / "m")  # still loads without torchvision
    # A folder that already has the stock processor (a real checkpoint, or the view itself) is used as is.
    assert vllm_model_folder(view, tmp_path / "w") == view and not (tmp_path / "w").exists()


def test_rollout_engine_without_vllm_is_hf_under_auto_and_a_clear_error_when_asked_for(tmp_path: Path):
    from arft_core.agent.engine import use_vllm
    from arft_core.config import RolloutConfig

    prepare_base_model(SMALL, tmp_path / "base")
    assert not use_vllm(RolloutConfig(), tmp_path / "base")  # the main environment has no vLLM
    with pytest.raises(RuntimeError, match=r"rollout.engine is vllm, but vLLM is not installed .*make vllm-env"):
        use_vllm(RolloutConfig(engine="vllm"), tmp_path / "base")
