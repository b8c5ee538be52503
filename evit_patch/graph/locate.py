"""Find, in a traced block, where EViT's reorganization goes. Matching only: no graph edits, no
counting (``cost.py`` counts what the match names).

The questions are structural, so harmless variants (Identity norms, LayerScale, drop-path,
fused or manual attention, post-norm blocks) need no special cases:

- the attention op: the block's one ``scaled_dot_product_attention`` call, else its one softmax
  (function, method or ``nn.Softmax`` module), between ``q @ k^T`` and ``probs @ v`` (``matmul``,
  ``@``, ``bmm`` or ``einsum``);
- the attention residual add: the first add downstream of that op whose other operand feeds the
  attention (the residual stream) rather than coming out of it;
- a point between attention and MLP exists: every projection of the block runs either before
  that add or after it (a parallel block computes its MLP beside the attention instead);
- a position bias: an attention mask (or a term added to the logits) computed without the
  tokens, such as BEiT's relative position bias; a mask that depends on the tokens is refused.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..opaque import is_opaque_leaf
from .reorganizer import ScoreSource

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.Tensor.softmax}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_EINSUM = {torch.einsum, torch.functional.einsum}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, *_EINSUM}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}


@dataclass(frozen=True)
class BlockSite:
    """What the locator found in one block (node references are valid for that graph only)."""

    where: str
    source: ScoreSource
    attention: fx.Node
    """The attention op (SDPA call or softmax)."""
    score_inputs: tuple[fx.Node, ...]
    """``(q, k)`` for fused attention, ``(probs,)`` for manual attention."""
    scale: float | None
    residual_add: fx.Node
    bias: fx.Node | None
    """A position bias the attention adds to its logits (indexed by original token position)."""
    bias_user: fx.Node | None
    """The node that reads ``bias`` (the SDPA call, or the add before the softmax)."""
    before: tuple[fx.Node, ...]
    """Projections on the tokens before the residual add (they see every token)."""
    after: tuple[fx.Node, ...]
    """Projections after it (they see the reorganized tokens)."""
    tables: tuple[fx.Node, ...] = ()
    """Projections that never see the tokens (a relative-position MLP): a fixed cost per call."""
    keys: fx.Node | None = None
    """The attention's keys, ``(B, H, N, D)``; for manual attention the ``k^T`` operand of
    ``q @ k^T``, ``(B, H, D, N)`` (``keys_transposed``). Token merging compares them."""
    keys_transposed: bool = False
    logits: fx.Node | None = None
    """Manual attention: ``q @ k^T``, the last matmul before the softmax."""
    mixes: fx.Node | None = None
    """Manual attention: ``probs @ v``, the first matmul after the softmax."""
    queries: fx.Node | None = None
    """Manual attention: the ``q`` operand of ``q @ k^T``, ``(B, H, N, D)`` (for counting)."""
    values: fx.Node | None = None
    """Manual attention: the ``v`` operand of ``probs @ v``, ``(B, H, N, D)`` (for counting)."""


def _is_call(node: fx.Node, functions: set, methods: set[str]) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _reachable(node: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.users)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.all_input_nodes)


def _softmax_module(node: fx.Node) -> nn.Softmax | None:
    if node.op != "call_module" or node.graph.owning_module is None:
        return None
    module = node.graph.owning_module.get_submodule(node.target)
    return module if isinstance(module, nn.Softmax) else None


def _attention_op(graph: fx.Graph, where: str) -> tuple[ScoreSource, fx.Node]:
    nodes = list(graph.nodes)
    fused = [n for n in nodes if n.op == "call_function" and n.target in _SDPA]
    manual = [n for n in nodes if _is_call(n, _SOFTMAX_FUNCTIONS, {"softmax"}) or _softmax_module(n) is not None]
    if len(fused) == 1:
        return ScoreSource.QUERY_KEY, fused[0]
    if not fused and len(manual) == 1:
        return ScoreSource.PROBABILITIES, manual[0]
    found = len(fused) or len(manual)
    hint = " (parallel branches, or differential attention)" if found > 1 else _opaque_attention(graph)
    raise UnsupportedModelError(
        f"{where}: expected exactly one attention op (scaled_dot_product_attention or softmax) "
        f"in the block, found {found}" + hint
    )


def _opaque_attention(graph: fx.Graph) -> str:
    """Why no attention op was seen: an ``nn.MultiheadAttention`` is an opaque leaf to fx."""
    owner = graph.owning_module
    calls = [n for n in graph.nodes if n.op == "call_module" and owner is not None]
    opaque = [n.target for n in calls if isinstance(owner.get_submodule(n.target), nn.MultiheadAttention)]
    if not opaque:
        return ""
    return (
        f" (nn.MultiheadAttention at {opaque[0]!r} is opaque to torch.fx: a family re-expresses it on the same "
        "parameters in prepare_block with evit_patch.families.mha.with_sdpa_attention, as torchvision's does)"
    )


def _check_fused_call(op: fx.Node, where: str) -> tuple[tuple[fx.Node, fx.Node], float | None]:
    q, k = _arg(op, 0, "query"), _arg(op, 1, "key")
    causal = _arg(op, 5, "is_causal", False)
    scale, gqa = op.kwargs.get("scale"), op.kwargs.get("enable_gqa", False)
    if causal is not False or gqa is not False:
        raise UnsupportedModelError(
            f"{where}: expected non-causal, non-grouped attention, found is_causal={causal}, enable_gqa={gqa}"
        )
    if scale is not None and not isinstance(scale, (int, float)):
        raise UnsupportedModelError(f"{where}: expected a constant attention scale, found {scale}")
    if not isinstance(q, fx.Node) or not isinstance(k, fx.Node):
        raise UnsupportedModelError(f"{where}: attention query/key are not graph values")
    return (q, k), scale


def _check_softmax(op: fx.Node, where: str) -> None:
    module = _softmax_module(op)
    dim = module.dim if module is not None else _arg(op, 1, "dim")
    if dim not in (-1, 3):
        raise UnsupportedModelError(
            f"{where}: expected the attention softmax over the last (key) dimension, found dim={dim}"
        )


def _einsum_operands(node: fx.Node) -> tuple[list[str], str, list]:
    """``(input subscripts, output subscripts, operands)`` of an ``einsum`` node (either call form)."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    inputs, _, output = str(equation).replace(" ", "").partition("->")
    return inputs.split(","), output, operands


def logits_operands(logits: fx.Node) -> tuple[fx.Node | None, fx.Node | None, bool]:
    """``(q, k, transposed)`` of the ``q @ k^T`` node: ``k`` as the node holds it, ``(B, H, N, D)``, or
    ``(B, H, D, N)`` when ``transposed``; ``None`` where the layout is not one of these."""
    if logits.target not in _EINSUM:
        operand = _arg(logits, 1, "other") if logits.op == "call_function" else logits.args[1]
        return logits.args[0], operand if isinstance(operand, fx.Node) else None, True
    subscripts, output, operands = _einsum_operands(logits)
    if len(output) != 4 or len(subscripts) != 2:
        return None, None, False
    query_index, key_index = output[2], output[3]
    q = k = None
    transposed = False
    for letters, operand in zip(subscripts, operands):
        if len(letters) != 4 or letters[:2] != output[:2]:
            continue
        if letters[2] == query_index:
            q = operand
        elif key_index in letters[2:]:
            k, transposed = operand, letters[3] == key_index
    return q, k, transposed


def mixes_values(mixes: fx.Node, probs: fx.Node) -> fx.Node | None:
    """The ``v`` operand of the ``probs @ v`` node (the operand that does not come from ``probs``)."""
    operands = _einsum_operands(mixes)[2] if mixes.target in _EINSUM else list(mixes.args[:2])
    fed = _descendants(probs) | {probs}
    others = [o for o in operands if isinstance(o, fx.Node) and o not in fed]
    return others[0] if len(others) == 1 else None


def tokens_input(graph: fx.Graph) -> fx.Node:
    """The block's token input: its first placeholder."""
    return next(n for n in graph.nodes if n.op == "placeholder")


@dataclass(frozen=True)
class _Neighbourhood:
    """The attention op's surroundings, searched once: what feeds it, what it feeds, and (manual
    attention) its ``q @ k^T`` and ``probs @ v`` matmuls."""

    feeding: frozenset[fx.Node]
    fed: frozenset[fx.Node]
    logits: fx.Node | None
    mixes: fx.Node | None

    @classmethod
    def of(cls, op: fx.Node, source: ScoreSource) -> _Neighbourhood:
        feeding, fed = frozenset(_ancestors(op)), frozenset(_descendants(op))
        logits = mixes = None
        if source is ScoreSource.PROBABILITIES:
            matmuls = [n for n in op.graph.nodes if _is_call(n, _MATMUL_FUNCTIONS, _MATMUL_METHODS)]
            logits = next((n for n in reversed(matmuls) if n in feeding), None)
            mixes = next((n for n in matmuls if n in fed), None)
        return cls(feeding, fed, logits, mixes)


def _position_bias(
    source: ScoreSource, op: fx.Node, around: _Neighbourhood, where: str
) -> tuple[fx.Node | None, fx.Node | None]:
    """``(bias, user)``: the attention's additive term that does not depend on the tokens."""
    tokens = tokens_input(op.graph)
    if source is ScoreSource.QUERY_KEY:
        mask = _arg(op, 3, "attn_mask")
        candidates = [(mask, op)] if mask is not None else []
    else:
        feeding = around.feeding | {op}
        after_logits = _descendants(around.logits) if around.logits is not None else set()
        candidates = [
            (term, node)
            for node in op.graph.nodes
            if node in feeding and node in after_logits and _is_call(node, _ADD_FUNCTIONS, {"add", "__add__"})
            for term in node.args[:2]
            if isinstance(term, fx.Node) and term not in after_logits and term is not around.logits
        ]
    if not candidates:
        return None, None
    bias, user = candidates[0]
    if len(candidates) > 1 or not isinstance(bias, fx.Node) or tokens in _ancestors(bias):
        raise UnsupportedModelError(
            f"{where}: expected attention without a mask, or with one position bias computed without "
            f"the tokens (as BEiT's relative position bias), found {[str(c) for c, _ in candidates]} "
            "(a mask that depends on the input cannot follow reorganized tokens)"
        )
    return bias, user


def _residual_add(op: fx.Node, around: _Neighbourhood, where: str) -> fx.Node:
    downstream = around.fed | {op}
    for node in op.graph.nodes:
        if node not in downstream or not _is_call(node, _ADD_FUNCTIONS, {"add", "__add__"}):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        branch = [a for a in operands if a in downstream]
        skip = [a for a in operands if a not in downstream and (a in around.feeding)]
        if len(branch) == 1 and len(skip) == 1:
            return node
    raise UnsupportedModelError(
        f"{where}: expected a residual add of the block input and the attention branch (x + attn(...)), found none"
    )


def linear_core(module: nn.Module | None) -> nn.Linear | None:
    """The ``nn.Linear`` a projection module computes: the module itself, or the base layer of an
    adapter kept as a leaf (peft's LoRA ``Linear``, whose low-rank update rides on it)."""
    if isinstance(module, nn.Linear):
        return module
    base = getattr(module, "get_base_layer", None) if module is not None and is_opaque_leaf(module) else None
    core = base() if callable(base) else None
    return core if isinstance(core, nn.Linear) else None


def is_projection(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An ``nn.Linear`` call (or an adapter around one), or an ``F.linear`` with a stored weight:
    what the cost model counts."""
    if node.op == "call_module":
        return linear_core(modules.get(node.target)) is not None
    if node.op == "call_function" and node.target is F.linear:
        weight = _arg(node, 1, "weight")
        return isinstance(weight, fx.Node) and weight.op == "get_attr"
    return False


def _projections(
    gm: fx.GraphModule, op: fx.Node, add: fx.Node, around: _Neighbourhood, where: str
) -> tuple[tuple[fx.Node, ...], tuple[fx.Node, ...], tuple[fx.Node, ...]]:
    """``(before, after, tables)``: projections on the tokens before and after the add, and those
    that never see the tokens (a position-bias MLP); refuse parallel blocks."""
    modules = dict(gm.named_modules())
    before, after = _ancestors(add), _descendants(add)
    value_path = _ancestors(around.mixes) if around.mixes is not None else set()
    attention_path = around.feeding | around.fed | value_path
    on_tokens = _descendants(tokens_input(gm.graph))
    found: dict[str, list[fx.Node]] = {"before": [], "after": [], "tables": []}
    for node in gm.graph.nodes:
        if not is_projection(node, modules):
            continue
        if node not in on_tokens:
            found["tables"].append(node)
        elif node in after:
            found["after"].append(node)
        elif node in before and node in attention_path:
            found["before"].append(node)
        else:
            raise UnsupportedModelError(
                f"{where}: expected the MLP to run after the attention residual add, but "
                f"{node.target} runs beside the attention (a parallel block has no point "
                "between attention and MLP)"
            )
    if not found["after"]:
        raise UnsupportedModelError(
            f"{where}: expected an MLP after the attention residual add, found none "
            "(no point between attention and MLP)"
        )
    return tuple(found["before"]), tuple(found["after"]), tuple(found["tables"])


def locate(gm: fx.GraphModule, *, where: str) -> BlockSite:
    """Locate the attention op, its residual add and the block's projections in a traced block."""
    source, op = _attention_op(gm.graph, where)
    if source is ScoreSource.QUERY_KEY:
        score_inputs, scale = _check_fused_call(op, where)
    else:
        _check_softmax(op, where)
        score_inputs, scale = (op,), None
    around = _Neighbourhood.of(op, source)
    if source is ScoreSource.PROBABILITIES and (around.logits is None or around.mixes is None):
        raise UnsupportedModelError(f"{where}: expected q @ k^T before the attention softmax and probs @ v after it")
    bias, bias_user = _position_bias(source, op, around, where)
    add = _residual_add(op, around, where)
    before, after, tables = _projections(gm, op, add, around, where)
    queries = values = None
    if source is ScoreSource.QUERY_KEY:
        keys, transposed = score_inputs[1], False
    else:
        queries, keys, transposed = logits_operands(around.logits)
        values = mixes_values(around.mixes, op)
    return BlockSite(
        where,
        source,
        op,
        score_inputs,
        scale,
        add,
        bias,
        bias_user,
        before,
        after,
        tables,
        keys,
        transposed,
        around.logits,
        around.mixes,
        queries,
        values,
    )


@dataclass(frozen=True)
class PoolSite:
    """The attention of an attention-pool head (a probe attends over the tokens), where a key
    bias goes: an SDPA call's ``attn_mask``, the logits before one softmax, or the ``attn_mask``
    of an ``nn.MultiheadAttention`` call (kept as a leaf, so the head runs its own code)."""

    where: str
    attention: fx.Node
    like: fx.Node
    """The query (its dtype; for ``nn.MultiheadAttention`` its length too), or the softmax's logits."""
    multihead: nn.MultiheadAttention | None = None
    """The module an ``nn.MultiheadAttention`` call runs; ``None`` for SDPA or a softmax."""

    @property
    def fused(self) -> bool:
        return self.multihead is None and self.attention.target in _SDPA


def locate_pool(gm: fx.GraphModule, *, where: str) -> PoolSite:
    """The one attention of a traced attention-pool head, with no mask of its own (structure only)."""
    modules = dict(gm.named_modules())
    multihead = [
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.MultiheadAttention)
    ]
    if multihead:
        if len(multihead) > 1:
            raise UnsupportedModelError(f"{where}: expected one attention in the pool, found {len(multihead)}")
        op, mha = multihead[0], modules[multihead[0].target]
        given = [name for index, name in ((3, "key_padding_mask"), (5, "attn_mask")) if _arg(op, index, name)]
        if given or not mha.batch_first or _arg(op, 7, "is_causal", False):
            raise UnsupportedModelError(
                f"{where}: expected a batch-first nn.MultiheadAttention called as attn(query, x, x) without "
                f"masks, found batch_first={mha.batch_first}, masks={given}"
            )
        return PoolSite(where, op, _query(op, where), mha)
    source, op = _attention_op(gm.graph, where)
    if source is ScoreSource.QUERY_KEY:
        (like, _), _ = _check_fused_call(op, where)
    else:
        _check_softmax(op, where)
        like = _arg(op, 0, "input")
    bias, _ = _position_bias(source, op, _Neighbourhood.of(op, source), where)
    if bias is not None:
        raise UnsupportedModelError(f"{where}: expected a pooling attention without a mask, found {bias}")
    return PoolSite(where, op, like)


def _query(op: fx.Node, where: str) -> fx.Node:
    query = _arg(op, 0, "query")
    if not isinstance(query, fx.Node):
        raise UnsupportedModelError(f"{where}: the pooling attention's query is not a graph value")
    return query
