"""Test data for wsi-norm's tests and benchmarks (not the library proper).

:mod:`wsi_norm.testing.stain_cases`: a seeded family of H&E images with known stain vectors, white
point, strengths and compression, for the estimation and fidelity benchmark and the known-truth
tests.
"""
