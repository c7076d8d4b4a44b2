"""python -m hasher_svc: the same as `dockercoins hasher`."""

from dockercoins.service_main import service_main
from hasher_svc.config import FLAGS, HasherSettings
from hasher_svc.server import serve

service_main("dockercoins hasher", HasherSettings, serve, FLAGS)
