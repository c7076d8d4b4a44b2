"""The core of DockerCoins: settings, servers, channels, Redis keys; no service, no tool."""
