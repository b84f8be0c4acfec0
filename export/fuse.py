"""Export-time ONNX rewrites that hand ONNX Runtime one fused op where the trace left a chain of small ones.

The traced graphs spell RMSNorm as `x * pow(mean(x^2) + eps, -0.5) * w` and tanh-GELU as nine elementwise
nodes; ORT's own fusions look for other spellings (sqrt / reciprocal), so on a small model every decode
step pays for hundreds of tiny kernels. This pass rewrites the chains in place (fp32 graphs only: ORT's
CPU FastGelu has no fp16 kernel):

    Pow(x, 2) -> ReduceMean(-1) -> Add(eps) -> Pow(-0.5) -> Mul(x) -> Mul(w)  =>  SimplifiedLayerNormalization
    x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))                      =>  com.microsoft FastGelu

ORT then fuses the residual Add before each norm into SkipSimplifiedLayerNormalization. The math is
the same; rounding differs in the last bits (export/verify.py checks every graph against PyTorch after).
It knows nothing of the model: a chain whose intermediate values are used elsewhere is left alone.
"""

from __future__ import annotations

import itertools
import math

import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
GELU_C = math.sqrt(2 / math.pi)  # 0.7978845608


class _Graph:
    """Who produces and who consumes each value, and the scalar constants."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.consts = {i.name: i for i in graph.initializer}  # name -> TensorProto, read only when asked
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = n.attribute[0].t
            elif n.op_type == "Identity" and n.input[0] in self.consts:  # a weight the trace shares
                self.consts[n.output[0]] = self.consts[n.input[0]]
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def scalar(self, name: str, value: float | None = None, tol: float = 1e-6) -> float | None:
        tensor = self.consts.get(name)
        if tensor is None or math.prod(tensor.dims) != 1:
            return None
        v = float(numpy_helper.to_array(tensor).reshape(()))
        return v if value is None or abs(v - value) <= tol else None

    def is_vector(self, name: str) -> bool:
        return name in self.consts and len(self.consts[name].dims) == 1

    def made(self, name: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def sole_use(self, name: str, op: str) -> onnx.NodeProto | None:
        """The one consumer of `name` when it has exactly one and it is an `op` (and name is internal)."""
        users = self.consumers.get(name, [])
        if name in self.outputs or len(users) != 1 or users[0].op_type != op:
            return None
        return users[0]

    def other_input(self, node: onnx.NodeProto, name: str) -> str:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else ""


def fuse(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite `model` in place; returns how many chains of each kind were replaced."""
    g = _Graph(model.graph)
    fused = [c for c in (_rms_norm(g, n) or _gelu(g, n) for n in model.graph.node) if c]
    if not fused:
        return {"rms_norm": 0, "gelu": 0}
    last = {id(chain[-1]): node for chain, node in fused}  # where the chain's output was made
    dead = {id(n) for chain, _ in fused for n in chain}
    nodes = []
    for n in model.graph.node:
        if id(n) not in dead:
            nodes.append(n)
        elif id(n) in last:
            nodes.append(last[id(n)])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if any(node.domain == MS_DOMAIN for _, node in fused) and not any(
        o.domain == MS_DOMAIN for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    counts = {"rms_norm": 0, "gelu": 0}
    for _, node in fused:
        counts["gelu" if node.domain == MS_DOMAIN else "rms_norm"] += 1
    return counts


def _rms_norm(g: _Graph, pow_half: onnx.NodeProto) -> tuple[list, onnx.NodeProto] | None:
    """Anchored on Pow(., -0.5); only the weighted form (a 1-D weight initializer or constant)."""
    if pow_half.op_type != "Pow" or g.scalar(pow_half.input[1], -0.5) is None:
        return None
    add = g.made(pow_half.input[0], "Add")
    eps = g.scalar(add.input[1]) if add else None
    mean = g.made(add.input[0], "ReduceMean") if add else None
    square = g.made(mean.input[0], "Pow") if mean else None
    if eps is None or square is None or g.scalar(square.input[1], 2.0) is None or not _last_axis(mean):
        return None
    x = square.input[0]
    scale = g.sole_use(pow_half.output[0], "Mul")
    weight = g.sole_use(scale.output[0], "Mul") if scale and x in scale.input else None
    w = g.other_input(weight, scale.output[0]) if weight else ""
    if not w or not g.is_vector(w):
        return None
    chain = [square, mean, add, pow_half, scale, weight]
    if any(g.sole_use(a.output[0], b.op_type) is not b for a, b in itertools.pairwise(chain[1:5])):
        return None
    if g.sole_use(square.output[0], "ReduceMean") is not mean:
        return None
    node = helper.make_node(
        "SimplifiedLayerNormalization", [x, w], [weight.output[0]], name=f"{pow_half.name}/fused_rms_norm",
        axis=-1, epsilon=eps, stash_type=1,
    )  # fmt: skip
    return chain, node


def _last_axis(mean: onnx.NodeProto) -> bool:
    axes = next((helper.get_attribute_value(a) for a in mean.attribute if a.name == "axes"), None)
    keep = next((helper.get_attribute_value(a) for a in mean.attribute if a.name == "keepdims"), 1)
    return axes == [-1] and keep == 1 and len(mean.input) == 1


def _gelu(g: _Graph, tanh: onnx.NodeProto) -> tuple[list, onnx.NodeProto] | None:
    """Anchored on the Tanh of torch's tanh-GELU (opset 17 trace):
    x2 = x*x; x3 = x*x2; inner = x + 0.044715*x3; t = tanh(c*inner); y = 0.5 * (x * (1 + t))."""
    if tanh.op_type != "Tanh":
        return None
    scaled = g.made(tanh.input[0], "Mul")
    inner = g.made(g.other_input(scaled, _const_input(g, scaled, GELU_C)), "Add") if scaled else None
    cube_term = next((g.made(i, "Mul") for i in inner.input if g.made(i, "Mul")), None) if inner else None
    x = g.other_input(inner, cube_term.output[0]) if cube_term else ""
    cube = g.made(g.other_input(cube_term, _const_input(g, cube_term, 0.044715)), "Mul") if x else None
    square = g.made(g.other_input(cube, x), "Mul") if cube else None
    if square is None or list(square.input) != [x, x]:
        return None
    one = g.sole_use(tanh.output[0], "Add")
    times_x = g.sole_use(one.output[0], "Mul") if one and _const_input(g, one, 1.0) else None
    half = g.sole_use(times_x.output[0], "Mul") if times_x and x in times_x.input else None
    if half is None or not _const_input(g, half, 0.5):
        return None
    chain = [square, cube, cube_term, inner, scaled, tanh, one, times_x, half]
    name = f"{tanh.name}/fused_gelu"
    node = helper.make_node("FastGelu", [x], [half.output[0]], name=name, domain=MS_DOMAIN)
    return chain, node


def _const_input(g: _Graph, node: onnx.NodeProto, value: float) -> str:
    """The input of `node` that is the scalar constant `value` (fp32 rounding allowed), or ''."""
    return next((i for i in node.input if g.scalar(i, value, tol=1e-6 * max(1, abs(value))) is not None), "")
