"""Overhead benchmark suites: ``python -m fedgov.bench`` (see :mod:`fedgov.bench.cli`)."""
