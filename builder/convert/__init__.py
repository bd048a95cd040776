"""Checkpoint -> engine directory: reading checkpoints, presets, conversion, kernel compilation, atomic writes."""
