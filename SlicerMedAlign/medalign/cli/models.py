"""``medalign models``: list, show, add, download, verify and remove registry entries.

Kept free of torch imports so listing models is instant even on a cold start.
"""

from __future__ import annotations

import argparse
import json
import sys

from medalign.models import registry


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list, register, download and verify model weights",
        description="Manage the model registry (weights are always checked against their SHA-256).",
    )
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")

    p_list = actions.add_parser("list", help="list known models and the state of their weights")
    p_list.add_argument("--json", action="store_true", help="print the entries as JSON")

    p_show = actions.add_parser("show", help="print a model's registration and model card")
    p_show.add_argument("name")

    p_add = actions.add_parser("add", help="register weights (local file or http(s) URL) under a name")
    p_add.add_argument("name")
    p_add.add_argument("--weights", required=True, metavar="PATH_OR_URL")
    p_add.add_argument("--sha256", required=True, metavar="HEX", help="expected SHA-256 of the weight file")
    p_add.add_argument("--family", choices=registry.FAMILIES, default=None,
                       help="model family (default: the builtin of that name, else medalign)")
    p_add.add_argument("--text-encoder", default=None, metavar="PATH", help="local folder of the text encoder")
    p_add.add_argument("--description", default="", help="one line shown by 'models list'")

    p_download = actions.add_parser("download", help="download (or resume) and verify a model's weights")
    p_download.add_argument("name")
    p_download.add_argument("--quiet", action="store_true", help="no progress bar")

    p_verify = actions.add_parser("verify", help="re-hash a model's weights now")
    p_verify.add_argument("name")

    p_remove = actions.add_parser("remove", help="forget a registration (and weights downloaded for it)")
    p_remove.add_argument("name")

    parser.set_defaults(func=run, models_parser=parser)


def _list(args: argparse.Namespace) -> int:
    entries = registry.list_models()
    if args.json:
        rows = [dict(registry.entry_as_dict(e), status=registry.weights_status(e)) for e in entries]
        print(json.dumps(rows, indent=2))
        return 0
    rows = [
        (
            e.name + (" *" if e.name == registry.DEFAULT_MODEL else ""),
            e.family,
            registry.weights_status(e),
            e.description,
        )
        for e in entries
    ]
    header = ("NAME", "FAMILY", "WEIGHTS", "DESCRIPTION")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
    print(f"* default model. Weights and registry: {registry.cache_dir()}")
    return 0


def _show(args: argparse.Namespace) -> int:
    entry = registry.get(args.name)
    print(f"name:         {entry.name}{' (builtin)' if entry.builtin else ''}")
    print(f"family:       {entry.family}")
    print(f"weights:      {entry.weights or '(not registered)'} [{registry.weights_status(entry)}]")
    print(f"sha256:       {entry.sha256 or '-'}")
    print(f"text encoder: {entry.text_encoder or '(family default)'}")
    if entry.description:
        print(f"description:  {entry.description}")
    print()
    if entry.card is not None and entry.card.is_file():
        print(entry.card.read_text(encoding="utf-8").rstrip())
    else:
        print("(no model card ships with this model)")
    return 0


def _add(args: argparse.Namespace) -> int:
    entry = registry.add(
        args.name,
        args.weights,
        args.sha256,
        family=args.family,
        text_encoder=args.text_encoder,
        description=args.description,
    )
    where = "will be downloaded on first use" if registry.weights_status(entry) == "not downloaded" else "verified"
    print(f"Registered model '{entry.name}' (family {entry.family}); weights {where}.")
    return 0


def _download(args: argparse.Namespace) -> int:
    entry = registry.get(args.name)
    # A piped or logged run (Slicer's process launcher, CI) gets no carriage-return bar.
    progress = not args.quiet and sys.stderr.isatty()
    path = registry.resolve_weights(entry, allow_download=True, progress=progress)
    print(f"Model '{entry.name}' weights ready: {path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    ok, message = registry.verify(args.name)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _remove(args: argparse.Namespace) -> int:
    registry.remove(args.name)
    print(f"Removed the registration of model '{args.name}'.")
    return 0


_ACTIONS = {
    "list": _list,
    "show": _show,
    "add": _add,
    "download": _download,
    "verify": _verify,
    "remove": _remove,
}


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "models_action", None)
    if action is None:
        args.models_parser.print_help()
        return 1
    return _ACTIONS[action](args)
