"""Packages (every hnca_kernels* package, and csrc/ installed as hnca_kernels/csrc for a build on
first use) and the C++ ops, built at install time where torch is importable in the build
(``pip install --no-build-isolation``): the CPU library for the vector instructions torch
dispatches to on this machine, and the CUDA library where torch sees a GPU and a CUDA toolkit is
installed, or when HNCA_BUILD_CUDA=1 asks for it (HNCA_BUILD_CUDA=0 never). A failed CUDA build
leaves the CPU library; a build without torch compiles nothing, and the ops are then built on
first use (hnca_kernels/ops/_extension.py). The rest of the configuration is in pyproject.toml."""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _build_config():
    spec = importlib.util.spec_from_file_location("_hnca_build", HERE / "hnca_kernels" / "ops" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("hnca-kernels: torch is not importable in this build (pip's build isolation), so the C++ ops are "
              "built on first use instead; pip install --no-build-isolation builds them now", file=sys.stderr)
        return [], {}
    config = _build_config()
    capability = torch.backends.cpu.get_cpu_capability()
    extensions = [CppExtension(f"hnca_kernels.{config.cpu_module(capability)}", [f"csrc/{config.CPU_SOURCE}"],
                               extra_compile_args={"cxx": [*config.cxx_flags(capability), "-DHNCA_PYTHON_MODULE"]},
                               extra_link_args=config.LINK_FLAGS)]
    wanted = os.environ.get("HNCA_BUILD_CUDA")
    if wanted == "1" or (wanted != "0" and CUDA_HOME is not None and torch.version.cuda is not None
                         and torch.cuda.is_available()):
        extensions.append(CUDAExtension(f"hnca_kernels.{config.CUDA_MODULE}", [f"csrc/{config.CUDA_SOURCE}"],
                                        extra_compile_args={"cxx": ["-O3", "-DHNCA_PYTHON_MODULE"],
                                                            "nvcc": [*config.NVCC_FLAGS, "-DHNCA_PYTHON_MODULE"]}))

    class Build(BuildExtension):
        """A failed CUDA library is left out (with one line); the CPU library must build. Beside each
        library a file names the torch it was built against: the loader takes a library only with
        that torch (an extension is tied to torch's version), else it builds anew on first use."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - the CUDA library is optional
                if not ext.name.endswith(config.CUDA_MODULE):
                    raise
                print(f"hnca-kernels: the CUDA kernels failed to build ({exc}); the CPU ops are installed, "
                      "the cuda backend will try a build on first use", file=sys.stderr)

        def run(self):
            super().run()
            # beside the built library, and beside its copy in the source tree (an editable install)
            for ext in self.extensions:
                name = ext.name.rsplit(".", 1)[-1]
                built = Path(self.get_ext_fullpath(ext.name))
                for folder in {built.parent, HERE / "hnca_kernels"}:
                    if any(folder.glob(f"{name}.*.so")) or any(folder.glob(f"{name}.so")):
                        (folder / f"{name}.torch").write_text(torch.__version__)

    return extensions, {"build_ext": Build.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["hnca_kernels*"]) + ["hnca_kernels.csrc"],
    package_dir={"hnca_kernels.csrc": "csrc"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
