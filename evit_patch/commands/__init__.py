"""Command implementations shared by ``tools/*.py`` and the ``evit-patch`` CLI.

Each module exposes ``add_arguments(parser)`` and ``run(args)``; its docstring is its ``--help``
(first line: ````name``: summary``). ``evit_patch.cli.COMMANDS`` lists the ones the CLI offers.
"""
