"""Sparse dictionaries (SAEs, transcoders, skip transcoders), their activations and file formats."""

from .activations import ACTIVATIONS, register_activation
from .base import DICTIONARY_CLASSES, SAE, Dictionary, DictionaryOutput, SkipTranscoder, Transcoder
from .config import DictionaryConfig
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
    "DictionaryConfig",
    "detect_format",
    "load_dictionaries",
    "load_dictionary",
    "save_dictionary",
]
