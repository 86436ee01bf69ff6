"""ONNX export of the fused engine (the plan's folded convs, batched fuse convs and head rewrite),
checked in ONNX Runtime against the reference; the export leaves the process's fast paths alone."""
import warnings

import pytest
import torch

from hrnet_fast import HRNetConfig, optimize
from hrnet_fast.backends import torch_cpu
from hrnet_fast.reference import HighResolutionNet
from helpers import randomize_bn, rel_err


@pytest.mark.parametrize("head", ["seg", "pose"])
def test_engine_exports_to_onnx_and_runs_in_onnxruntime(tmp_path, head):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e "
                              "'.[peers]'): the ONNX export check is NOT tested")
    pytest.importorskip("onnx", reason="onnx not installed: the ONNX export check is NOT tested")
    kw = {"num_classes": 17} if head == "pose" else {}
    model = randomize_bn(HighResolutionNet(HRNetConfig.preset("w18_small_v1", head=head, **kw))).eval()
    engine = optimize(model, backend="torch")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = engine(x)
        path = str(tmp_path / "engine.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(engine, (x,), path, dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"])
        want = model(x)
        after = engine(x)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert rel_err(torch.from_numpy(got), want) < 1e-5
    # The export took the portable path; ordinary calls keep oneDNN and give the same bits.
    assert torch_cpu.onednn_available() and torch.equal(before, after)
