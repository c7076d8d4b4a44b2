"""hasher: returns the SHA-256 digest of every block it is sent, at a simulated cost per request."""
