"""The ground floor: FP8 formats, their codes, fake quantization, exponent-bias selection and
the custom operator that rounds in eager PyTorch. Imports nothing else from hfp8."""
