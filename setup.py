"""Packages: every hnca_kernels* package, plus csrc/ (the C++/CUDA sources, compiled on first use)
installed as hnca_kernels/csrc. The rest of the configuration is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["hnca_kernels*"]) + ["hnca_kernels.csrc"],
    package_dir={"hnca_kernels.csrc": "csrc"},
)
