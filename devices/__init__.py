"""Device profiles (YAML) and the benchmark harness (local and remote)."""
