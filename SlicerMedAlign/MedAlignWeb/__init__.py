"""MedAlign's web screening viewer (``medalign web``), built on trame-slicer.

The page reuses the Slicer module's panel controller and MRML glue (``MedAlignLib``)
on a headless slicer-core scene, so the browser and the Qt panel follow the same rules.
Importing this package is light; ``MedAlignWeb.app.serve`` pulls in trame and Slicer.
"""
