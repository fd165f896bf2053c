"""mtcore's Triton kernels, one op a file. Installed as `mtcore.kernels`, never as top-level `kernels`."""
