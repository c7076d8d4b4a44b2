"""rng: hands out random bytes from a slow, single-lock entropy source (the lesson's bottleneck)."""
