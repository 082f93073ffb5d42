"""Benchmarks and study drivers (run as scripts; their outputs are committed under docs/)."""
