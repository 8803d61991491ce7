"""Command-line options that several sub-commands share, so they read and parse alike."""

from __future__ import annotations

# argparse %-formats help strings: a literal percent sign must be written "%%" here.
FINDINGS_HELP = ('"A;B;..." finding names or free text, separated by ";"; "ct-rate" (the 18, default), '
                 '"ct-rate-lt" (15 rare ones) and "all" expand to those lists')
