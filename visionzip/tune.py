"""Efficient tuning (the paper's "VisionZip‡"): train only the multimodal projector on VisionZip's
reduced tokens, so a model trained on all its visual tokens adapts to the shortage.

    python -m visionzip.tune --model llava-hf/llava-1.5-7b-hf --data llava_v1_5_mix665k.json \\
        --image-folder data/ --preset 64 --fraction 0.1 --dtype bf16 --output runs/llava-64

    tuned = load_projector(model, "runs/llava-64/projector.safetensors")
    with use_projector(model, tuned):      # this thread / asyncio task only
        model.generate(**inputs)           # every other caller keeps the base projector

The trainer only: the file format and the per-call use of a tuned projector live in
`visionzip.projector`, which is what an app imports at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .budget import Budget, preset_budget
from .core import Settings, VisionZip, apply
from .projector import load_projector, save_projector, use_projector  # noqa: F401 (visionzip.tune.* of old)

IGNORE_INDEX = -100  # label of tokens that carry no loss (transformers' CrossEntropy ignore_index)
DATA_IMAGE_MARKER = "<image>"  # where the LLaVA conversation format puts the image
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# -- the dataset ------------------------------------------------------------------------------------
class RecordError(ValueError):
    """A dataset record that cannot be trained on; `reason` is what the skip summary counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SkipLog:
    """Records skipped, by reason; each record id counts once however many epochs meet it."""

    ids: dict[str, set[str]] = field(default_factory=dict)

    def add(self, reason: str, record_id: str) -> None:
        self.ids.setdefault(reason, set()).add(record_id)

    def count(self, reason: str) -> int:
        return len(self.ids.get(reason, ()))

    @property
    def total(self) -> int:
        return len(set().union(*self.ids.values())) if self.ids else 0

    def __str__(self) -> str:
        if not self.ids:
            return "no records skipped"
        parts = []
        for reason, ids in sorted(self.ids.items()):
            examples = ", ".join(sorted(ids)[:3]) + (", ..." if len(ids) > 3 else "")
            parts.append(f"{len(ids)} {reason} ({examples})")
        return f"{self.total} records skipped: " + "; ".join(parts)


@dataclass
class Record:
    id: str
    image: Path
    messages: list[dict]  # chat-template messages, the image block in the first user message


@dataclass
class LlavaData:
    """The usable records of a LLaVA-format file, and what was skipped on reading it."""

    records: list[Record]
    skipped: SkipLog
    source: str


def read_dataset(
    path: str | Path, image_folder: str | Path | None = None, fraction: float = 1.0, seed: int = 0
) -> LlavaData:
    """Read a LLaVA conversation file (a JSON list of {"id", "image", "conversations"}), keep a
    `fraction` of it drawn by `seed`, and set aside records without a usable image or answer."""
    path = Path(path)
    image_folder = Path(image_folder) if image_folder is not None else path.parent
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    with open(path, encoding="utf-8") as file:
        raw = json.load(file)
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise ValueError(f"{path}: the dataset is empty (no records)")
    count = max(1, round(len(raw) * fraction))
    chosen = sorted(random.Random(seed).sample(range(len(raw)), count))

    records, skipped = [], SkipLog()
    for index in chosen:
        entry = raw[index]
        record_id = str(entry.get("id", f"#{index}")) if isinstance(entry, dict) else f"#{index}"
        try:
            records.append(_record(entry, record_id, image_folder))
        except RecordError as error:
            skipped.add(error.reason, record_id)
    if not records:
        raise ValueError(f"{path}: no usable records among the {count} sampled; {skipped}")
    return LlavaData(records, skipped, str(path))


def _record(entry: Any, record_id: str, image_folder: Path) -> Record:
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise RecordError("malformed record", "no 'conversations' list")
    if not entry.get("image"):
        # Text-only records (LLaVA mixes some in) give the projector no gradient.
        raise RecordError("no image")
    image = image_folder / str(entry["image"])
    if not image.is_file():
        raise RecordError("missing image", str(image))
    return Record(record_id, image, to_messages(entry["conversations"]))


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns -> chat-template messages with content blocks.  The one image goes first in the
    first user message, where LLaVA puts it whatever the data says."""
    messages, markers = [], 0
    for turn in conversations:
        role = SPEAKERS.get(turn.get("from")) if isinstance(turn, dict) else None
        text = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(text, str):
            raise RecordError("malformed conversation", f"bad turn {turn!r:.80}")
        markers += text.count(DATA_IMAGE_MARKER)
        text = text.replace(DATA_IMAGE_MARKER, "").strip()
        messages.append({"role": role, "content": [{"type": "text", "text": text}]})
    if markers > 1:
        raise RecordError("malformed conversation", f"{markers} {DATA_IMAGE_MARKER} markers for one image")
    chat = [message for message in messages if message["role"] != "system"]
    if not chat or chat[0]["role"] != "user" or not any(m["role"] == "assistant" for m in chat):
        raise RecordError("malformed conversation", "needs a human turn first and at least one gpt answer")
    chat[0]["content"].insert(0, {"type": "image"})
    return messages


# -- examples: prompt tokens masked, answer tokens labelled ------------------------------------------
@dataclass
class Example:
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) IGNORE_INDEX except on answer tokens
    pixel_values: torch.Tensor  # (tiles, 3, H, W) for LLaVA-NeXT, (3, H, W) for LLaVA-1.5
    image_sizes: torch.Tensor | None  # (2,) LLaVA-NeXT only


def chat_pieces(processor: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces: each answer piece is what the
    template writes after its generation prompt (the answer and its end-of-turn token)."""
    pieces, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:index], add_generation_prompt=True)
        full = processor.apply_chat_template(messages[: index + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise RecordError("missing image", str(path)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise RecordError("unreadable image", f"{path}: {error}") from None


def encode(handle: VisionZip, record: Record, max_length: int | None = None) -> Example:
    """One record as training tensors under the handle's current settings (they fix the number of
    image placeholders).  Each prompt piece is tokenized as the app tokenizes a prompt, so training
    sees the tokens inference sees; the answers follow as the tokens the model should generate."""
    processor = handle.processor
    pieces = chat_pieces(processor, record.messages)
    first = processor(images=[load_image(record.image)], text=pieces[0][0], return_tensors="pt")
    ids = [first["input_ids"][0]]
    labels = [torch.full_like(ids[0], IGNORE_INDEX)]
    for text, is_answer in pieces[1:]:
        piece = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids.append(piece)
        labels.append(piece if is_answer else torch.full_like(piece, IGNORE_INDEX))
    input_ids, label_ids = torch.cat(ids), torch.cat(labels)
    if max_length is not None and len(input_ids) > max_length:
        if len(ids[0]) > max_length:
            raise RecordError("too long", f"{len(ids[0])} prompt tokens > max_length={max_length}")
        input_ids, label_ids = input_ids[:max_length], label_ids[:max_length]
    if not (label_ids != IGNORE_INDEX).any():
        raise RecordError("too long", f"no answer token within max_length={max_length}")
    sizes = first.get("image_sizes")
    return Example(input_ids, label_ids, first["pixel_values"][0], sizes[0] if sizes is not None else None)


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs (LLaVA-NeXT tiles padded to the batch's largest grid)."""
    batch = {
        "input_ids": pad_sequence([e.input_ids for e in examples], batch_first=True, padding_value=pad_token_id),
        "labels": pad_sequence([e.labels for e in examples], batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad_sequence(
            [torch.ones_like(e.input_ids) for e in examples], batch_first=True, padding_value=0
        ),
        "pixel_values": pad_sequence([e.pixel_values for e in examples], batch_first=True),
    }
    if examples[0].image_sizes is not None:
        batch["image_sizes"] = torch.stack([e.image_sizes for e in examples])
    return batch


class _Examples(torch.utils.data.Dataset):
    """Records encoded on demand (in DataLoader workers when asked); a bad one comes back as a
    (reason, id) pair so its skip is counted in the main process."""

    def __init__(self, handle: VisionZip, settings: Settings, records: list[Record], max_length: int | None) -> None:
        self.handle, self.settings, self.records, self.max_length = handle, settings, records, max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example | tuple[str, str]:
        record = self.records[index]
        budget = self.settings.budget
        try:
            with self.handle.use(True, budget.dominant, budget.contextual, self.settings.merge):
                return encode(self.handle, record, self.max_length)
        except RecordError as error:
            return error.reason, record.id


def _as_list(items: list) -> list:
    return items  # batches are collated after skips are taken out


# -- training ---------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    lr: float = 2e-5
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_length: int | None = None  # default: the language model's context
    seed: int = 0
    workers: int = 0
    gradient_checkpointing: bool = False
    output: Path | None = None  # folder for projector.safetensors (and projector-step{N} checkpoints)
    save_every: int | None = None
    progress: bool = True


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # mean micro-batch loss of each optimizer step
    skipped: SkipLog
    tokens: int  # language-model tokens processed (visual and text)
    seconds: float
    path: Path | None  # the final projector file, if an output folder was given


def _pad_token_id(handle: VisionZip) -> int:
    tokenizer = handle.processor.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextlib.contextmanager
def _projector_training(model: nn.Module, projector: nn.Module, config: TrainConfig) -> Iterator[None]:
    """Only the projector trains inside the block, as fp32 master weights; afterwards every weight's
    dtype, requires_grad and the model's mode are as they were."""
    dtype = next(projector.parameters()).dtype
    was_training = model.training
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.requires_grad_(False)
    projector.float().requires_grad_(True)
    model.train()  # as LLaVA trains; LLaVA checkpoints have no dropout
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        projector.to(dtype)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)


def _batches(handle: VisionZip, settings: Settings, data: LlavaData, config: TrainConfig, skipped: SkipLog):
    """Collated batches of usable examples, epoch after epoch (records that fail are counted in `skipped`)."""
    max_length = config.max_length or handle.model.config.text_config.max_position_embeddings
    loader = torch.utils.data.DataLoader(
        _Examples(handle, settings, data.records, max_length),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
        collate_fn=_as_list,
        num_workers=config.workers,
    )
    pad_token_id = _pad_token_id(handle)
    for _epoch in itertools.count() if config.max_steps else range(config.epochs):
        used = 0
        for items in loader:
            examples = [item for item in items if isinstance(item, Example)]
            for item in items:
                if not isinstance(item, Example):
                    skipped.add(*item)
            if examples:
                used += 1
                yield collate(examples, pad_token_id)
        if used == 0:
            raise ValueError(f"{data.source}: no usable records; {skipped}")


def train(handle: VisionZip, data: LlavaData, config: TrainConfig) -> TrainResult:
    """Train the projector of `handle.model` in place on `data`, under the handle's current
    VisionZip settings (fixed for the run); every other weight stays frozen and untouched."""
    model, projector = handle.model, handle.base.multi_modal_projector
    if not hasattr(model, "lm_head"):
        raise TypeError("train needs the ...ForConditionalGeneration model (with lm_head) passed to apply()")
    settings = Settings(True, handle.settings.budget, handle.settings.merge)
    dtype, device = next(projector.parameters()).dtype, next(projector.parameters()).device
    if dtype == torch.float16:
        raise ValueError("train in bf16 or fp32: fp16 gradients need loss scaling, which this trainer omits")
    batches_per_epoch = math.ceil(len(data.records) / config.batch_size)
    total_steps = config.max_steps or config.epochs * math.ceil(batches_per_epoch / config.grad_accum)
    if total_steps < 1:
        raise ValueError(f"nothing to train: {config.epochs} epochs, max_steps={config.max_steps}")
    skipped = SkipLog(copy.deepcopy(data.skipped.ids))
    losses, pending, tokens, step = [], [], 0, 0
    output = Path(config.output) if config.output is not None else None
    bar = tqdm(total=total_steps, unit="step", disable=not config.progress)
    start = time.perf_counter()
    with _projector_training(model, projector, config), contextlib.closing(bar):
        # Frozen weights keep their dtype; the fp32 projector runs under autocast to the model's dtype.
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        optimizer = torch.optim.AdamW(projector.parameters(), lr=config.lr, weight_decay=0.0)
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
        for micro, batch in enumerate(_batches(handle, settings, data, config, skipped), start=1):
            inputs = {name: value.to(device) for name, value in batch.items()}
            with handle.use(True, settings.budget.dominant, settings.budget.contextual, settings.merge), autocast:
                loss = model(**inputs).loss
            (loss / config.grad_accum).backward()
            pending.append(loss.item())
            tokens += int(inputs["attention_mask"].sum())
            if micro % config.grad_accum == 0:
                step = _optimizer_step(projector, optimizer, scheduler, config, step, losses, pending)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
                if output is not None and config.save_every and step % config.save_every == 0 and step < total_steps:
                    save_projector(
                        model, output / f"projector-step{step}.safetensors", settings.budget, settings.merge, step
                    )
                if step >= total_steps:
                    break
        if pending and step < total_steps:  # a last, partial accumulation
            step = _optimizer_step(projector, optimizer, scheduler, config, step, losses, pending)
            bar.update(1)
        path = None
        if output is not None:  # before the projector goes back to a low-precision dtype
            path = save_projector(model, output / "projector.safetensors", settings.budget, settings.merge, step)
    return TrainResult(step, losses, skipped, tokens, time.perf_counter() - start, path)


def _optimizer_step(
    projector, optimizer, scheduler, config: TrainConfig, step: int, losses: list, pending: list
) -> int:
    torch.nn.utils.clip_grad_norm_(projector.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(sum(pending) / len(pending))
    pending.clear()
    return step + 1


# -- command line -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip.tune",
        description="Fine-tune only the multimodal projector of a LLaVA / LLaVA-NeXT model under VisionZip.",
    )
    parser.add_argument("--model", required=True, help="checkpoint id or folder (from_pretrained)")
    parser.add_argument("--data", required=True, help="LLaVA conversation JSON (list of records)")
    parser.add_argument("--image-folder", help="root of the records' image paths (default: the JSON's folder)")
    parser.add_argument("--output", required=True, help="folder for projector.safetensors and checkpoints")
    parser.add_argument("--preset", type=int, help="the paper's budget, e.g. 64 (LLaVA-1.5) or 320 (LLaVA-NeXT)")
    parser.add_argument("--dominant", type=int, help="dominant tokens per tile (CLS included)")
    parser.add_argument("--contextual", type=int, help="contextual tokens per tile")
    parser.add_argument("--merge", choices=["sum", "mean"], default="sum")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the data to sample (the paper: 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPUs with it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, help="truncate examples to this many tokens")
    parser.add_argument("--save-every", type=int, help="also save a checkpoint every N steps")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower (7B on 24 GB)")
    args = parser.parse_args(argv)
    if (args.preset is None) == (args.dominant is None or args.contextual is None):
        parser.error("give either --preset or both --dominant and --contextual")
    return args


def main(argv: list[str] | None = None) -> TrainResult:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:  # the data first: a bad file should fail before minutes of model loading
        data = read_dataset(args.data, args.image_folder, args.fraction, args.seed)
    except (OSError, ValueError) as error:
        raise SystemExit(f"visionzip.tune: error: {error}") from None
    bf16 = args.dtype == "bf16" or (
        args.dtype == "auto" and args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
    )
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.to(args.device)
    processor = AutoProcessor.from_pretrained(args.model)
    if args.preset is not None:
        budget = preset_budget(model.config.model_type, args.preset)
    else:
        budget = Budget(args.dominant, args.contextual)
    handle = apply(model, processor, budget.dominant, budget.contextual, merge=args.merge)
    print(f"{len(data.records)} records from {data.source}; {data.skipped}; VisionZip {budget} merge={args.merge}")
    config = TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        workers=args.workers,
        gradient_checkpointing=args.gradient_checkpointing,
        output=Path(args.output),
        save_every=args.save_every,
    )
    result = train(handle, data, config)
    print(
        f"{result.steps} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
        f"{result.tokens / result.seconds:.0f} tokens/s; {result.skipped}; saved {result.path}"
    )
    return result


if __name__ == "__main__":
    main()
