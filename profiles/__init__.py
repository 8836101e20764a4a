"""Device profiles shipped with edge-runtime: one TOML file per device class (data only)."""
