"""webui: reads the counters from Redis and draws the mining speed live in a browser."""
