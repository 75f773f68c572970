"""Triton kernels of lara_kernels (installed as ``lara_kernels.triton_kernels``).

@triton.jit kernels and their launch wrappers only; the autograd layer lives in
``lara_kernels``.
"""
