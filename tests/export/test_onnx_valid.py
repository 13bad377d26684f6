"""Every .onnx the exporter writes passes onnx.checker's full check; the build refuses one that does not.

The fp16 converter used to append the fp32 -> fp16 input Casts after the nodes that read them ("Nodes in a
graph must be topologically sorted ... graph_input_cast_1"): ONNX Runtime ran the files, other tools refused them.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from export import onnx_export
from export.build import main
from export.onnx_export import InvalidOnnxError, topological_sort
from runtime.bundle import load_manifest


@pytest.mark.parametrize("bundle", ["bundle_fp32", "bundle_fp16"])
def test_every_component_passes_the_full_check(bundle, request):
    path = request.getfixturevalue(bundle)
    manifest = load_manifest(path)
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for component in manifest.components.values():
        onnx.checker.check_model(str(path / component.file), full_check=True)  # the path form: external data too


def _unsorted_graph() -> onnx.ModelProto:
    """y = Relu(Cast(x)), with the Cast appended last, as the fp16 converter wrote its input casts."""
    relu = helper.make_node("Relu", ["x16"], ["y"], name="relu")
    cast = helper.make_node("Cast", ["x"], ["x16"], name="graph_input_cast_0", to=TensorProto.FLOAT16)
    graph = helper.make_graph(
        [relu, cast],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_topological_sort_moves_a_cast_before_its_readers():
    model = _unsorted_graph()
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model, full_check=True)
    topological_sort(model.graph)
    assert [n.name for n in model.graph.node] == ["graph_input_cast_0", "relu"]
    onnx.checker.check_model(model, full_check=True)
    before = [n.name for n in model.graph.node]
    topological_sort(model.graph)  # a sorted graph is left as it is
    assert [n.name for n in model.graph.node] == before


def test_a_build_whose_onnx_fails_the_check_writes_nothing(tiny_model, tmp_path, monkeypatch, capsys):
    """Without the sort the fp16 UNet is invalid: the build stops with one line naming the check, and no bundle."""
    monkeypatch.setattr(onnx_export, "topological_sort", lambda graph: None)
    code = main(["--model", str(tiny_model), "--out", str(tmp_path / "b"), "--precision", "fp16", "--pipelines", "txt2img"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: unet: the exported model.onnx fails onnx.checker's full check (Nodes in a graph must be topologically")
    assert "nothing was written" in err and not list(tmp_path.iterdir())


def test_the_check_names_the_file_and_raises_its_own_error(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(_unsorted_graph(), str(path))
    with pytest.raises(InvalidOnnxError, match=r"^unet: the exported model.onnx fails onnx.checker's full check"):
        onnx_export.check_onnx(path, "unet")
