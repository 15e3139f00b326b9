"""dcpp: dynamic chunked pipeline-parallel prefill."""
__version__ = "0.1.0"
