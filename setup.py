"""hvd_gradq: gradient compression for Horovod + PyTorch.

Horovod itself is not listed in install_requires: its last release (0.28.1) does not build
against PyTorch >= 2.1 without a small patch, which ``launch/setup.sh`` applies. Installing
this package with pip alone therefore expects Horovod to be present already.
"""
from setuptools import find_packages, setup

setup(
    name="hvd_gradq",
    version="0.1.0",
    description="Mixed-bit gradient compression for Horovod and PyTorch",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hvd_gradq", "hvd_gradq.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy>=1.24", "tqdm>=4.66"],
    extras_require={"mpi": ["mpi4py>=3.1"], "test": ["pytest>=8"]},
)
