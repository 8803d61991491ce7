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

    p_download = actions.add_parser(
        "download", help="download (or resume) and verify a model's weights and text encoder (Hub models: pinned, hash-checked)"
    )
    p_download.add_argument("name")
    p_download.add_argument("--quiet", action="store_true", help="no progress bar")
    p_download.add_argument("--progress-lines", action="store_true", help="machine-readable progress lines (panel, web viewer)")

    p_verify = actions.add_parser("verify", help="re-hash a model's weights now")
    p_verify.add_argument("name")

    p_remove = actions.add_parser("remove", help="forget a registration (and weights downloaded for it)")
    p_remove.add_argument("name")

    parser.set_defaults(func=run, models_parser=parser)


def _size(entry: registry.ModelEntry) -> str:
    size = entry.spec.size_bytes if entry.spec is not None else None
    if size is None:
        return "?"
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def _list(args: argparse.Namespace) -> int:
    entries = registry.list_models()
    if args.json:
        print(json.dumps([registry.entry_as_dict(e) for e in entries], indent=2))
        return 0
    header = ("NAME", "FAMILY", "LICENCE", "SIZE", "WEIGHTS", "TRAINED ON")
    rows = [header] + [
        (
            e.name + (" *" if e.name == registry.DEFAULT_MODEL else ""),
            e.family,
            e.spec.licence if e.spec is not None else "user-supplied",
            _size(e),
            registry.weights_status(e),
            e.spec.trained_on if e.spec is not None else e.description,
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1])
    print(f"* default model. 'not downloaded': fetched from the Hugging Face Hub on first use or by "
          f"'medalign models download NAME'. Registry and pins: {registry.cache_dir()}")
    return 0


def _show(args: argparse.Namespace) -> int:
    entry = registry.get(args.name)
    spec = entry.spec
    hub_files = entry.hub_weights
    where = f"{hub_files.repo_id}@{hub_files.revision}/{hub_files.files[0]}" if hub_files else entry.weights
    print(f"name:         {entry.name}{' (builtin)' if entry.builtin else ''}")
    print(f"family:       {entry.family}")
    print(f"weights:      {where or '(not registered)'} [{registry.weights_status(entry)}]")
    print(f"sha256:       {entry.sha256 or ('pinned on first download' if hub_files else '-')}")
    encoder = entry.hub_text_encoder
    print(f"text encoder: {entry.text_encoder or (f'{encoder.repo_id}@{encoder.revision}' if encoder else '(family default)')}")
    if spec is not None:
        print(f"licence:      {spec.licence}")
        print(f"trained on:   {spec.trained_on}")
        print(f"findings:     {spec.findings}")
        print(f"citation:     {spec.citation}")
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
    from medalign.core.progress import ProgressReporter

    if args.progress_lines:  # the panel's and the web viewer's bar
        with ProgressReporter(f"downloading {args.name}", machine=True) as report:
            paths = registry.download_model(args.name, progress=report)
    else:  # a piped or logged run (CI) gets no carriage-return bar
        paths = registry.download_model(args.name, progress=not args.quiet and sys.stderr.isatty())
    print(f"Model '{args.name}' is ready: " + "; ".join(str(p) for p in paths))
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
