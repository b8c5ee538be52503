"""Command implementations shared by ``tools/*.py`` and the ``evit-patch`` CLI.

Each module exposes ``add_arguments(parser)`` and ``run(args)``.
"""
