"""Shared pieces of DockerCoins: settings, servers, channels, Redis schema, launcher, CLI."""
