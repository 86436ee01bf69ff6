"""Build script. A plain Python install everywhere; the CUDA extension comes with the csrc/ issue."""
from setuptools import find_packages, setup

setup(
    name="hrnet-fast",
    version="0.1.0",
    description="Fast, exact HRNet inference on NVIDIA GPUs with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hrnet_fast", "hrnet_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            # triton 3.6 is the GPU machine's version; its CPU interpreter needs numpy < 2.3.
            "numpy<2.3",
            "triton>=3.6,<3.7; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
    },
    entry_points={"console_scripts": ["hrnet-fast = hrnet_fast.cli:main"]},
)
