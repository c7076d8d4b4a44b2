"""python -m webui: the same as `dockercoins webui`."""

from dockercoins.service_main import service_main
from webui.config import FLAGS, WebuiSettings
from webui.server import serve

service_main("dockercoins webui", WebuiSettings, serve, FLAGS)
