"""pdrop: a LLaVA-NeXT engine builder and runtime with PyramidDrop (arXiv 2410.17247) inside the model."""
__version__ = "0.1.0"

__all__ = ["Engine", "Result", "__version__"]


def __getattr__(name: str):
    # Lazy, so `python -m builder --help` or a bad flag answers before torch and transformers load.
    if name in ("Engine", "Result"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'builder' has no attribute {name!r}")
