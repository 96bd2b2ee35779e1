"""ONNX: the QDQ export, its graph form for onnxruntime, replay and verification.

Only :class:`ExportError` lives here, so that code that merely catches it (the command line)
does not import onnx."""

__all__ = ["ExportError"]


class ExportError(ValueError):
    """The model (or format) cannot be expressed exactly as an ONNX graph; says why."""
