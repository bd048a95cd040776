"""Fidelity: a procedural visual question task and a small LLaVA-NeXT trained on it from scratch."""
