"""Experiment logic (docs/design.md sections 7-8). Scripts in `experiments/` are thin
configs around these functions."""
