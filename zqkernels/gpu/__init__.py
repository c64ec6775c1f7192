"""Triton GPU kernels, one module per kernel family (actquant, w4a4, w4a16, mosaic, zipper_high).

Every kernel also runs under Triton's CPU interpreter (`TRITON_INTERPRET=1`, tensors on the CPU),
which is how `pytest verify/` proves them right on machines without a GPU.
"""
