"""Sample loading, observers, exponent-bias selection and BatchNorm re-estimation."""

from hfp8.calibration.samples import SampleConfig, SampleError, SampleFolder

__all__ = ["SampleConfig", "SampleError", "SampleFolder"]
