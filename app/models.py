"""The models a side can choose: a registry of labels, lazy loading, one reduction handle per
loaded model (both sides share its weights), tuned projectors offered per model, and
least-recently-used unloading by free GPU memory."""

from __future__ import annotations

import gc
import importlib.util
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

import visionzip
from app.hosting import ON_ZEROGPU
from app.tuned import ProjectorError, ProjectorFile, check_fits, read_projector_file
from visionzip.projector import TunedProjector, load_projector
from visionzip.tiny import tiny_checkpoint
from visionzip.workarounds import dense_lm_head_input, load_processor, needs_dense_lm_head_input

log = logging.getLogger(__name__)

TINY = "tiny:"  # source prefix of the offline random-weight checkpoints, built on first use
TINY_LABEL = "Tiny LLaVA-NeXT (random weights)"
TINY_15_LABEL = "Tiny LLaVA-1.5 (random weights)"
TINY_QWEN_LABEL = "Tiny Qwen2.5-VL (random weights)"
DEFAULT_CHOICES: dict[str, str] = {
    TINY_LABEL: TINY + "llava_next",
    TINY_15_LABEL: TINY + "llava",
    TINY_QWEN_LABEL: TINY + "qwen2_5_vl",
    "LLaVA-NeXT Vicuna 7B": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "LLaVA-NeXT Vicuna 13B": "llava-hf/llava-v1.6-vicuna-13b-hf",
    "LLaVA-NeXT Mistral 7B": "llava-hf/llava-v1.6-mistral-7b-hf",
    "LLaVA-1.5 7B": "llava-hf/llava-1.5-7b-hf",
    "Qwen2.5-VL 7B": "Qwen/Qwen2.5-VL-7B-Instruct",
}
DEFAULT_CHOICES["Tiny LLaVA-OneVision (random weights)"] = TINY + "llava_onevision"
DEFAULT_CHOICES["LLaVA-OneVision Qwen2 7B"] = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
FOUR_BIT = " (4-bit)"  # label suffix: 4-bit weights change latency, so the UI says so
MODEL_CLASSES = {
    "llava_next": LlavaNextForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; its message is shown to the user as is."""


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for, but this torch build sees no CUDA GPU")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, else fp16; fp32 on CPU; or what the user named."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_tiny(source: str) -> bool:
    return source.startswith(TINY)


# -- registry -----------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    label: str
    source: str
    family: str  # "llava_next" or "llava"
    model: torch.nn.Module
    processor: object
    handle: visionzip.VisionZip
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int
    quantized: bool = False
    warmed: set = field(default_factory=set)  # mode keys that already ran once
    projector: ProjectorFile | None = None  # the tuned projector offered for this model, if any
    _tuned: TunedProjector | None = field(default=None, repr=False)  # its weights, once loaded

    def tuned_projector(self) -> TunedProjector:
        """The tuned projector's weights, loaded on first use; raises ModelLoadError when there is
        none or it does not fit this model."""
        if self.projector is None:
            raise ModelLoadError(f"{self.label} has no tuned projector: start the app with --projector PATH to add one")
        if self._tuned is None:
            with warnings.catch_warnings(record=True) as caught:  # another path to the same model: matched at start
                warnings.simplefilter("always")
                try:
                    self._tuned = load_projector(self.model, self.projector.path)
                except (OSError, ValueError) as error:
                    raise ModelLoadError(f"the tuned projector for {self.label} does not load: {error}") from None
            for warning in caught:
                log.info("%s", warning.message)
        return self._tuned

    @property
    def pairs_frames(self) -> bool:
        """Whether the model takes a clip natively, frames paired in time on its own grid (Qwen2.5-VL, whose
        library family counts video tokens), rather than as frames of one tile each (`visionzip.video`)."""
        return hasattr(self.handle.family, "num_video_tokens")

    @property
    def context_window(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def describe(self) -> str:
        precision = "4-bit" if self.quantized else str(self.dtype).removeprefix("torch.")
        size = (
            f"{self.weight_bytes / 2**30:.1f} GiB"
            if self.weight_bytes >= 2**30
            else f"{self.weight_bytes / 2**20:.1f} MiB"
        )
        return f"{self.label}: {precision} on {self.device}, {size} of weights"


class ModelRegistry:
    """Labels -> checkpoints, loaded on first use and kept until GPU memory runs short."""

    def __init__(self, extra: str | None = None, device: str = "auto", dtype: str = "auto") -> None:
        self.choices: dict[str, str] = dict(DEFAULT_CHOICES)
        self.default = TINY_LABEL
        if extra:
            # a checkpoint already listed keeps its label: two labels would load two copies
            known = [label for label, source in self.choices.items() if source == extra]
            label = known[0] if known else (Path(extra).name if Path(extra).exists() else extra)
            self.choices[label] = extra
            self.default = label
        if has_bitsandbytes():
            for label, source in list(self.choices.items()):
                if not is_tiny(source):
                    self.choices[label + FOUR_BIT] = source
        self.device_name, self.dtype_name = device, dtype
        self.projectors: dict[str, ProjectorFile] = {}  # model source -> its tuned projector
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._failures: dict[str, str] = {}  # label -> why its last load failed
        self._lock = threading.RLock()
        self.engines: dict[str, object] = {}  # label -> app.engine.EngineServer: a side answered by a vLLM server
        self.engine_defaults: dict[str, str] = {}  # side -> the engine label it starts on (--engine SIDE=URL)

    def add_engine(self, engine, side: str | None = None) -> str:
        """Offer a vLLM server (app.engine.EngineServer) in every side's model list, under the label it has now
        (its served model and method when it answered, else its address); `side` starts on it."""
        label = engine.describe()
        self.choices[label] = engine.url
        self.engines[label] = engine
        if side is not None:
            self.engine_defaults[side] = label
        return label

    def is_engine(self, label: str) -> bool:
        return label in self.engines

    def refuse_engine(self, label: str) -> None:
        """Every view that needs a model's weights here says why a vLLM side has none."""
        if label in self.engines:
            raise ModelLoadError(f"{label} answers on its vLLM server: this needs a model loaded in the app")

    def family(self, label: str) -> str:
        """The library's model family of a label ("llava_next", "llava", ...), without loading its weights."""
        if label in self.engines:  # as the server last reported (LLaVA-NeXT until it answers)
            report = self.engines[label].report
            return report.family if report is not None else "llava_next"
        source = self._source(label)
        if is_tiny(source):
            return source.removeprefix(TINY)
        loaded = self._loaded.get(label)
        if loaded is not None:
            return loaded.family
        try:
            model_type = AutoConfig.from_pretrained(source, trust_remote_code=False).model_type
        except Exception as error:
            raise ModelLoadError(f"could not read the config of {label} ({source}): {error}") from None
        if model_type not in MODEL_CLASSES:
            raise ModelLoadError(f"{label} is a {model_type!r} model; this demo runs {sorted(MODEL_CLASSES)}")
        return model_type

    def is_tiny(self, label: str) -> bool:
        return label not in self.engines and is_tiny(self._source(label))

    def add_projector(self, path: str | Path) -> list[str]:
        """Offer the tuned projector at `path` on the model it was trained for (matched by the base
        model its metadata records), checked against that model's config; its weights load on first
        use.  Returns the labels it serves; raises ModelLoadError saying why it fits none."""
        try:
            projector = read_projector_file(path)
            base = projector.info.base_model
            sources = {source for label, source in self.choices.items() if base == label or same_model(base, source)}
            if not sources:
                raise ProjectorError(
                    f"tuned projector {path} was trained on {base!r}, which is none of this app's models "
                    f"({', '.join(self.choices)}): start the app with --model {base} to add it"
                )
            for source in sources:
                check_fits(projector, read_config(source), source)
                if source in self.projectors and self.projectors[source].path != projector.path:
                    raise ProjectorError(
                        f"two tuned projectors for {source}: {self.projectors[source].path} and {path}; give one per model"
                    )
        except ProjectorError as error:
            raise ModelLoadError(str(error)) from None
        for source in sources:
            self.projectors[source] = projector
        return [label for label, source in self.choices.items() if source in sources]

    def projector_for(self, label: str) -> ProjectorFile | None:
        """The tuned projector offered for `label`'s model, without loading anything."""
        return self.projectors.get(self._source(label))

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def get(self, label: str) -> LoadedModel:
        """The loaded model for `label`, loading it (and unloading others if needed) on first use.
        Raises ModelLoadError with a readable reason; models already loaded stay loaded.  Call it
        outside GPU tasks (see gpu_task); inside, use `ready`."""
        self.refuse_engine(label)
        with self._lock:
            if label in self._loaded:
                self._loaded.move_to_end(label)
                return self._loaded[label]
            source = self._source(label)
            try:
                loaded = self._load(label, source)
            except ModelLoadError as error:
                self._failures[label] = str(error)
                raise
            except torch.cuda.OutOfMemoryError:
                message = f"{label} does not fit in GPU memory, even with the other models unloaded"
            except Exception as error:
                log.exception("loading %s failed", source)
                message = f"could not load {label} ({source}): {type(error).__name__}: {error}"
            else:
                self._failures.pop(label, None)
                self._loaded[label] = loaded
                return loaded
            self._failures[label] = message
            raise ModelLoadError(message)

    def ready(self, label: str) -> LoadedModel:
        """The model `get` loaded for `label`, without ever loading it: what GPU tasks use, since a
        load inside one would be lost on ZeroGPU.  Raises ModelLoadError with the reason its load
        failed, or saying that it is not loaded."""
        self.refuse_engine(label)
        with self._lock:
            if label in self._loaded:
                self._loaded.move_to_end(label)
                return self._loaded[label]
        self._source(label)  # an unknown label says so
        raise ModelLoadError(
            self._failures.get(label) or f"{label} is not loaded (it was unloaded to make room): choose it again"
        )

    def _source(self, label: str) -> str:
        if label not in self.choices:
            raise ModelLoadError(f"unknown model {label!r}; choose one of {list(self.choices)}")
        return self.choices[label]

    def _load(self, label: str, source: str) -> LoadedModel:
        device = resolve_device(self.device_name)
        dtype = resolve_dtype(self.dtype_name, device)
        quantized = label.endswith(FOUR_BIT)
        path = str(tiny_checkpoint(source.removeprefix(TINY))) if is_tiny(source) else source
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        model_class = MODEL_CLASSES.get(config.model_type)
        if model_class is None:
            raise ModelLoadError(
                f"{label} is a {config.model_type!r} model; this demo runs LLaVA-NeXT and LLaVA-1.5 ({sorted(MODEL_CLASSES)})"
            )
        kwargs: dict = dict(dtype=dtype, use_safetensors=True, trust_remote_code=False)
        if quantized:
            if device.type != "cuda" or not has_bitsandbytes():
                raise ModelLoadError("4-bit loading needs a CUDA GPU and the bitsandbytes package")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        if device.type == "cuda":
            self._make_room(_weight_bytes(model_class, config, 0.5 if quantized else dtype.itemsize), device)
            if ON_ZEROGPU and not quantized:  # ZeroGPU's documented way: load on the CPU, then .to("cuda")
                model = self._from_pretrained(model_class, path, kwargs).to(device)
            else:
                kwargs["device_map"] = str(device) if device.index is not None else "cuda"
                model = self._from_pretrained(model_class, path, kwargs)
        else:
            model = model_class.from_pretrained(path, **kwargs).to(device)
        model.eval()
        if needs_dense_lm_head_input(device, dtype):  # a torch CPU bf16 slowdown that would swamp both sides
            dense_lm_head_input(model)
        processor = load_processor(path, trust_remote_code=False)  # OneVision's and Qwen's, without torchvision too
        handle = visionzip.apply(model, processor, enabled=False)  # each call states its own mode
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        log.info("loaded %s from %s", label, path)
        return LoadedModel(
            label,
            source,
            config.model_type,
            model,
            processor,
            handle,
            device,
            dtype,
            weight_bytes,
            quantized,
            projector=self.projectors.get(source),
        )

    def _from_pretrained(self, model_class, path: str, kwargs: dict) -> torch.nn.Module:
        try:
            return model_class.from_pretrained(path, **kwargs)
        except torch.cuda.OutOfMemoryError:  # the estimate was short: free everything and retry once
            while self._loaded:
                self._unload(self._loaded.popitem(last=False)[1])
            return model_class.from_pretrained(path, **kwargs)

    def _make_room(self, needed: int, device: torch.device) -> None:
        """Unload least-recently-used models until `needed` bytes plus working headroom fit."""
        while self._loaded:
            if free_gpu_bytes(device, self._loaded.values()) >= needed * 1.2:
                return
            label, victim = self._loaded.popitem(last=False)
            log.info("unloading %s to make room", label)
            self._unload(victim)

    @staticmethod
    def _unload(loaded: LoadedModel) -> None:
        loaded.handle.remove()
        del loaded.model, loaded.handle
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def free_gpu_bytes(device: torch.device, loaded: Iterable[LoadedModel]) -> int:
    """Free memory on `device` (the GPU the model goes to, not the current one).  On ZeroGPU the
    main process holds no GPU memory, and every GPU call receives all loaded weights on its slice:
    there, free is the slice's size less the loaded weights."""
    if ON_ZEROGPU:
        return torch.cuda.get_device_properties(device).total_memory - sum(model.weight_bytes for model in loaded)
    free, _ = torch.cuda.mem_get_info(device)
    return free


def same_model(base_model: str, source: str) -> bool:
    """Whether a projector recorded as trained on `base_model` (the id or folder it was loaded from)
    was trained on the registry's `source`: the same id, the same folder, or the same tiny checkpoint
    (built identically in any cache folder)."""
    if base_model == source:
        return True
    if is_tiny(source):
        return Path(base_model).name == tiny_checkpoint(source.removeprefix(TINY)).name
    try:
        return Path(base_model).exists() and Path(source).exists() and Path(base_model).samefile(source)
    except OSError:
        return False


def read_config(source: str):
    """A registry source's config, without loading weights; raises ModelLoadError."""
    path = str(tiny_checkpoint(source.removeprefix(TINY))) if is_tiny(source) else source
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as error:
        raise ModelLoadError(f"could not read the config of {source}: {error}") from None


def _weight_bytes(model_class, config, bytes_per_parameter: float) -> int:
    """Size of a model's weights, counted on the meta device (no memory, no download)."""
    with torch.device("meta"):
        shell = model_class(config)
    return int(sum(p.numel() for p in shell.parameters()) * bytes_per_parameter)
