"""Frozen-backbone image features to HDF5, with linear probes and FAISS kNN. Plain library: no Prefect here."""

__version__ = "0.1.0"
