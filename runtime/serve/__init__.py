"""`python -m runtime.serve` moved to `python -m serving` (serving/, a layer above the runtime); this pointer goes next release."""
