"""A checkpoint folder laid out as the Hugging Face release of Qwen2.5-VL-3B-Instruct (its real widths, heads, RoPE,
vision tower, processor and generation config, random bf16 weights) goes through the real model, data, train and
evaluate stages in bf16: params' pixel budget replaces the release's processor bounds, and `eval.decoding:
checkpoint` generates with the release's generation_config.json.

Cut to stay near a minute on 2 CPU cores: depth (2 text layers, 2 vision blocks), MLP sizes, and the vocabulary (the
embedded tokenizer's first 4,096 merges; the release's 151,936-row embedding alone made a GRPO step take 80 s), so
the special-token ids in generation_config.json are this tokenizer's; its sampling values are the release's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import copy_project

pytestmark = pytest.mark.slow

# Qwen2.5-VL-3B-Instruct's generation_config.json and preprocessor_config.json, as released.
# (Release ids: bos 151643, eos [151645, 151643], pad 151643; here the cut tokenizer's.)
GENERATION_CONFIG = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
                     "transformers_version": "4.49.0"}
VOCAB = 4096
PREPROCESSOR_CONFIG = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                       "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711],
                       "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
# Params' pixel budget: neither the release's nor the paper's, so that only params can have put it there.
MIN_PIXELS, MAX_PIXELS = 6272, 200704


def release_like_checkpoint(folder: Path) -> Path:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from arft_core.model.tokenizer import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer(VOCAB)
    tid = tokenizer.convert_tokens_to_ids
    special = dict(bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"))
    ids = dict(bos_token_id=special["bos_token_id"], pad_token_id=special["bos_token_id"],
               eos_token_id=[special["eos_token_id"], special["bos_token_id"]])
    config = Qwen2_5_VLConfig(
        # vocab padded to a multiple of 128, as the release's 151,936 rows for 151,665 tokens
        text_config=dict(vocab_size=-(-len(tokenizer) // 128) * 128, hidden_size=2048, intermediate_size=1408,
                         num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}, **special),
        vision_config=dict(depth=2, hidden_size=1280, intermediate_size=512, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], in_chans=3, hidden_act="silu", tokens_per_second=2),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True, **special)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generation = {**ids, **GENERATION_CONFIG}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    return folder


def test_release_layout_checkpoint_trains_and_evaluates_with_params_pixels_and_its_generation_config(tmp_path,
                                                                                                 monkeypatch):
    import mlflow

    # The stages run in this process and export MLFLOW_TRACKING_URI (mlflow.set_tracking_uri does): recorded
    # here so that teardown restores it, and later tests' subprocesses do not write into this project's store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    from arft_core.config import load_config
    from arft_core.model.processor import load_processor, pixel_budget
    from arft_core.stages import run_stage

    checkpoint = release_like_checkpoint(tmp_path / "Qwen2.5-VL-3B-Instruct")
    project = copy_project(tmp_path / "project", {
        "model": {"name_or_path": str(checkpoint), "dtype": "bfloat16", "min_pixels": MIN_PIXELS,
                  "max_pixels": MAX_PIXELS},
        "data": {"n_train": 2, "n_test": 2, "sources": {"synthetic": 0.0, "easy_vqa": 1.0},
                 "hard": [["rotation90", "dark"]]},
        "train": {"max_steps": 1, "num_generations": 2, "max_completion_length": 4, "reward_variant": "paper",
                  "sft": {"enabled": False}},
        "eval": {"benchmarks": ["mat-coding"], "modes": ["direct"], "max_new_tokens": 3, "decoding": "checkpoint"},
        "tracking": {"promotion_metrics": ["eval.mat-coding.direct.avg.f1"]},
    })
    cfg = load_config(project / "params.yaml")
    summaries = {stage: run_stage(stage, cfg) for stage in ("model", "data", "train", "evaluate")}

    assert summaries["model"]["max_pixels"] == MAX_PIXELS and summaries["train"]["steps"] == 1
    assert pixel_budget(load_processor(project / "models" / "trained")) == (MIN_PIXELS, MAX_PIXELS)  # training's
    assert json.loads((project / "models" / "trained" / "config.json").read_text())["dtype"] == "bfloat16"
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri())
    run = next(r for r in client.search_runs([client.get_experiment_by_name("arft").experiment_id])
               if r.data.tags["arft.stage"] == "evaluate")
    used = {k.removeprefix("generation."): v for k, v in run.data.params.items() if k.startswith("generation.")}
    # the release's near-greedy sampling, as the authors' HF generate with no sampling arguments
    assert {k: used[k] for k in ("source", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")} == {
        "source": "checkpoint", "do_sample": "True", "temperature": "0.1", "top_p": "0.001", "top_k": "1",
        "repetition_penalty": "1.05"}
    assert (used["min_pixels"], used["max_pixels"], used["max_new_tokens.mat-coding"]) == (
        str(MIN_PIXELS), str(MAX_PIXELS), "3")
    scores = json.loads((project / "reports" / "eval.json").read_text())
    assert scores["mat-coding"]["direct"]["avg"]["n"] == 2
