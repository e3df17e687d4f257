"""Tuned projectors given to the app (`--projector`): read from their metadata alone and checked
against the model they were trained for when the app starts; their weights load on first use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from visionzip.projector import ProjectorInfo


class ProjectorError(ValueError):
    """A tuned projector the app cannot offer; its message says why, for the user."""


@dataclass(frozen=True)
class ProjectorFile:
    path: Path
    info: ProjectorInfo

    def describe(self) -> str:
        """What the UI labels its answers with, e.g. 'trained at 54+10, 200 steps'."""
        budget = self.info.budget
        merge = "" if self.info.merge == "sum" else f", {self.info.merge} merge"
        return f"trained at {budget.dominant}+{budget.contextual}{merge}, {self.info.steps} steps"


def read_projector_file(path: str | Path) -> ProjectorFile:
    """The file's training record (no tensors are read); raises ProjectorError for a file that is
    missing, not safetensors, or not a VisionZip tuned projector."""
    path = Path(path)
    if not path.is_file():
        raise ProjectorError(f"tuned projector {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata()
    except Exception as error:  # safetensors raises its own error types for a damaged or foreign file
        raise ProjectorError(f"tuned projector {path} is not a readable safetensors file: {error}") from None
    try:
        return ProjectorFile(path, ProjectorInfo.from_metadata(metadata, str(path)))
    except (KeyError, ValueError) as error:
        raise ProjectorError(f"tuned projector {path}: {error}") from None


def check_fits(projector: ProjectorFile, config, label: str) -> None:
    """Refuse a projector trained for another model type or other hidden sizes than `config`'s."""
    info = projector.info
    ours = (config.model_type, config.vision_config.hidden_size, config.text_config.hidden_size)
    theirs = (info.model_type, info.vision_hidden_size, info.text_hidden_size)
    if ours != theirs:
        raise ProjectorError(
            f"tuned projector {projector.path} was trained for a {theirs[0]} model with vision/text hidden sizes "
            f"{theirs[1]}/{theirs[2]} ({info.base_model}), but {label} is a {ours[0]} model with {ours[1]}/{ours[2]}: "
            "it cannot run on this model"
        )
