"""The local control API: what the CLI uses to drive a site, running or stopped."""

from ..sitedir import create_site
from .client import RunningSite, SiteHandle, StoppedSite, delete_site, open_handle
from .ops import OPS, perform
from .server import ControlServer, RecentLog, serve, site_answers

__all__ = [
    "OPS",
    "ControlServer",
    "RecentLog",
    "RunningSite",
    "SiteHandle",
    "StoppedSite",
    "create_site",
    "delete_site",
    "open_handle",
    "perform",
    "serve",
    "site_answers",
]
