"""zqkernels: verified and benchmarked 4-bit LLM quantization kernels built on inlier-outlier
disaggregation (ZipperQuant: bit-based, GPU + CPU; MosaicQuant + ZipperEngine: all-GPU).

`reference` (a sibling package) is the numpy oracle that defines every format and product;
`zqkernels.gpu` holds the Triton kernels, `zqkernels.cpu` the Numba kernels, `zqkernels.nn` the
drop-in layers and `zqkernels.pipeline` the end-to-end LLaMA/Qwen pipeline.
"""
__version__ = "0.1.0"
