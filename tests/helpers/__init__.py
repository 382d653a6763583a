"""Shared test helpers (tiny random models saved as diffusers folders, ...)."""
