"""Where a quantized model keeps its report, and the key its files keep the manifest under.

Floor 0 (imports nothing from hfp8): calibration records a BatchNorm re-estimation into a
quantized model's report, and data recognises a quantized file, without importing the pipeline.
"""

# the plain dict attribute quantize_model puts on the returned model's root module: what was done
# (config, kept-float layers, observer summaries, BN report, training); saved as the manifest
REPORT_ATTRIBUTE = "hfp8_report"
MANIFEST_KEY = "hfp8_ptq_manifest"  # the manifest's key in a saved file and in ONNX metadata

__all__ = ["REPORT_ATTRIBUTE", "MANIFEST_KEY"]
