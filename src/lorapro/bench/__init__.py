"""Benchmark and demo harness for lorapro, on offline models and data.

A client of the library: it uses only what ``import lorapro`` exports, never library
internals, and the library never imports it. Heavy modules (torch, transformers) are
imported by the submodules, so ``import lorapro.bench`` stays cheap.
"""

from .data import MissingAssetError, Split, Splits, split_dataset

__all__ = ["MissingAssetError", "Split", "Splits", "split_dataset"]
