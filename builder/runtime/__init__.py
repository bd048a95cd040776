"""Running an engine directory: the engine, the decoder with PyramidDrop inside, KV cache, decode
runners, sampling, vision, the kernels' binding. It imports only the format layer."""
