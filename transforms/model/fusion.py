"""Fuse two model heads into one graph so both come from one forward pass.

TF2 SavedModels expose the classification and the feature-vector heads as
separate functions (two callables in the /4-/5 layout, two signatures in a
TF2 export of the /3 layout). Calling both runs the backbone twice. Here each
function is frozen (variables become constants, calls are inlined), the two
graphs are merged, and identical nodes (same op, attributes, constant values
and inputs) are collapsed, the way common-subexpression elimination works.
Because both heads read the same backbone weights, the whole backbone
collapses to one copy and only the heads stay apart.

`fuse_heads` notes how many convolutions were shared, so callers can tell
(and record) whether the fusion really gave one pass. Its result, like every
frozen graph here, can be cached on disk and loaded without the SavedModels.
"""
from __future__ import annotations

import dataclasses
import hashlib

_INPUT = "fused_input"


@dataclasses.dataclass
class FrozenGraph:
    """A frozen inference graph: one float image input, named outputs.

    Serializable (see `to_bytes`), so a fused model can be cached on disk and
    loaded again without the SavedModels it came from.
    """
    graph_def: object  # tf.compat.v1.GraphDef
    input_name: str  # tensor name, e.g. "fused_input:0"
    output_names: list[str]
    note: str  # how the outputs are computed, for the record
    weights_sha256: str  # of the weights it was made from

    def function(self):
        """A ConcreteFunction: images -> tuple of outputs."""
        import tensorflow as tf

        def _import():
            tf.graph_util.import_graph_def(self.graph_def, name="")

        wrapped = tf.compat.v1.wrap_function(_import, [])
        return wrapped.prune(feeds=[self.input_name], fetches=self.output_names)

    def to_bytes(self) -> tuple[bytes, dict]:
        return (self.graph_def.SerializeToString(),
                {"input_name": self.input_name,
                 "output_names": self.output_names, "note": self.note,
                 "weights_sha256": self.weights_sha256})

    @classmethod
    def from_bytes(cls, data: bytes, info: dict) -> "FrozenGraph":
        import tensorflow as tf
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(data)
        return cls(graph_def, info["input_name"], list(info["output_names"]),
                   info["note"], info["weights_sha256"])


def freeze(concrete_function):
    """The function with variables as constants and all calls inlined."""
    from tensorflow.python.framework.convert_to_constants import \
        convert_variables_to_constants_v2
    return convert_variables_to_constants_v2(concrete_function)


def freeze_graph(concrete_function, note: str, weights_sha256: str) -> FrozenGraph:
    """Freeze a one-input function that already computes every output."""
    frozen = freeze(concrete_function)
    if len(frozen.inputs) != 1:
        raise ValueError(f"expected one image input, got {len(frozen.inputs)}")
    return FrozenGraph(frozen.graph.as_graph_def(), frozen.inputs[0].name,
                       [t.name for t in frozen.outputs], note, weights_sha256)


def _topological(graph_def):
    by_name = {n.name: n for n in graph_def.node}
    seen, order = set(), []
    for root in by_name:
        stack = [(root, False)]
        while stack:
            name, expanded = stack.pop()
            if expanded:
                order.append(by_name[name])
                continue
            if name in seen:
                continue
            seen.add(name)
            stack.append((name, True))
            for inp in by_name[name].input:
                src = inp.lstrip("^").split(":")[0]
                if src not in seen:
                    stack.append((src, False))
    return order


def _is_convolution(node) -> bool:
    return node.op in ("Conv2D", "DepthwiseConv2dNative", "_FusedConv2D")


def merge_graphs(graphs):
    """Merge frozen GraphDefs that share one float image input.

    graphs: [(graph_def, input_name, [output tensor names])].
    Returns (merged GraphDef, [[merged output names] per graph]).
    """
    import tensorflow as tf

    merged = tf.compat.v1.GraphDef()
    node_by_key: dict[str, str] = {}
    outputs = []
    for index, (graph_def, input_name, output_names) in enumerate(graphs):
        renamed: dict[str, str] = {}
        for node in _topological(graph_def):
            inputs = []
            for inp in node.input:
                control = inp.startswith("^")
                src, _, port = inp.lstrip("^").partition(":")
                inputs.append(("^" if control else "") + renamed[src] +
                              (f":{port}" if port else ""))
            if node.name == input_name:
                key = _INPUT  # every graph's image input is the same tensor
            else:
                # Control inputs and "_" attributes (colocation, shapes) only
                # order or annotate; inlining gives each graph its own, so
                # they would keep identical computations apart.
                attrs = sorted(
                    (k, v.SerializeToString(deterministic=True))
                    for k, v in node.attr.items() if not k.startswith("_"))
                data_inputs = [i for i in inputs if not i.startswith("^")]
                key = hashlib.sha256(repr(
                    (node.op, node.device, data_inputs, attrs)).encode()
                ).hexdigest()
            if key not in node_by_key:
                new = merged.node.add()
                new.CopyFrom(node)
                new.name = _INPUT if key == _INPUT else f"g{index}/{node.name}"
                del new.input[:]
                new.input.extend(inputs)
                if "_class" in new.attr:  # names nodes by their old names
                    del new.attr["_class"]
                node_by_key[key] = new.name
            renamed[node.name] = node_by_key[key]
        outputs.append([
            renamed[name.split(":")[0]] + ":" +
            (name.split(":")[1] if ":" in name else "0")
            for name in output_names])
    return merged, outputs


def fuse_heads(functions, weights_sha256: str) -> FrozenGraph:
    """One graph computing every given single-input function's output.

    functions: ConcreteFunctions taking one float32 image batch; each must
    return one tensor. The graph's outputs keep their order.
    """
    graphs, before = [], 0
    for fn in functions:
        frozen = freeze(fn)
        graph_def = frozen.graph.as_graph_def()
        if len(frozen.inputs) != 1 or len(frozen.outputs) != 1:
            raise ValueError(
                "head fusion needs functions of one input and one output, got "
                f"{len(frozen.inputs)} inputs and {len(frozen.outputs)} outputs")
        before += sum(_is_convolution(n) for n in graph_def.node)
        graphs.append((graph_def, frozen.inputs[0].op.name,
                       [frozen.outputs[0].name]))
    merged, outputs = merge_graphs(graphs)
    after = sum(_is_convolution(n) for n in merged.node)
    if after < before:
        note = (f"one pass: heads fused into one graph ({after} of {before} "
                "convolutions kept)")
    else:
        note = "two passes: the heads share no computation"
    return FrozenGraph(merged, f"{_INPUT}:0", [names[0] for names in outputs],
                       note, weights_sha256)
