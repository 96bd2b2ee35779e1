"""The PTQ pipeline: plan, calibrate, round and refine a model (``quantize_model``), its report
and manifest, saving and loading, and comparing its outputs with the float model's."""
