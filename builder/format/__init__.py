"""The engine format, torch-free: configs, the manifest and its checks, dtype names, errors,
atomic directory writes, and the builder's version (recorded in every manifest)."""
__version__ = "0.1.0"
