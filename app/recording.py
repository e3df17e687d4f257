"""Recorded runs: a whole conversation in one JSON file (format "visionzip-live-recording", version 1)
that replays on any machine with no model, no GPU and no network.  No Gradio here: a headless script
(`python -m bench.conversation --record PATH`, the GPU check) writes one with `save`.

The file (UTF-8 JSON, at most MAX_FILE_BYTES):

    format        "visionzip-live-recording"
    version       1
    created       ISO 8601 UTC time of writing
    media         {kind: "image"|"video", name: file name, base64: the file's bytes}
    sides         {left|right: {model: label, mode: {name, enabled, dominant, contextual, tuned, method,
                   tokens, seed, family (optional)}}}   (app.modes.Mode's fields; method is a visionzip.METHODS name)
    settings      {num_frames, same_budget, quality_check, keep_cache}
    turns         [{question,
                    measured_on: {hardware, timing, where, tiny: {left|right: bool},
                                  random_weights: {left|right: bool}},
                    frames: {side: int}, chosen_for: {side: str},
                    sides: {left|right: {answer: str,
                                         tokens: [[ms since that side's start, text], ...] (one per new token;
                                                 the texts join to the answer; the first ms is the TTFT),
                                         stats: app.stats.TurnStats as a dict, or null,
                                         kept: [ImageSelection, ...] or null,
                                         chosen_by: {model, mode} that chose `kept`, or null; optional (files
                                                    written before it: the turn's stats name what ran)}}}]
    ImageSelection  {image_size: [H, W] or null (Qwen2.5-VL: the cells cover the picture as drawn),
                     grid: [rows, cols], num_tokens, method, budget,
                     tiles: [{side, rows (optional: a rows x side merged grid, else side x side), kept, targets,
                              merged, merged_into: [int], cls_attention: [float] | null}]}

Reading validates all of it; anything damaged, foreign or too large raises RecordingError with a plain
message (never a path) and nothing is written but the media file the returned conversation names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import MISSING, asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import visionzip
from app.conversation import SIDES, Conversation, SideConfig, Turn
from app.media import MediaError, detect_media_kind, load_image
from app.modes import Mode
from app.stats import TurnStats
from visionzip import ImageSelection, TileSelection
from visionzip.merged_grid import GridTile

FORMAT = "visionzip-live-recording"
VERSION = 1
MAX_FILE_BYTES = 24 * 2**20  # a recording with a short clip embedded; anything larger is refused unread
MAX_MEDIA_BYTES = 16 * 2**20
MAX_TURNS = 64
MAX_TOKENS = 8192  # new tokens per side and turn
MAX_TEXT = 100_000  # characters in one question, answer or label
MAX_SELECTIONS = 256  # images or frames one side's choice covers
MAX_TILES = 64  # tiles in one image
MEDIA_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".mp4",
    ".webm",
    ".mov",
    ".avi",
    ".mkv",
}


class RecordingError(ValueError):
    """A file that is not a readable recording of this version; the message names what is wrong."""


# -- writing -------------------------------------------------------------------------------------
def measured_on(
    hardware: str, timing: str, where: str, tiny: dict[str, bool], random_weights: dict[str, bool] | None = None
) -> dict:
    """Where a turn was measured: the machine, the clock, a free note (e.g. "GPU check"), and per side
    whether its model was the tiny random-weight one and whether it had random weights at all (a model
    of real shape built at random, as the GPU check's: answers noise, timings real); default: the tiny ones."""
    random_weights = tiny if random_weights is None else random_weights
    return {
        "hardware": hardware,
        "timing": timing,
        "where": where,
        "tiny": {side: bool(tiny[side]) for side in SIDES},
        "random_weights": {side: bool(tiny[side] or random_weights[side]) for side in SIDES},
    }


def weights_note(where: dict | None) -> str:
    """The warning a replay shows when a side's answers came from random weights."""
    if not where:
        return ""
    if any(where["tiny"].values()):
        return "⚠️ **Tiny model with random weights**: answers are noise."
    if any(where["random_weights"].values()):
        return "⚠️ **Random weights** (a model of real shape): answers are noise."
    return ""


def to_document(conversation: Conversation, default_measured_on: dict) -> dict:
    """The recording of `conversation` as plain JSON data; turns that carry no `measured_on` (live
    turns) get `default_measured_on`."""
    if conversation.media_path is None:
        raise RecordingError("Nothing to record: the conversation has no image or video.")
    if Path(conversation.media_path).stat().st_size > MAX_MEDIA_BYTES:
        raise RecordingError(f"The media is over {MAX_MEDIA_BYTES // 2**20} MiB: too large to record.")
    data = Path(conversation.media_path).read_bytes()
    name = Path(conversation.media_path).name
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "media": {"kind": conversation.media_kind, "name": name, "base64": base64.b64encode(data).decode("ascii")},
        "sides": {side: _side_document(conversation.sides[side]) for side in SIDES},
        "settings": {
            "num_frames": conversation.num_frames,
            "same_budget": conversation.same_budget,
            "quality_check": conversation.quality_check,
            "keep_cache": conversation.keep_cache,
        },
        "turns": [_turn_document(turn, turn.measured_on or default_measured_on) for turn in conversation.turns],
    }


def save(conversation: Conversation, path: str | Path, default_measured_on: dict) -> Path:
    """Write the recording of `conversation` to `path` (see to_document)."""
    path = Path(path)
    text = json.dumps(to_document(conversation, default_measured_on), separators=(",", ":"), allow_nan=False)
    if len(text) > MAX_FILE_BYTES:
        raise RecordingError(
            f"The recording would take {len(text) / 2**20:.1f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit."
        )
    path.write_text(text, encoding="utf-8")
    return path


def _side_document(config: SideConfig) -> dict:
    return {"model": config.model, "mode": asdict(config.mode)}


def _turn_document(turn: Turn, where: dict) -> dict:
    sides = {}
    for side in SIDES:
        stats = turn.stats.get(side)
        selections = turn.selections.get(side)
        sides[side] = {
            "answer": turn.answers.get(side, ""),
            "tokens": [[round(ms, 3), text] for ms, text in turn.tokens.get(side, [])],
            "stats": asdict(stats) if stats is not None else None,
            "kept": [_selection_document(s) for s in selections] if selections else None,
            "chosen_by": _side_document(turn.chosen_by[side]) if side in turn.chosen_by else None,
        }
    return {
        "question": turn.question,
        "measured_on": where,
        "frames": dict(turn.frames),
        "chosen_for": dict(turn.chosen_for),
        "sides": sides,
    }


def _selection_document(selection: ImageSelection) -> dict:
    def indices(values: torch.Tensor) -> list[int]:
        return [int(v) for v in values.tolist()]

    return {
        "image_size": None if selection.image_size is None else [int(v) for v in selection.image_size],
        "grid": [int(v) for v in selection.grid],
        "num_tokens": int(selection.num_tokens),
        "method": selection.method,
        "budget": selection.budget,
        "tiles": [
            {
                "side": tile.side,
                **({"rows": tile.rows} if isinstance(tile, GridTile) else {}),
                "kept": indices(tile.kept),
                "targets": indices(tile.targets),
                "merged": indices(tile.merged),
                "merged_into": indices(tile.merged_into),
                # 4 significant digits draw the same heatmap and keep a recording small
                "cls_attention": None
                if tile.cls_attention is None
                else [float(f"{v:.4g}") for v in tile.cls_attention.float().tolist()],
            }
            for tile in selection.tiles
        ],
    }


# -- reading -------------------------------------------------------------------------------------
def read(path: str | Path, media_folder: str | Path) -> Conversation:
    """The conversation a recording file holds, its media written into `media_folder`; raises
    RecordingError (a plain message, no path) for anything but a valid recording of this version."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise RecordingError("The recording could not be read.") from None
    if size > MAX_FILE_BYTES:
        raise RecordingError(
            f"This file is {size / 2**20:.1f} MiB: a recording is at most {MAX_FILE_BYTES // 2**20} MiB."
        )
    try:
        document = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise RecordingError(
            f"This is not a recording (not valid JSON: {type(error).__name__}); is it cut short?"
        ) from None
    return from_document(document, media_folder)


def _refuse_constant(name: str):
    raise RecordingError(f"A recording holds only finite numbers, not {name}.")


def from_document(document: Any, media_folder: str | Path) -> Conversation:
    """Validate a parsed recording and build its conversation (media written into `media_folder`)."""
    check_header(document)
    sides = {side: _read_side(_get(document["sides"], side, dict, "sides"), f"sides.{side}") for side in SIDES}
    settings = _get(document, "settings", dict, "recording")
    turns = _get(document, "turns", list, "recording")
    if len(turns) > MAX_TURNS:
        raise RecordingError(f"The recording has {len(turns)} turns, more than {MAX_TURNS}.")
    read_turns = [_read_turn(turn, f"turn {number}") for number, turn in enumerate(turns, start=1)]
    media_path, kind = _write_media(_get(document, "media", dict, "recording"), Path(media_folder))
    return Conversation(
        sides,
        media_path=media_path,
        media_kind=kind,
        turns=read_turns,
        num_frames=_get(settings, "num_frames", int, "settings"),
        same_budget=_get(settings, "same_budget", bool, "settings"),
        quality_check=_get(settings, "quality_check", bool, "settings"),
        keep_cache=_get(settings, "keep_cache", bool, "settings"),
    )


def check_header(document: Any) -> None:
    """A dict in this format and version, with its top-level parts."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise RecordingError("This file is not a VisionZip Live recording.")
    version = document.get("version")
    if version != VERSION:
        raise RecordingError(f"This recording is version {version!r}; this app reads version {VERSION}.")
    _get(document, "sides", dict, "recording")


def _get(container: dict, key: str, kind: type | tuple, where: str, limit: int = MAX_TEXT):
    """container[key], which must be of `kind` (bool is not an int, an int is a float here); text at
    most `limit` characters."""
    if not isinstance(container, dict) or key not in container:
        raise RecordingError(f"The recording is damaged: {where} has no '{key}'.")
    value = container[key]
    if not _is(value, kind):
        raise RecordingError(f"The recording is damaged: {where}.{key} is not {_kind_name(kind)}.")
    if isinstance(value, str) and len(value) > limit:
        if limit != MAX_TEXT:
            raise RecordingError(f"The recording's {key} is over {MAX_MEDIA_BYTES // 2**20} MiB.")
        raise RecordingError(f"The recording is damaged: {where}.{key} is too long.")
    return value


def _is(value: Any, kind: type | tuple) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for option in kinds:
        if option is None and value is None:
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option not in (None, float, int) and isinstance(value, option):
            return True
    return False


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        None: "null",
        int: "a whole number",
        float: "a number",
        str: "text",
        bool: "true/false",
        list: "a list",
        dict: "an object",
    }
    return " or ".join(names.get(option, str(option)) for option in kinds)


def _read_side(document: dict, where: str) -> SideConfig:
    model = _get(document, "model", str, where)
    mode = _get(document, "mode", dict, where)
    expected = {field.name: field for field in fields(Mode)}
    unknown = sorted(set(mode) - set(expected))
    if unknown:
        raise RecordingError(f"The recording is damaged: {where}.mode has unknown fields {unknown}.")
    kinds = {"name": str, "enabled": bool, "dominant": int, "contextual": int, "tuned": (str, None), "method": str}
    kinds |= {"tokens": (int, None), "seed": int}
    values = {name: _get(mode, name, kind, f"{where}.mode") for name, kind in kinds.items()}
    if "family" in mode:  # optional: files written before modes knew their family read as unknown ("")
        values["family"] = _get(mode, "family", str, f"{where}.mode")
    if values["method"] not in visionzip.METHODS:
        raise RecordingError(f"{where} used the method '{values['method']}', which this app does not have.")
    return SideConfig(model, Mode(**values))


def _read_turn(document: Any, where: str) -> Turn:
    if not isinstance(document, dict):
        raise RecordingError(f"The recording is damaged: {where} is not an object.")
    turn = Turn(_get(document, "question", str, where))
    turn.measured_on = _read_measured_on(_get(document, "measured_on", dict, where), f"{where}.measured_on")
    for side, frames in _get(document, "frames", dict, where).items():
        turn.frames[_side_name(side, where)] = _get({"frames": frames}, "frames", int, where)
    for side, chosen in _get(document, "chosen_for", dict, where).items():
        turn.chosen_for[_side_name(side, where)] = _get({"chosen_for": chosen}, "chosen_for", str, where)
    sides = _get(document, "sides", dict, where)
    for side in SIDES:
        record = _get(sides, side, dict, f"{where}.sides")
        here = f"{where}, {side} side"
        turn.answers[side] = _get(record, "answer", str, here)
        tokens = _read_tokens(_get(record, "tokens", list, here), turn.answers[side], here)
        if tokens:
            turn.tokens[side] = tokens
        stats = _get(record, "stats", (dict, None), here)
        if stats is not None:
            turn.stats[side] = _read_stats(stats, here)
            if tokens and abs(tokens[0][0] - turn.stats[side].ttft_ms) > 0.01:
                raise RecordingError(f"The recording is damaged: {here}: its first token's time is not its TTFT.")
        kept = _get(record, "kept", (list, None), here)
        if kept is not None:
            if not 0 < len(kept) <= MAX_SELECTIONS:
                raise RecordingError(f"The recording is damaged: {here}.kept holds {len(kept)} images.")
            turn.selections[side] = [_read_selection(s, f"{here}.kept") for s in kept]
        chosen_by = _get(record, "chosen_by", (dict, None), here) if "chosen_by" in record else None
        if chosen_by is not None:  # what chose `kept` (app.choices labels the overlay by it)
            turn.chosen_by[side] = _read_side(chosen_by, f"{here}.chosen_by")
    return turn


def _side_name(side: str, where: str) -> str:
    if side not in SIDES:
        raise RecordingError(f"The recording is damaged: {where} names a side '{side[:20]}'.")
    return side


def _read_measured_on(document: dict, where: str) -> dict:
    tiny, random = (_get(document, key, dict, where) for key in ("tiny", "random_weights"))
    return measured_on(
        _get(document, "hardware", str, where),
        _get(document, "timing", str, where),
        _get(document, "where", str, where),
        {side: _get(tiny, side, bool, f"{where}.tiny") for side in SIDES},
        {side: _get(random, side, bool, f"{where}.random_weights") for side in SIDES},
    )


def _read_tokens(tokens: list, answer: str, where: str) -> list[tuple[float, str]]:
    """[(ms, text)] in time order whose texts join to the answer."""
    if len(tokens) > MAX_TOKENS:
        raise RecordingError(f"The recording is damaged: {where} has {len(tokens)} tokens, more than {MAX_TOKENS}.")
    timeline, previous = [], 0.0
    for token in tokens:
        if not (isinstance(token, list) and len(token) == 2 and _is(token[0], float) and isinstance(token[1], str)):
            raise RecordingError(f"The recording is damaged: {where} has a token that is not [ms, text].")
        if token[0] < previous:
            raise RecordingError(f"The recording is damaged: {where}'s token times go backwards.")
        previous = float(token[0])
        timeline.append((previous, token[1]))
    if timeline and "".join(text for _, text in timeline) != answer:
        raise RecordingError(f"The recording is damaged: {where}'s tokens do not spell its answer.")
    return timeline


STATS_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "None": None}


def _read_stats(document: dict, where: str) -> TurnStats:
    """A TurnStats from its dict: every required field, no unknown one, each of its annotated type."""
    known = {field.name: field for field in fields(TurnStats)}
    unknown = sorted(set(document) - set(known))
    if unknown:
        raise RecordingError(f"The recording is damaged: {where}'s stats have unknown fields {unknown}.")
    values = {}
    for name, field in known.items():
        if name not in document:
            if field.default is MISSING and field.default_factory is MISSING:
                raise RecordingError(f"The recording is damaged: {where}'s stats have no '{name}'.")
            continue
        options = [option.strip() for option in str(field.type).split("|")]
        if "list[int]" in options:
            value = document[name]
            if not (value is None or (isinstance(value, list) and all(_is(v, int) for v in value))):
                raise RecordingError(
                    f"The recording is damaged: {where}'s stats.{name} is not a list of whole numbers."
                )
            values[name] = value
        else:
            values[name] = _get(document, name, tuple(STATS_KINDS[o] for o in options), f"{where}.stats")
    return TurnStats(**values)


def _read_selection(document: Any, where: str) -> ImageSelection:
    if not isinstance(document, dict):
        raise RecordingError(f"The recording is damaged: {where} holds something that is not an image's choice.")
    size, grid = _get(document, "image_size", (list, None), where), _get(document, "grid", list, where)
    pairs = (grid,) if size is None else (size, grid)
    if not all(len(pair) == 2 and all(_is(v, int) and v >= 0 for v in pair) for pair in pairs):
        raise RecordingError(f"The recording is damaged: {where}'s image size or grid is not two whole numbers.")
    tiles = _get(document, "tiles", list, where)
    if not 0 < len(tiles) <= MAX_TILES:
        raise RecordingError(f"The recording is damaged: {where} has {len(tiles)} tiles.")
    return ImageSelection(
        image_size=None if size is None else (size[0], size[1]),
        grid=(grid[0], grid[1]),
        tiles=[_read_tile(tile, f"{where} tile {index}") for index, tile in enumerate(tiles)],
        num_tokens=_get(document, "num_tokens", int, where),
        method=_get(document, "method", str, where),
        budget=_get(document, "budget", str, where),
    )


def _read_tile(document: Any, where: str) -> TileSelection:
    """A tile's choice: patch indices inside its side x side grid (rows x side: a merged grid), merged
    patches pointing at targets."""
    if not isinstance(document, dict):
        raise RecordingError(f"The recording is damaged: {where} is not an object.")
    side = _get(document, "side", int, where)
    rows = _get(document, "rows", int, where) if "rows" in document else None
    if not 1 <= side <= 64 or not (rows is None or 1 <= rows <= 64):
        raise RecordingError(f"The recording is damaged: {where} is not a grid of 1 to 64 patches a side.")
    cells = side * (side if rows is None else rows)

    def indices(key: str, limit: int) -> torch.Tensor:
        values = _get(document, key, list, where)
        if len(values) > cells or not all(_is(v, int) and 0 <= v < limit for v in values):
            raise RecordingError(f"The recording is damaged: {where}.{key} holds an index out of range.")
        return torch.tensor(values, dtype=torch.long)

    kept, targets, merged = (indices(key, cells) for key in ("kept", "targets", "merged"))
    merged_into = indices("merged_into", max(1, len(targets)))
    if len(merged_into) != len(merged) or (len(merged) and not len(targets)):
        raise RecordingError(f"The recording is damaged: {where}'s merged patches do not match their targets.")
    attention = _get(document, "cls_attention", (list, None), where)
    if attention is not None and (len(attention) != cells or not all(_is(v, float) for v in attention)):
        raise RecordingError(f"The recording is damaged: {where}.cls_attention is not {cells} numbers.")
    cls = None if attention is None else torch.tensor(attention, dtype=torch.float32)
    if rows is not None:
        return GridTile(side, kept, targets, merged, merged_into, cls, rows=rows)
    return TileSelection(side, kept, targets, merged, merged_into, cls)


def _write_media(document: dict, folder: Path) -> tuple[str, str]:
    """The embedded media written to `folder` under a name made from its content; checked to be the
    kind the recording says and readable."""
    kind = _get(document, "kind", str, "media")
    if kind not in ("image", "video"):
        raise RecordingError(f"The recording is damaged: its media kind is '{kind[:20]}'.")
    encoded = _get(document, "base64", str, "media", limit=MAX_MEDIA_BYTES * 4 // 3 + 4)
    if len(encoded) > MAX_MEDIA_BYTES * 4 // 3 + 4:
        raise RecordingError(f"The recording's media is over {MAX_MEDIA_BYTES // 2**20} MiB.")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RecordingError("The recording is damaged: its media is not valid base64.") from None
    suffix = Path(_get(document, "name", str, "media")).suffix.lower()
    suffix = suffix if suffix in MEDIA_SUFFIXES else (".png" if kind == "image" else ".mp4")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"recording-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    path.write_bytes(data)
    try:
        if detect_media_kind(path) != kind:
            raise RecordingError(f"The recording is damaged: its media is not the {kind} it says.")
        if kind == "image":
            load_image(path)
    except (MediaError, RecordingError) as error:
        path.unlink(missing_ok=True)  # a refused recording leaves nothing behind
        message = str(error) if isinstance(error, RecordingError) else f"The recording's media cannot be read: {error}"
        raise RecordingError(message) from None
    return str(path), kind
