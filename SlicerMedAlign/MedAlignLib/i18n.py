"""Slicer's translation functions, or identity functions where Slicer has none.

Slicer 5.4 added ``slicer.i18n`` (``tr``, ``translate``; Slicer v5.8.1
``Base/Python/slicer/i18n.py:9-16, 52-97``); its module template marks help and
acknowledgement texts with ``_()`` and categories with
``translate("qSlicerAbstractCoreModule", ...)`` (``Utilities/Templates/Modules/Scripted/
TemplateKey.py:8-9, 34-47``). Older Slicer and the headless slicer-core have no such
module: there the texts stay English and nothing fails. ``tr`` is re-exported unwrapped
because it takes its translation context from its caller's file name (``i18n.py:80-83``):
a wrapper here would make every MedAlign text look up the context "i18n".
"""

from __future__ import annotations

try:
    from slicer.i18n import tr, translate
except ImportError:  # Slicer < 5.4 or slicer-core: no translations

    def tr(text: str) -> str:
        """``text`` unchanged (no translation catalogue)."""
        return text

    def translate(context: str, text: str) -> str:
        """``text`` unchanged (no translation catalogue)."""
        return text


__all__ = ["tr", "translate"]
