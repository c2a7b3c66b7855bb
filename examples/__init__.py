"""Plain-PyTorch scripts that use the gate library (importable so that the tests can call their `main`)."""
