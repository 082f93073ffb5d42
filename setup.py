"""hvd_gradq: gradient compression for Horovod + PyTorch.

Horovod itself is not listed in install_requires: its last release (0.28.1) does not build
against PyTorch >= 2.1 without a small patch, which ``launch/setup.sh`` applies. Installing
this package with pip alone therefore expects Horovod to be present already.
"""
from pathlib import Path

from setuptools import find_packages, setup

readme = Path(__file__).with_name("README.md")

setup(
    name="hvd_gradq",
    version="0.1.0",
    description="Mixed-bit gradient compression for Horovod and PyTorch",
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hvd_gradq", "hvd_gradq.*"]),
    package_data={"hvd_gradq.bits": ["csrc/*.c", "csrc/*.h"]},  # the native kernels, compiled on first use
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy>=1.24", "tqdm>=4.66"],
    extras_require={"mpi": ["mpi4py>=3.1"], "test": ["pytest>=8"]},
)
