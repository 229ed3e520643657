"""How the C++ and CUDA libraries of the ``hnca::*`` ops are built: shared by setup.py (install
time) and ``_extension`` (the build on first use). No import of the package or of torch here, so
that setup.py can read it from its file."""

# The CPU kernels are compiled for the vector instruction set torch dispatches to on the machine
# (torch.backends.cpu.get_cpu_capability()); each set is its own library, named after it, so a
# library is only ever loaded where its instructions run.
VECTOR_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
CPU_SOURCE = "hnca_cpu.cpp"
CUDA_SOURCE = "hnca_cuda.cu"
CUDA_MODULE = "_cuda"


def cpu_module(capability: str) -> str:
    """The name of the CPU library for a capability, e.g. "_cpu_avx2"."""
    return f"_cpu_{capability.lower()}"


def cxx_flags(capability: str) -> list:
    return ["-O3", "-fopenmp", *VECTOR_FLAGS.get(capability, [])]


LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]
