"""hrnet_fast.export_onnx: the fused plan and the plain reference as ONNX, run in ONNX Runtime
against the reference, with a free batch dimension."""
import pytest
import torch

from hrnet_fast import HRNetConfig, export_onnx
from hrnet_fast.reference import HighResolutionNet
from helpers import randomize_bn, rel_err

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e "
                          "'.[peers]'): ONNX export is NOT tested")
onnx = pytest.importorskip("onnx", reason="onnx not installed: ONNX export is NOT tested")


def _ops(path):
    return [n.op_type for n in onnx.load(path).graph.node]


def _channel_concats(path):
    """The channel counts of the Concat nodes along the channel axis (1): activations, not the 1-D
    shape vectors that the exporter concatenates for Resize sizes (axis 0)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path), data_prop=True)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    return [dims[n.output[0]][1] for n in model.graph.node if n.op_type == "Concat"
            and any(a.name == "axis" and a.i == 1 for a in n.attribute)]


@pytest.mark.parametrize("head,mode", [("seg", "bilinear"), ("seg", "mmseg"), ("pose", "nearest"),
                                       ("features", "bilinear")])
def test_fused_and_plain_exports_match_the_reference(tmp_path, head, mode):
    kw = {"num_classes": 17} if head == "pose" else {}
    model = randomize_bn(HighResolutionNet(HRNetConfig.preset("w18_small_v1", head=head,
                                                              upsample=mode, **kw))).eval()
    size = (67, 91)  # odd: the mmseg two-step resize is in the graph
    fused = export_onnx(model, tmp_path / "fused.onnx", input_size=size)
    plain = export_onnx(model, tmp_path / "plain.onnx", input_size=size, fused=False)
    x = torch.randn(3, 3, *size)  # exported with batch 1: the batch dimension is free
    with torch.no_grad():
        want = model(x)
    want = want if isinstance(want, list) else [want]
    for path in (fused, plain):
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
        assert rel_err([torch.from_numpy(g) for g in got], want) < 1e-5, path
    fused_ops, plain_ops = _ops(fused), _ops(plain)
    assert "BatchNormalization" not in fused_ops
    assert fused_ops.count("Conv") < plain_ops.count("Conv")  # batched fuse convs
    if head == "seg":  # the reference head concatenates all 240 channels; the fused one only
        # branch 0 with the branches narrower than half of that (16 + 32 + 64), resized first
        assert _channel_concats(plain) == [240] and _channel_concats(fused) == [112]
    else:
        assert not _channel_concats(fused)


def test_export_refuses_what_it_cannot_export(tmp_path):
    model = HighResolutionNet(HRNetConfig.preset("w18_small_v1"))
    with pytest.raises(ValueError, match="eval-mode"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(64, 64))
    with pytest.raises(ValueError, match="float32 or float16"):
        export_onnx(model.eval(), tmp_path / "m.onnx", input_size=(64, 64), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="hrnet_fast HRNet"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "m.onnx", input_size=(64, 64))
