"""The smallest Q/DQ ONNX: x -> QuantizeLinear -> DequantizeLinear -> y, with the zero point asked for."""

from __future__ import annotations

from pathlib import Path


def qdq_onnx(path: Path, zero_point: int = 0) -> Path:
    """Symmetric int8 (zero point 0) by default; any other zero point is asymmetric uint8, as ONNX Runtime's u8 scheme."""
    import onnx
    from onnx import TensorProto, helper

    zero = helper.make_tensor("z", TensorProto.INT8 if zero_point == 0 else TensorProto.UINT8, [], [zero_point])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), zero],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path
