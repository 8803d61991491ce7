"""``medalign web``: the browser screening viewer (trame-slicer), on 127.0.0.1 unless told.

The viewer lives in the ``MedAlignWeb`` package next to the engine; it is imported here
through importlib inside ``run`` only, so the engine never imports Slicer, VTK or trame
(the ``web`` extra installs them: ``pip install "medalign[web]"``).
"""

from __future__ import annotations

import argparse
import importlib


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "web",
        help="browser viewer: load a CT, screen, read the table, overlay maps (trame-slicer)",
        description="Serve the MedAlign web viewer. It listens on 127.0.0.1 only unless --host says "
        "otherwise; on a remote server reach it through SSH port forwarding "
        "(ssh -L 8080:127.0.0.1:8080 server) rather than opening the port.",
    )
    p.add_argument("volumes", nargs="*", metavar="VOLUME", help="CT files or DICOM folders on the server to offer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=float, default=1024, help="largest accepted upload in MB (default 1024)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device of the screening runs")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE|DIR",
                   help="medalign adapt files the page offers in its adapter list (a folder: its *.safetensors "
                   "adapters; repeatable); only those fitting the chosen model are listed, and a single file "
                   "named here is chosen at start")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medalign.core.errors import InputError

    missing = [v for v in [*args.volumes, *args.adapter] if not Path(v).exists()]
    if missing:
        raise InputError(f"{missing[0]} does not exist.")
    if args.max_upload_mb <= 0:
        raise InputError("--max-upload-mb must be a positive number of megabytes.")
    try:
        app = importlib.import_module("MedAlignWeb.app")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("trame", "trame_slicer", "slicer", "vtk", "MedAlignWeb", "MedAlignLib"):
            raise InputError(f"The web viewer needs {exc.name}; install it with: pip install \"medalign[web]\"") from exc
        raise
    return app.serve(host=args.host, port=args.port, volumes=[str(v) for v in args.volumes],
                     max_upload_mb=args.max_upload_mb, device=args.device,
                     adapters=[str(Path(a).resolve()) for a in args.adapter])
