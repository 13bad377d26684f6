"""The samplers, grouped by how they step; `runtime.samplers` is the registry to use."""
