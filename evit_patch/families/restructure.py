"""Blocks whose residual adds live in the module that runs them, made into blocks of their own.

vit-pytorch keeps each block as a ``ModuleList([Attention, FeedForward])`` and adds the residuals
in ``Transformer.forward`` (``x = attn(x) + x; x = ff(x) + x``): no module is the block. The
*runner* (that module) is traced with the units' children as leaves, its graph is cut into one
segment per unit (from the stream entering the unit to the one node every later use goes
through), and each segment becomes a ``GraphModule`` rooted at its unit, so its children and
parameters keep their names. The runner is replaced by a ``GraphModule`` that calls the units in
turn. Only a copy is restructured (``Family.prepare_copy``); it computes exactly what it did.
"""

from __future__ import annotations

import inspect

import torch.fx as fx
from torch import nn

from ..errors import UnsupportedModelError
from ..opaque import RUNTIME_GUARDS, autowrap_modules, is_opaque_leaf, known_length


class _RunnerTracer(fx.Tracer):
    def __init__(self, leaves: set[int]) -> None:
        super().__init__(autowrap_modules=autowrap_modules(), autowrap_functions=tuple(RUNTIME_GUARDS))
        self.leaves = leaves

    def iter(self, obj: fx.Proxy):
        count = known_length(obj.node)
        return iter([obj[i] for i in range(count)]) if count is not None else super().iter(obj)

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return id(m) in self.leaves or is_opaque_leaf(m) or super().is_leaf_module(m, qualified_name)


def _trace(runner: nn.Module, units: list[nn.Module], where: str) -> fx.Graph:
    leaves = {id(child) for unit in units for child in unit.children()}
    params = list(inspect.signature(runner.forward).parameters.values())[1:]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        return _RunnerTracer(leaves).trace(runner, concrete_args=defaults)
    except Exception as exc:  # fx raises many types; the cause is chained
        raise UnsupportedModelError(
            f"{where}: its blocks' residual adds are in {type(runner).__name__}.forward, which torch.fx could not "
            f"trace: {exc}"
        ) from exc


def _inside(node: fx.Node, unit: str) -> bool:
    return node.op in ("call_module", "get_attr") and (node.target == unit or node.target.startswith(unit + "."))


def _cut(nodes: list[fx.Node], index: dict[fx.Node, int], start: fx.Node, last: int) -> fx.Node | None:
    """The first node at or after position ``last`` through which everything since ``start`` flows."""
    for position in range(max(last, index[start] + 1), len(nodes)):
        node = nodes[position]
        live = {n for n in nodes[index[start] : position + 1] if any(index[u] > position for u in n.users)}
        if live == {node}:
            return node
    return None


def segments(graph: fx.Graph, units: list[str], where: str) -> list[tuple[fx.Node, list[fx.Node], fx.Node]]:
    """``(stream in, nodes, stream out)`` of each unit (names relative to the runner), in order."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    members = [[n for n in nodes if _inside(n, u)] for u in units]
    calls = [[n for n in m if n.op == "call_module"] for m in members]
    if any(not c for c in calls):
        missing = next(u for u, c in zip(units, calls) if not c)
        raise UnsupportedModelError(f"{where}.{missing}: expected its modules to run in the runner's forward")
    stream = calls[0][0].args[0] if calls[0][0].args else None
    if not isinstance(stream, fx.Node):
        raise UnsupportedModelError(f"{where}.{units[0]}: expected it to be called on the token stream")
    found = []
    for unit, member in zip(units, members):
        end = _cut(nodes, index, stream, max(index[n] for n in member))
        if end is None or end.op == "output":
            raise UnsupportedModelError(
                f"{where}.{unit}: expected the tokens to leave it as one tensor, found values of it used after "
                "the blocks (per-block outputs collected?)"
            )
        body = nodes[index[stream] + 1 : index[end] + 1]
        for node in body:
            outside = [a for a in node.all_input_nodes if a is not stream and a not in body]
            if outside or node.op == "placeholder" or (node.op == "get_attr" and not _inside(node, unit)):
                raise UnsupportedModelError(
                    f"{where}.{unit}: expected its computation to read only the token stream and its own "
                    f"parameters, found {node.format_node()}"
                )
        found.append((stream, body, end))
        stream = end
    return found


def _unit_module(unit: nn.Module, name: str, body: list[fx.Node], stream: fx.Node, end: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env = {stream: graph.placeholder("x")}
    for node in body:
        copied = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            copied.target = node.target[len(name) + 1 :]
        env[node] = copied
    graph.output(env[end])
    return fx.GraphModule(unit, graph, class_name=type(unit).__name__)


def restructure(model: nn.Module, runner_name: str, unit_names: tuple[str, ...], where: str) -> None:
    """Replace, in ``model`` (a copy), the runner by a graph that calls each unit as a block."""
    runner = model.get_submodule(runner_name)
    relative = [u[len(runner_name) + 1 :] if runner_name else u for u in unit_names]
    units = [runner.get_submodule(r) for r in relative]
    graph = _trace(runner, units, f"{where}.{runner_name}")
    found = segments(graph, relative, f"{where}.{runner_name}")
    replaced = {end: (r, stream) for r, (stream, _, end) in zip(relative, found)}
    dropped = {n for _, body, _ in found for n in body}
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in replaced:
            name, stream = replaced[node]
            env[node] = new.call_module(name, (env[stream],))
        elif node not in dropped:
            env[node] = new.node_copy(node, lambda n: env[n])
    gm = fx.GraphModule(runner, new, class_name=type(runner).__name__)
    for r, unit, (stream, body, end) in zip(relative, units, found):
        gm.set_submodule(r, _unit_module(unit, r, body, stream, end))
    _keep_order(gm, runner)
    gm.train(runner.training)
    model.set_submodule(runner_name, gm)


def _keep_order(gm: nn.Module, original: nn.Module) -> None:
    """Submodules in the original's order, so ``state_dict`` lists keys as before."""
    order = {key: i for i, key in enumerate(original._modules)}
    gm._modules = dict(sorted(gm._modules.items(), key=lambda item: order.get(item[0], len(order))))
    for name, child in gm._modules.items():
        source = original._modules.get(name)
        if source is not None and child is not source and not isinstance(child, fx.GraphModule):
            _keep_order(child, source)
