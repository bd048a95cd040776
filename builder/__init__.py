"""pdrop: a LLaVA-NeXT engine builder and runtime with PyramidDrop (arXiv 2410.17247) inside the model."""
__version__ = "0.1.0"

from .engine import Engine, Result  # noqa: E402

__all__ = ["Engine", "Result", "__version__"]
