"""Formats, fake quantization, model transform and export."""
