"""Networks of the core layer (Flax Linen)."""
