"""The engine over time: load an engine directory (Engine), the step scheduler, the paged KV
cache's blocks and the prefix cache, the decode runners (plain, torch.compile, CUDA graphs), the
GPU memory plan, sampling and stop words. It runs the network (network/) and imports only it and
the format layer."""
