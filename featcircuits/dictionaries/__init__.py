"""Sparse dictionaries (SAEs, transcoders, skip transcoders, cross-layer transcoders), their activations and file
formats."""

from .activations import ACTIVATIONS, register_activation
from .base import DICTIONARY_CLASSES, SAE, Dictionary, DictionaryOutput, SkipTranscoder, Transcoder
from .config import DictionaryConfig
from .cross_layer import CrossLayerTranscoder
from .io import detect_format, load_dictionaries, load_dictionary, save_dictionary

__all__ = [
    "ACTIVATIONS",
    "register_activation",
    "DICTIONARY_CLASSES",
    "SAE",
    "Dictionary",
    "DictionaryOutput",
    "SkipTranscoder",
    "Transcoder",
    "CrossLayerTranscoder",
    "DictionaryConfig",
    "detect_format",
    "load_dictionaries",
    "load_dictionary",
    "save_dictionary",
]
