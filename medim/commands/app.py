"""`medim app`: the web app (Gradio) for the three tasks, on the bundled demo model unless told otherwise.

Example:
    medim app                                                  # http://127.0.0.1:7860, offline
    medim app --model org/medim-cxr --device cuda --port 8080
"""

from __future__ import annotations

import argparse

from medim.commands.common import HelpFormatter, add_pipeline_arguments, load_pipeline, pipeline_spec, usage_errors

HELP = "serve a web app for text to image, image to report and pairs (needs `pip install 'medim-diffusion[app]'`)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    add_pipeline_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 serves other machines too)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")


def run(args: argparse.Namespace) -> int:
    from medim.app import build_app, launch_options, require_gradio
    from medim.utils.checks import check_int

    with usage_errors():
        check_int(args.port, "--port", minimum=1, maximum=65535)

    try:
        require_gradio()  # before the (slow) model load
    except ImportError as e:
        raise SystemExit(str(e)) from None
    pipe = load_pipeline(pipeline_spec(args, "medim app"))
    app = build_app(pipe, title="MeDiM" if args.model == "medim-demo" else f"MeDiM: {args.model}")
    print(f"medim app: http://{args.host}:{args.port}/ (Ctrl+C stops it)", flush=True)
    app.launch(server_name=args.host, server_port=args.port, **launch_options())
    return 0
