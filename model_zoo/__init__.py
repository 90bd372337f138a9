"""Model zoo entries (TOML, one per supported configuration); read them with ``vtr.zoo``."""
