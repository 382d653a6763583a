"""Converters from official metric checkpoints into transformers folders (``senseflow convert-weights``)."""
