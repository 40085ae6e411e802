"""Numerics only. ``torch_eager`` runs everywhere (CPU and CUDA); ``triton/`` holds fused
CUDA kernels; ``dispatch`` picks one per call. Kernel classes in ``mpsnn.kernels`` never do
arithmetic themselves."""
