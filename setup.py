"""Build script: a plain Python install everywhere, plus the CUDA extension ``hrnet_fast._C`` where it
can be built.

The extension (csrc/*.cu, csrc/bindings.cpp) is built when, in the *build* environment, torch is
importable, torch is a CUDA build (``torch.version.cuda``) and a CUDA toolkit (nvcc, CUDA_HOME) is
found. pyproject.toml's build requirements are only setuptools and wheel, so pip's default isolated
build cannot see torch and installs pure Python; to build the extension use

    pip install --no-build-isolation -e .        (or: pip install --no-build-isolation .)

``HRNET_FAST_BUILD_CUDA=1`` forces the extension (the build fails if it cannot be built),
``HRNET_FAST_BUILD_CUDA=0`` skips it. Target architectures: ``TORCH_CUDA_ARCH_LIST`` when set, else
sm_80 and sm_90 (+PTX of sm_90 for newer GPUs). Without the prebuilt extension, hrnet_fast JIT-builds
the same sources on a GPU machine at first use (hrnet_fast/cuda_ext.py).
"""
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CUDA_SOURCES = ["csrc/bindings.cpp", "csrc/upsample_add_relu.cu"]
# Every kernel source, shipped inside the package (hrnet_fast/_csrc) so that an installed wheel can
# JIT-build the CPU kernels and the CUDA extension at first use, as a source checkout does.
KERNEL_SOURCES = ["bindings.cpp", "cpu_amx.h", "cpu_avx2.h", "cpu_conv1x1.cpp",
                  "cpu_conv_amx.cpp", "cpu_conv_thin.cpp", "cpu_conv_thin.h", "cpu_conv_thin_avx2.cpp", "cpu_fuse.cpp",
                  "cpu_head_amx.cpp", "cpu_head_f32.cpp", "cpu_head_f32.h", "cpu_head_f32_avx2.cpp",
                  "cpu_isa.h", "cpu_resize.h", "upsample_add_relu.cu", "upsample_add_relu.h"]
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def cuda_build_decision(env=None):
    """(build_the_extension, reason). Imports torch if it can; never needs a GPU.

    Raises RuntimeError when HRNET_FAST_BUILD_CUDA=1 asks for an extension that cannot be built.
    """
    env = os.environ if env is None else env
    flag = env.get("HRNET_FAST_BUILD_CUDA", "").strip().lower()
    if flag in _FALSE:
        return False, "HRNET_FAST_BUILD_CUDA=0: skipping the CUDA extension"
    if flag and flag not in _TRUE:
        raise RuntimeError(f"HRNET_FAST_BUILD_CUDA must be 0 or 1, got {flag!r}")
    force = flag in _TRUE
    reason = None
    try:
        import torch
    except ImportError:
        reason = ("torch is not importable in the build environment (pip's build isolation hides it: "
                  "use `pip install --no-build-isolation -e .`)")
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        else:
            from torch.utils.cpp_extension import CUDA_HOME

            nvcc = None
            if CUDA_HOME is not None:
                nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
                if not os.path.exists(nvcc):
                    nvcc = None
            if nvcc is None:
                reason = "no CUDA toolkit found (nvcc / CUDA_HOME)"
            else:
                return True, f"building hrnet_fast._C with torch {torch.__version__} (CUDA {torch.version.cuda}), {nvcc}"
    if force:
        raise RuntimeError(f"HRNET_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    return False, reason + "; installing pure Python (the kernels can be JIT-built at first use)"


class BuildPyWithKernelSources(build_py):
    """build_py that also copies csrc/ into the built package as hrnet_fast/_csrc."""

    def run(self):
        super().run()
        missing = [n for n in KERNEL_SOURCES if not os.path.isfile(os.path.join("csrc", n))]
        if missing:  # a tree without csrc/: the package then says so when a kernel is first used
            print(f"hrnet_fast setup: csrc/ lacks {', '.join(missing)}; the wheel carries no "
                  "kernel sources", file=sys.stderr)
            return
        target = os.path.join(self.build_lib, "hrnet_fast", "_csrc")
        self.mkpath(target)
        for name in KERNEL_SOURCES:
            self.copy_file(os.path.join("csrc", name), os.path.join(target, name))


def cuda_extension_kwargs():
    """setup() keyword arguments for the extension: {} when it is not built."""
    build, reason = cuda_build_decision()
    print(f"hrnet_fast setup: {reason}", file=sys.stderr)
    if not build:
        return {"cmdclass": {"build_py": BuildPyWithKernelSources}}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    if shutil.which("ninja") is None:
        print("hrnet_fast setup: ninja not found, compiling without it (slower)", file=sys.stderr)
    ext = CUDAExtension(
        name="hrnet_fast._C",
        sources=CUDA_SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": BuildExtension, "build_py": BuildPyWithKernelSources}}


if __name__ == "__main__":
    setup(
        name="hrnet-fast",
        version="0.1.0",
        description="Fast, exact HRNet inference on NVIDIA GPUs with fused kernels",
        long_description=open("README.md", encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        packages=find_packages(include=["hrnet_fast", "hrnet_fast.*"]),
        python_requires=">=3.10",
        # ninja: the CPU fuse kernel and the CUDA extension are JIT-built with it on first use.
        install_requires=["torch>=2.11", "numpy", "ninja"],
        extras_require={
            "test": [
                "pytest>=7",
                "pytest-benchmark>=4",
                # tests/test_imageio.py fuzzes the image readers (bounded: a few seconds).
                "hypothesis>=6",
                # triton 3.6 is the GPU machine's version; its CPU interpreter needs numpy < 2.3.
                "numpy<2.3",
                "triton>=3.6,<3.7; platform_system == 'Linux' and platform_machine == 'x86_64'",
                # tests/test_peers.py runs the CPU peers (ONNX Runtime, OpenVINO) on a tiny model.
                "onnx", "onnxruntime", "openvino",
                # PNG images and label maps, the progress bar: their tests run instead of skipping.
                "Pillow", "tqdm",
                # the README's test command runs the suite in one process per core (pytest -n auto)
                "pytest-xdist",
            ],
            # hrnet-fast bench --peers onnxruntime openvino-fp32 openvino: CPU peers run on an ONNX
            # export of the same reference model.
            "peers": ["onnx", "onnxruntime", "openvino"],
            # hrnet-fast segment reads PNG/JPEG with Pillow (PPM and .npy work without it).
            "image": ["Pillow"],
            # segment/eval over folders: PNG label maps and a progress bar.
            "data": ["Pillow", "tqdm"],
        },
        entry_points={"console_scripts": ["hrnet-fast = hrnet_fast.cli:main"]},
        **cuda_extension_kwargs(),
    )
