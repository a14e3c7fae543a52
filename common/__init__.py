"""Shared pieces: configs, assets, data, the rating task, model handling."""
