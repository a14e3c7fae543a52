"""Coordinator: persona aggregation, registry, admin API."""
