"""VisionZip Live: `python app.py` serves the demo on the tiny offline model at http://127.0.0.1:7860.

    python app.py --model llava-hf/llava-v1.6-vicuna-7b-hf --host 0.0.0.0   # a real checkpoint
    python app.py --projector runs/llava-64/projector.safetensors           # + a tuned projector (visionzip.tune)
    python app.py --engine right=http://127.0.0.1:8000   # the right side on a vLLM server (visionzip_vllm plugin)
On Spaces, set VISIONZIP_MODEL instead of --model and VISIONZIP_PROJECTOR instead of --projector;
PORT or GRADIO_SERVER_PORT pick the port.
"""

import argparse
import logging
import os
import re

from app.engine import offer_server
from app.models import ON_ZEROGPU, ModelLoadError, ModelRegistry, resolve_device
from app.ui import build_demo, launch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=os.environ.get("VISIONZIP_MODEL"),
        help="Hub id or local folder of a LLaVA-NeXT / LLaVA-1.5 checkpoint, selected by default on both sides "
        "(env VISIONZIP_MODEL; default: the tiny random-weight LLaVA-NeXT, built offline)",
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit per side and turn")
    parser.add_argument(
        "--talk",
        action="store_true",
        help="serve the presenter view at / (the researcher's page moves to /research); without it, it is at /talk",
    )
    parser.add_argument(
        "--projector",
        action="append",
        metavar="PATH",
        help="a projector tuned with `python -m visionzip.tune`, offered on the model it was trained for (repeatable; "
        "env VISIONZIP_PROJECTOR: paths separated by commas or the OS path separator)",
    )
    parser.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="[SIDE=]URL",
        help="a running vLLM server with the visionzip_vllm plugin, offered in every side's model list; SIDE= (left "
        "or right) starts that side on it (repeatable; env VISIONZIP_ENGINE: entries separated by commas)",
    )
    parser.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the default model before serving (default: on for ZeroGPU, where models must be loaded outside "
        "GPU calls and weights loaded before start-up are packed for fast transfer; off elsewhere: it loads on first use)",
    )
    args = parser.parse_args(argv)
    if args.preload is None:
        args.preload = ON_ZEROGPU
    args.engine = args.engine or [entry.strip() for entry in os.environ.get("VISIONZIP_ENGINE", "").split(",")]
    args.engine = [entry for entry in args.engine if entry]
    if args.projector is None:
        listed = os.environ.get("VISIONZIP_PROJECTOR", "")
        args.projector = [path.strip() for path in re.split(f"[,{re.escape(os.pathsep)}]", listed) if path.strip()]
    return args


def make_registry(args: argparse.Namespace) -> ModelRegistry:
    """The app's models with their tuned projectors; raises SystemExit with the reason when one of
    them cannot serve (at start, rather than on the first question)."""
    registry = ModelRegistry(args.model, device=args.device, dtype=args.dtype)
    try:
        resolve_device(args.device)
        registry.family(registry.default)
        for path in args.projector:
            labels = registry.add_projector(path)
            logging.getLogger("app").info("tuned projector %s offered on %s", path, ", ".join(labels))
        for entry in args.engine:
            logging.getLogger("app").info("vLLM server offered as %r", offer_server(registry, entry))
    except (ModelLoadError, ValueError) as error:
        raise SystemExit(f"app.py: {error}") from None
    return registry


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    registry = make_registry(args)
    if args.preload:
        try:
            registry.get(registry.default)
        except ModelLoadError as error:
            raise SystemExit(f"app.py: {error}") from None
    demo = build_demo(registry, max_new_tokens=args.max_new_tokens, talk_first=args.talk)
    launch(demo, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
