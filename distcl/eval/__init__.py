"""Evaluation: retrieval metrics, compatibility matrices, protocols, the engine and reports."""
