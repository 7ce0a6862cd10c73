"""`medim app`: the web app (Gradio) for the three tasks, on the bundled demo model unless told otherwise.

Example:
    medim app                                                  # http://127.0.0.1:7860, offline
    medim app --model org/medim-cxr --device cuda --port 8080
"""

from __future__ import annotations

import argparse

from medim.commands.common import add_hub_arguments, hub_options

HELP = "serve a web app for text to image, image to report and pairs (needs `pip install 'medim[app]'`)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--model", default="medim-demo",
                        help="a saved MeDiMPipeline (folder or Hub repo), the bundled 'medim-demo', or with "
                             "--loader original the released checkpoint (e.g. JiaMao/medim_ckpts)")
    parser.add_argument("--loader", choices=("pretrained", "original"), default="pretrained",
                        help="how to read --model: MeDiMPipeline.from_pretrained, or from_original for the "
                             "released checkpoint and its upstream parts")
    add_hub_arguments(parser, "--model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 serves other machines too)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise SystemExit(f"--port must be in [1, 65535], got {args.port}")
    from medim.app import build_app, launch_options, require_gradio

    try:
        require_gradio()  # before the (slow) model load
    except ImportError as e:
        raise SystemExit(str(e)) from None
    import torch

    from medim.pipeline import MeDiMPipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    load = MeDiMPipeline.from_original if args.loader == "original" else MeDiMPipeline.from_pretrained
    try:
        pipe = load(args.model, dtype=dtype, device=device, **hub_options(args).kwargs())
    except (OSError, ValueError) as e:
        raise SystemExit(f"medim app: cannot load --model {args.model}: {e}") from None
    app = build_app(pipe, title="MeDiM" if args.model == "medim-demo" else f"MeDiM: {args.model}")
    print(f"medim app: http://{args.host}:{args.port}/ (Ctrl+C stops it)", flush=True)
    app.launch(server_name=args.host, server_port=args.port, **launch_options())
    return 0
