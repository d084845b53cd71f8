"""Adapters that run clipfusion inside other frameworks.

Each adapter is its own module with its own optional dependency (``pip install 'clipfusion[anomalib]'`` for
:mod:`clipfusion.integrations.anomalib`); nothing here is imported by ``import clipfusion``, so the library
works without them.
"""
