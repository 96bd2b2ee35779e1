"""HFP8 training: 1-4-3 forward, 1-5-2 backward (Sun et al., NeurIPS 2019), from scratch or as a
distillation fine-tune after PTQ. See :mod:`hfp8.training.hybrid` and
:mod:`hfp8.training.distill`."""

from hfp8.training.config import TrainingConfig
from hfp8.training.distill import distillation_loss, finetune
from hfp8.training.hybrid import (
    HybridTraining,
    deployable_snapshot,
    finish_training,
    prepare_training,
)

__all__ = ["HybridTraining", "TrainingConfig", "deployable_snapshot", "distillation_loss",
           "finetune", "finish_training", "prepare_training"]
