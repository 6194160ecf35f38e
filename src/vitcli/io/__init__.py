"""Data in and out, no model: inputs, decoding, preprocessing, datasets, prediction records, atomic files.

``images``, ``preprocess``, ``inputs`` and ``records`` import no torch (the torch-free engines use them).
"""
