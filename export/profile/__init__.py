"""`python -m export.profile` moved to `python -m export.tensorrt.trtexec`; this pointer goes next release."""
