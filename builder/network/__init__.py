"""The network: the LLaVA-NeXT model as plain PyTorch with PyramidDrop inside (the decoder, the
rule in pyramid.py, the vision tower and anyres packing, RoPE, attention over the paged KV cache),
image loading, the kernels' binding and the layers that run in them, the precision policy, FLOPs
and keep maps. It imports only the format layer: never the engine over time (runtime/)."""
