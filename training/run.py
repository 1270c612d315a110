"""``squint train MODE``: LLaVA-1.5's training stages on ``transformers``' ``Trainer``.

Modes, in the order a new model takes them:

- ``clip``: contrastive pre-training of the pack's ``CLIPModel`` (image and text towers) on
  captions, CLIP's symmetric InfoNCE loss. Only a synthetic world needs it (no pre-trained CLIP
  knows it); it also gives ``text_recovery`` a text tower whose question embeddings mean something.
  The trained vision tower is copied into the LLaVA checkpoint too (LLaVA-1.5 freezes CLIP: its
  vision tower is CLIP's, weight for weight).
- ``dense``: the vision tower learns what each patch shows, from segment maps
  (:mod:`training.patches`); a world's stand-in for a pre-trained CLIP's patches. Copied into the
  LLaVA checkpoint as ``clip`` is.
- ``pretrain`` (LLaVA-1.5 stage 1): the projector alone learns; CLIP and the LLM are frozen.
- ``align``: the projector alone, regressed onto the LLM's embeddings of each patch's words
  (:mod:`training.patches`); a world's stand-in for stage 1 with a pre-trained LLM.
- ``finetune`` (stage 2): the projector and the LLM learn; CLIP is frozen. On text-only
  conversations (no pictures) it is a text stage: the LLM alone learns.

Every mode reads a pack and writes a pack (``--out``, by default the input pack in place):
ordinary Hugging Face checkpoints (``clip/``, ``llava/`` and the ``language_model/`` folder vLLM
loads, re-exported), and a new manifest whose id is the content hash (so no cache serves the old
weights' encodings). ``Trainer`` checkpoints go to ``OUT/train/MODE/checkpoint-N`` (``--resume``
continues from the last one) and ``OUT/train/MODE/summary.json`` records the run (``--run-name``
names the folder instead, for a recipe with two runs of one mode). ``accelerate``
gives multi-GPU, bf16 and DeepSpeed through ``TrainingArguments`` without code here.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from orchestrator.settings import OrchestratorSettings
from orchestrator.video import FrameSampling, VideoLimits
from training.compression import (
    DFMR_MODES,
    Compression,
    DFMRTraining,
    LlavoltaTraining,
    STFTraining,
    check_layers,
    parse_llavolta,
)
from training.data import IGNORE, Conversation, TrainingDataError, encode, read_conversations
from training.features import FeatureLlava, VideoFrames, video_frames, vision_features
from training.patches import (
    DenseTower,
    PatchWordsCollator,
    PatchWordsDataset,
    ProjectorAlignment,
    read_segments,
    unexplained_variance,
    word_embeddings,
)

MODES = ("clip", "dense", "pretrain", "align", "finetune")
# LLaVA-1.5's learning rates (stage 1: 1e-3, stage 2: 2e-5); the towers' and align's are what
# trained the world pack (docs/training.md).
DEFAULT_LEARNING_RATES = {"clip": 5e-4, "dense": 5e-4, "pretrain": 1e-3, "align": 1e-3, "finetune": 2e-5}
# The modes that read conversations (the others read captions or segments) and may compress.
LLAVA_MODES = ("pretrain", "finetune")


@dataclass(frozen=True)
class TrainSettings:
    """One ``squint train`` run."""

    mode: str
    pack: Path
    data: Path
    out: Path | None = None  # the pack written; None: the input pack, in place
    run_name: str = ""  # the run's folder under OUT/train (default: the mode)
    image_folder: Path | None = None
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation: int = 1
    learning_rate: float | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 500
    save_total_limit: int = 2
    resume: bool = False
    limit: int | None = None
    logging_steps: int = 10
    device: str = "cpu"
    deepspeed: str | None = None
    # LLaVA-Zip's training variants (pretrain and finetune): "random" or "dynamic" DFMR pooling.
    dfmr: str = ""
    # LLaVolta's staged training (pretrain and finetune): "K:S:SHARE,...,none:SHARE".
    llavolta: str = ""
    # LLaVA-STF (pretrain and finetune): its fusion module in place of the projector, written to the pack's stf folder.
    stf: bool = False
    # Videos, as the orchestrator serves them (its settings' defaults): frames sampled evenly, each
    # after its time in the prompt, frames that repeat the one before by their pixels skipped.
    video_frames: int = FrameSampling().frames
    frame_times: bool = OrchestratorSettings().frame_timestamps
    pixel_dedup_threshold: float = OrchestratorSettings().pixel_dedup_threshold

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.dfmr and (self.mode not in LLAVA_MODES or self.dfmr not in DFMR_MODES):
            raise ValueError(f"--dfmr takes {' or '.join(DFMR_MODES)} and applies to pretrain and finetune")
        if self.llavolta:
            if self.mode not in LLAVA_MODES or self.dfmr:
                raise ValueError("--llavolta applies to pretrain and finetune, without --dfmr")
            parse_llavolta(self.llavolta)
        if self.stf and (self.mode not in LLAVA_MODES or self.dfmr or self.llavolta):
            raise ValueError("--stf applies to pretrain and finetune, without --dfmr or --llavolta")
        limit = VideoLimits().max_frames
        if not 1 <= self.video_frames <= limit:
            raise ValueError(f"video_frames is {self.video_frames}; it must be 1 to {limit} (the orchestrator's limit)")
        if self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ValueError("batch_size and gradient_accumulation must be >= 1")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.mode]


# --------------------------------------------------------------------------- data


class CaptionDataset(torch.utils.data.Dataset):
    """(picture, caption) pairs: each conversation's picture and its first answer."""

    def __init__(self, conversations: list[Conversation]) -> None:
        self.items = [(c.image, c.turns[0][1]) for c in conversations if c.image is not None]
        if not self.items:
            raise ValueError("clip training needs conversations with pictures")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, caption = self.items[index]
        return {"image": Image.open(image).convert("RGB"), "caption": caption}


class CaptionCollator:
    def __init__(self, processor, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length
        self.tokens = 0

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = self.processor(
            text=[b["caption"] for b in batch],
            images=[b["image"] for b in batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        )
        self.tokens += int(inputs["attention_mask"].sum())
        return {**inputs, "return_loss": True}


class ConversationDataset(torch.utils.data.Dataset):
    """Encoded conversations: ids and labels with LLaVA's answer-only mask, and the picture's
    visual rows (its tower features, compressed when training with compression)."""

    def __init__(
        self,
        conversations: list[Conversation],
        prompts,
        features: torch.Tensor,
        pictures: list[Path],
        compression: Compression | None = None,
        visual_tokens: int | None = None,
        videos: dict[Path, VideoFrames] | None = None,
        frame_times: bool = True,
    ) -> None:
        self.conversations = conversations
        self.prompts = prompts
        self.features = features
        # Each picture's feature row; each video's, one per sampled frame (None: a repeat, no tokens),
        # the videos' analysed frames after the pictures, in order.
        self.rows: dict[Path, list[int | None]] = {picture: [row] for row, picture in enumerate(pictures)}
        self.seconds: dict[Path, tuple[float, ...]] = {}
        row = len(pictures)
        for video, frames in (videos or {}).items():
            self.rows[video] = []
            for analysed in frames.analysed:
                self.rows[video].append(row if analysed else None)
                row += analysed
            self.seconds[video] = frames.seconds
        self.compression = compression
        # The placeholders a picture gets when the model makes its tokens from the rows (STF); None: one per row.
        self.visual_tokens = visual_tokens
        self.frame_times = frame_times

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.conversations[index]
        media = conversation.image or conversation.video
        pictures, tokens = [], []  # each picture's or frame's visual rows, and its placeholders
        for row in self.rows[media] if media is not None else []:
            if row is None:
                tokens.append(0)
                continue
            visual = self.features[row]
            visual = self.compression(visual) if self.compression is not None else visual
            pictures.append(visual)
            tokens.append(self.visual_tokens or visual.shape[0])
        if conversation.video is not None:
            seconds = self.seconds[conversation.video]
            ids, labels = encode(conversation, self.prompts, tokens, seconds, self.frame_times)
        else:
            ids, labels = encode(conversation, self.prompts, sum(tokens))
        visual = torch.cat(pictures) if pictures else None
        return {"input_ids": ids, "labels": labels, "visual": visual, "visual_tokens": sum(tokens)}


def check_video_fits(
    conversation: Conversation, prompts, frames: VideoFrames, per_frame: int, frame_times: bool
) -> None:
    """Refuse a video conversation whose frames (``per_frame`` tokens each, uncompressed) and text
    overflow the LLM's context, naming the entry and the fix."""
    from squint.errors import BudgetExceeded

    tokens = [per_frame if analysed else 0 for analysed in frames.analysed]
    try:
        encode(conversation, prompts, tokens, frames.seconds, frame_times)
    except BudgetExceeded:
        raise TrainingDataError(
            f"{conversation.id}: {len(tokens)} frames of {per_frame} visual tokens and the conversation's text "
            f"exceed the model's context of {prompts.context_length} tokens; sample fewer (--video-frames) or "
            "shorten the conversation"
        ) from None


class ConversationCollator:
    """Right-pads ids (the pad id) and labels (ignored); the pictures' visual rows, concatenated in batch order."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.tokens = 0
        self.samples = 0
        self.visual_tokens = 0

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        self.tokens += int(mask.sum())
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        visual = [b["visual"] for b in batch if b["visual"] is not None]
        self.samples += len(batch)
        self.visual_tokens += sum(b["visual_tokens"] for b in batch)
        if visual:
            out["image_rows"] = torch.cat(visual)
        return out


# --------------------------------------------------------------------------- models


def freeze_for(model, mode: str) -> None:
    """LLaVA-1.5's stages: the projector alone (pretrain), the projector and the LLM (finetune)."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if mode == "finetune":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class StepClock(TrainerCallback):
    """The optimizer step running now (0-based), for LLaVolta's stage: counted in optimizer
    steps, so gradient accumulation does not move the pivots (docs/methods.md §2.8, pitfall 12)."""

    step = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


class ProgressCallback(TrainerCallback):
    """A progress bar with the loss and tokens/s, and the losses logged."""

    def __init__(self, progress, collator) -> None:
        self.progress = progress
        self.collator = collator
        self.losses: list[tuple[int, float]] = []
        self.started = time.perf_counter()
        self.loss = math.nan

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self.losses.append((state.global_step, self.loss))

    def on_step_end(self, args, state, control, **kwargs):
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.progress.step(f"loss {self.loss:.4f}  {self.collator.tokens / seconds:,.0f} tokens/s")


# --------------------------------------------------------------------------- the run


@contextmanager
def _removed_on_refusal(out: Path, created: bool) -> Iterator[None]:
    """A refusal before the first step (a ``ValueError`` naming what to change) leaves no
    half-made pack behind: ``out`` is removed when this run created it."""
    try:
        yield
    except ValueError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _copy_pack(source: Path, out: Path) -> None:
    if out.resolve() == source.resolve():
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; give a new folder or the input pack itself")
    shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("train"))


def _rewrite_manifest(out: Path, settings: TrainSettings) -> Any:
    from squint.packs import MANIFEST_NAME, update_manifest

    created_by = json.loads((out / MANIFEST_NAME).read_text()).get("created_by", "")
    return update_manifest(out, created_by=f"{created_by}; squint train {settings.mode}".strip("; "))


def train(settings: TrainSettings, progress_stream=None) -> dict[str, Any]:
    """Run one stage; returns the summary written beside its checkpoints."""
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.utils import logging as transformers_logging

    from bench.progress import Progress
    from squint.packs import load_pack

    transformers_logging.disable_progress_bar()
    source = load_pack(settings.pack)
    stages = parse_llavolta(settings.llavolta) if settings.llavolta else ()
    if stages:  # before anything is written
        from transformers import AutoConfig

        check_layers(stages, AutoConfig.from_pretrained(source.llava_dir).text_config.num_hidden_layers)
    # The data is read (and refused) before anything is written.
    if settings.mode in ("dense", "align"):
        segmented = read_segments(settings.data, settings.image_folder, settings.limit)
        conversations = []
    else:
        conversations = read_conversations(settings.data, settings.image_folder, settings.limit)
    pictured = any(c.image is not None or c.video is not None for c in conversations)
    if not pictured and (settings.dfmr or settings.llavolta or settings.stf):
        raise TrainingDataError(f"{settings.data}: no pictures to compress; --dfmr, --llavolta and --stf need them")
    out = (settings.out or settings.pack).resolve()
    created = out != source.root.resolve() and not out.exists()
    _copy_pack(source.root, out)
    pack = load_pack(out)
    run_dir = out / "train" / (settings.run_name or settings.mode)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(settings.seed)

    if settings.mode == "clip":
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(pack.clip_dir)
        processor = CLIPProcessor.from_pretrained(pack.clip_dir)
        dataset = CaptionDataset(conversations)
        collator = CaptionCollator(processor, model.config.text_config.max_position_embeddings)
    elif settings.mode == "dense":
        from transformers import CLIPImageProcessor, CLIPModel, LlavaConfig

        clip = CLIPModel.from_pretrained(pack.clip_dir)
        image_processor = CLIPImageProcessor.from_pretrained(pack.clip_dir)
        vision = clip.config.vision_config
        dataset = PatchWordsDataset(segmented, vision.image_size // vision.patch_size, vision.image_size)
        feature_layer = LlavaConfig.from_pretrained(pack.llava_dir).vision_feature_layer
        model = DenseTower(clip.vision_model, feature_layer, dataset.positive_weights())
        collator = PatchWordsCollator(image_processor)
    elif settings.mode == "align":
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from orchestrator.prompting import PromptBuilder

        llava = LlavaForConditionalGeneration.from_pretrained(pack.llava_dir, dtype=torch.float32)
        llava.requires_grad_(False)
        image_processor = PromptBuilder(pack).processor.image_processor
        features = vision_features(llava, image_processor, [p.image for p in segmented])
        side = int(math.isqrt(features.shape[1]))
        vision = llava.config.vision_config
        dataset = PatchWordsDataset(segmented, side, vision.image_size, features)
        tokenizer = AutoTokenizer.from_pretrained(pack.llava_dir)
        targets = word_embeddings(dataset.words, tokenizer, llava.get_input_embeddings())
        model = ProjectorAlignment(llava.model.multi_modal_projector.requires_grad_(True), targets)
        collator = PatchWordsCollator()
    else:
        from transformers import LlavaForConditionalGeneration

        from orchestrator.prompting import PromptBuilder

        llava = LlavaForConditionalGeneration.from_pretrained(pack.llava_dir, dtype=torch.float32)
        freeze_for(llava, settings.mode)
        prompts = PromptBuilder(pack)
        pictures = sorted({c.image for c in conversations if c.image is not None})
        vision = llava.config.vision_config
        with _removed_on_refusal(out, created):
            stf = STFTraining(pack, vision.num_hidden_layers) if settings.stf else None
        select = stf.features if stf is not None else None
        image_processor = prompts.processor.image_processor
        grid = vision.image_size // vision.patch_size
        per_frame = stf.tokens((grid, grid)) if stf is not None else grid * grid
        # Videos first: one that cannot fit is refused before any picture's tower forward. Each
        # video's decoded frames are let go once its features are computed.
        features, videos, about = [], {}, {}
        for conversation in conversations:
            if conversation.video is not None:
                about.setdefault(conversation.video, []).append(conversation)
        for video in sorted(about):
            frames = video_frames(video, settings.video_frames, settings.pixel_dedup_threshold)
            with _removed_on_refusal(out, created):
                for conversation in about[video]:
                    check_video_fits(conversation, prompts, frames, per_frame, settings.frame_times)
            features.append(vision_features(llava, image_processor, frames.images, select=select))
            videos[video] = replace(frames, images=())
        if pictures:  # the dataset's rows: the pictures first, then each video's analysed frames
            features.insert(0, vision_features(llava, image_processor, pictures, select=select))
        features = torch.cat(features) if features else torch.empty(0, 0, 0)
        compression = None
        if settings.dfmr:
            compression = DFMRTraining(settings.dfmr, pack, (grid, grid), settings.seed)
        if stf is not None:
            llava.model.multi_modal_projector.requires_grad_(False)  # STF replaces it
        visual_tokens = per_frame if stf is not None else None
        dataset = ConversationDataset(
            conversations, prompts, features, pictures, compression, visual_tokens, videos, settings.frame_times
        )
        pad = prompts.tokenizer.pad_token_id
        collator = ConversationCollator(pad if pad is not None else 0)

    steps_per_epoch = math.ceil(len(dataset) / (settings.batch_size * settings.gradient_accumulation))
    total_steps = settings.max_steps if settings.max_steps > 0 else math.ceil(steps_per_epoch * settings.epochs)
    clock = StepClock()
    llavolta = None
    if settings.mode in LLAVA_MODES:
        if stages:
            llavolta = LlavoltaTraining(stages, total_steps, llava.config.text_config.num_hidden_layers, pack)
        model = FeatureLlava(llava, llavolta, clock, stf.model if stf is not None else None, grid)
    progress = Progress(total_steps, stream=progress_stream)
    callback = ProgressCallback(progress, collator)
    arguments = TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.lr,
        warmup_steps=settings.warmup_ratio,  # below 1: a share of the steps
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=settings.logging_steps,
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        seed=settings.seed,
        bf16=settings.bf16,
        gradient_checkpointing=settings.gradient_checkpointing,
        use_cpu=settings.device == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Equal batches: the contrastive loss of a short last batch is not comparable (fewer negatives).
        dataloader_drop_last=settings.mode == "clip",
        report_to=[],
        disable_tqdm=True,
        deepspeed=settings.deepspeed,
    )
    trainer = Trainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collator, callbacks=[clock, callback]
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar shows the loss; no dict per log line
    started = time.perf_counter()
    last = None
    if settings.resume:
        checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        last = str(checkpoints[-1]) if checkpoints else None
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - started
    progress.close()

    trainable = trainable_parameters(trainer.model)
    extra: dict[str, Any] = {}  # what one mode alone reports
    if settings.mode in ("clip", "dense"):
        if settings.mode == "dense":
            model = clip  # its vision_model is the one DenseTower trained
        model.save_pretrained(pack.clip_dir)
        from transformers import LlavaForConditionalGeneration

        llava = LlavaForConditionalGeneration.from_pretrained(pack.llava_dir, dtype=torch.float32)
        llava.model.vision_tower.load_state_dict(model.vision_model.state_dict())
        llava.save_pretrained(pack.llava_dir)
    elif settings.mode == "align":
        llava.save_pretrained(pack.llava_dir)  # the projector trained in place; the LLM unchanged
        extra["unexplained_variance"] = round(unexplained_variance(model.projector, dataset, targets), 4)
    else:
        model = trainer.model.llava
        model.save_pretrained(pack.llava_dir)
        if stf is not None:
            stf.save()
        if pack.language_model_dir is not None:
            from llm_worker.language_model import export_language_model

            export_language_model(pack.llava_dir, pack.language_model_dir)
    written = _rewrite_manifest(out, settings)
    summary = {
        "mode": settings.mode,
        "pack": str(settings.pack),
        "out": str(out),
        "pack_id": written.id,
        "data": str(settings.data),
        "examples": len(dataset),
        "steps": int(result.global_step),
        "seconds": round(seconds, 1),
        "tokens": collator.tokens,
        "tokens_per_second": round(collator.tokens / max(seconds, 1e-9), 1),
        "visual_tokens_per_sample": (
            round(collator.visual_tokens / max(collator.samples, 1), 1) if settings.mode in LLAVA_MODES else None
        ),
        "first_loss": callback.losses[0][1] if callback.losses else None,
        "final_loss": callback.losses[-1][1] if callback.losses else float(result.training_loss),
        "mean_loss": float(result.training_loss),
        "losses": callback.losses,
        "trainable_parameters": trainable,
        "llavolta": (
            [{"stage": str(s), "until_step": p} for s, p in zip(llavolta.stages, llavolta.pivots, strict=True)]
            if llavolta is not None
            else None
        ),
        **extra,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
