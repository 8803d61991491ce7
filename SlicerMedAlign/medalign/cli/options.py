"""Command-line options shared by several sub-commands, defined once.

Torch-free on purpose: every sub-command registers its options when the parser is
built, and ``medalign models list`` or ``--help`` must not pay for importing torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# argparse %-formats help strings: a literal percent sign must be written "%%" here.
FINDINGS_HELP = ('"A;B;..." finding names or free text, separated by ";"; "ct-rate" (the 18, default), '
                 '"ct-rate-lt" (15 rare ones), "all" (both chest lists) and "abdominal" (20 abdominal CT findings) '
                 'expand to those lists')

DEVICE_HELP = (
    "auto (CUDA, then Apple MPS, then CPU), cpu, cuda (the current GPU), cuda:N (GPU number N) or mps; "
    "a device that is absent is refused before any work starts"
)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` for screen, batch, eval and train.  The value is checked (spelling and
    whether that GPU exists) by ``medalign.core.device.resolve_device``, which the
    dispatcher calls before the command runs, so a bad value is one sentence and exit 2."""
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)


def add_tta_argument(parser: argparse.ArgumentParser) -> None:
    """``--tta N``: test-time views for the uncertainty (``medalign.inference.uncertainty``)."""
    parser.add_argument("--tta", type=int, default=0, metavar="N",
                        help="extra encodings of the scan shifted by 5 mm along each axis in turn, so the uncertainty "
                        "covers the image as well as the prompt wordings (default 0: one encoding, fastest; "
                        "each view costs one more image encoding)")


def add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    """``--adapter`` for screen, batch and eval: a file from ``medalign adapt``; it names its
    model (used when --model is not given) and is refused for any other model's weights."""
    parser.add_argument("--adapter", default=None, type=Path, metavar="FILE",
                        help="few-shot adapter from medalign adapt (its findings use the adapted prompts and thresholds)")
