"""The graph pass: trace a block, locate attention and residuals, insert the reorganizer.

Also reads and changes a patched model's state (``state``), which lives in the inserted modules.
"""
