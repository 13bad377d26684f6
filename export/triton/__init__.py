"""`python -m export.triton` moved to `python -m serving.write_repository`; this pointer goes next release."""
