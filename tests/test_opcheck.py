"""``torch.library.opcheck`` on every registered op behind the public ops.

On the CPU (the Triton interpreter): the schema and the autograd registration. Fake-tensor and AOT
checks run the op under fake tensors, which have no data for the interpreter to read, so they run
on a GPU only (``test_gpu_opcheck``), as does the CUDA extension's (tests/test_cuda_ext.py)."""
import pytest
import torch

from helpers import DEVICE
from hrnet_fast.kernels import triton_status

pytestmark = pytest.mark.skipif(not triton_status(DEVICE)[0], reason=triton_status(DEVICE)[1])

CPU_CHECKS = ("test_schema", "test_autograd_registration")
GPU_CHECKS = CPU_CHECKS + ("test_faketensor", "test_aot_dispatch_static")


def _rand(*shape, cl=True, dtype=torch.float32):
    t = torch.randn(*shape, device=DEVICE).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t


def _fuse_cases(dtype):
    import hrnet_fast.kernels.upsample_add_relu  # noqa: F401  (registers the op)
    base = _rand(2, 8, 9, 11, dtype=dtype)
    contribs = [_rand(2, 8, 5, 6, dtype=dtype), _rand(2, 8, 9, 11, cl=False, dtype=dtype)]
    op = torch.ops.hrnet_fast.upsample_add_relu_triton.default
    return [(op, (base, contribs, mode, align, True))
            for mode, align in (("bilinear", False), ("bilinear", True), ("nearest", False))] + [
        (op, (base, contribs, "bilinear", False, True, _rand(8, dtype=dtype)))]  # hoisted bias


def _head_cases(dtype):
    import hrnet_fast.kernels.seg_head  # noqa: F401
    base = _rand(1, 16, 7, 9, dtype=dtype)
    w, b = _rand(5, 16, 1, 1, cl=False, dtype=dtype), _rand(5, dtype=dtype)
    return [(torch.ops.hrnet_fast.seg_head_triton.default,
             (base, [_rand(1, 16, 4, 5, dtype=dtype)], w, b, "bilinear", False))]


def _conv_cases(dtype):
    from hrnet_fast.kernels import conv
    x = _rand(1, 8, 9, 7, dtype=dtype)
    w = conv.pack_weight(_rand(16, 8, 3, 3, cl=False, dtype=dtype))
    res = _rand(1, 16, 5, 4, dtype=dtype)
    mask = conv.relu_mask([(0, 8)], 16, DEVICE)
    return [(torch.ops.hrnet_fast.conv2d_bias_act_triton.default,
             (x, w, _rand(16, dtype=dtype), res, mask, 3, 2, 1, True))]


def _chain_cases(dtype):
    from hrnet_fast.kernels import conv
    import hrnet_fast.kernels.conv_chain  # noqa: F401
    x = _rand(1, 8, 13, 11, dtype=dtype)
    w1 = conv.pack_weight(_rand(8, 8, 3, 3, cl=False, dtype=dtype))
    w2 = conv.pack_weight(_rand(16, 8, 3, 3, cl=False, dtype=dtype))
    return [(torch.ops.hrnet_fast.strided_chain_triton.default,
             (x, w1, _rand(8, dtype=dtype), w2, _rand(16, dtype=dtype), None, None, None))]


def _block_cases(dtype):
    from hrnet_fast.kernels import conv
    import hrnet_fast.kernels.basic_block  # noqa: F401
    x = _rand(1, 8, 9, 11, dtype=dtype)
    w1 = conv.pack_weight(_rand(8, 8, 3, 3, cl=False, dtype=dtype))
    w2 = conv.pack_weight(_rand(8, 8, 3, 3, cl=False, dtype=dtype))
    return [(torch.ops.hrnet_fast.basic_block_triton.default, (x, w1, _rand(8, dtype=dtype), w2, None))]


def _bias_act_cases(dtype):
    import hrnet_fast.kernels.bias_act  # noqa: F401
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.int8, device=DEVICE)
    op = torch.ops.hrnet_fast.bias_relu_mask_triton.default
    return [(op, (_rand(2, 8, 5, 7, cl=cl, dtype=dtype), _rand(8), mask)) for cl in (True, False)]


CASES = {"upsample_add_relu": _fuse_cases, "seg_head": _head_cases,
         "conv2d_bias_act": _conv_cases, "strided_chain": _chain_cases, "bias_act": _bias_act_cases,
         "basic_block": _block_cases}


@pytest.mark.parametrize("op", sorted(CASES))
def test_opcheck(op):
    for fn, args in CASES[op](torch.float32):
        torch.library.opcheck(fn, args, test_utils=CPU_CHECKS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(CASES))
def test_gpu_opcheck(op, dtype):
    for fn, args in CASES[op](dtype):
        torch.library.opcheck(fn, args, test_utils=GPU_CHECKS)
