"""The VTAB-1k split names (docs/method.md §4): the list files every dataset folder holds.

A module of its own so that configuration (train/config.py) can name the splits without importing
the data loaders (torch datasets, PIL).
"""
SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
