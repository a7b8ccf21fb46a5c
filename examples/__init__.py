"""Examples and their data, run from a source checkout (``python -m examples.demo``); not installed."""
