"""Functions a traced block calls as opaque graph nodes (runtime guards, ``None``-aware helpers).

Kept at the bottom of the package: the graph pass registers them with every tracer, and families
that re-express a library's layers use them too.
"""

from __future__ import annotations

RUNTIME_GUARDS: list = []
"""Functions every :class:`~evit_patch.graph.trace.BlockTracer` keeps opaque."""


def runtime_guard(fn):
    """Let every block tracer keep ``fn`` opaque, also when pickle re-traces a patched block's
    generated code, where ``fx.wrap`` (per defining module, still needed for the first trace) does not reach."""
    RUNTIME_GUARDS.append(fn)
    return fn
