"""Engine backends, each imported only when a bundle asks for it."""
