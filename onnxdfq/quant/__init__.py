"""Quantization grids, parameters, fake quantization, range estimators and QDQ export."""
