"""python -m worker_svc: the same as `dockercoins worker`."""

from dockercoins.service_main import service_main
from worker_svc.config import FLAGS, WorkerSettings
from worker_svc.server import serve

service_main("dockercoins worker", WorkerSettings, serve, FLAGS)
