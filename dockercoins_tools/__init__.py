"""DockerCoins' tools: the CLI, the launcher, bench, experiment, probe; no service imports them."""
