"""Shared pieces of DockerCoins over gRPC: settings, logging, servers, channels, Redis schema, launcher, CLI."""
