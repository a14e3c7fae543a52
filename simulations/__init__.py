"""Experiments on one machine: baselines, federated simulation, reports."""
