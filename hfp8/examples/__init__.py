"""The built-in example: a small BatchNorm CNN trained on Fashion-MNIST, shipped with its weights
and two sample folders, so the whole pipeline runs right after install (``hfp8-ptq example``);
and the character Transformer of the language-model tests and benchmarks."""

from hfp8.examples.char_transformer import CharTransformer, char_transformer
from hfp8.examples.fashion_cnn import (
    CLASS_NAMES,
    copy_example,
    example_data_dir,
    fashion_cnn,
)

__all__ = ["CLASS_NAMES", "CharTransformer", "char_transformer", "copy_example",
           "example_data_dir", "fashion_cnn"]
