"""python -m rng_svc: the same as `dockercoins rng`."""

from dockercoins.service_main import service_main
from rng_svc.config import FLAGS, RngSettings
from rng_svc.server import serve

service_main("dockercoins rng", RngSettings, serve, FLAGS)
