"""fabric: a layer-7 service interconnect on Trio. The public Python API."""

from .config import ConnectorConfig, LinkConfig, ListenerConfig, Settings, SiteConfig
from .errors import (
    ConfigError,
    FabricError,
    FlowError,
    FlowRefused,
    FlowReset,
    IssuerUnreachableError,
    LinkError,
    NoProviderError,
    ProtocolError,
    TokenError,
    TokenExpiredError,
    TokenForgedError,
    TokenFormatError,
    TokenSpentError,
)
from .pki import Token
from .site import Site, load_site, open_site
from .sitedir import create_site
from .status import NetworkStatus, SiteStatus

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ConnectorConfig",
    "FabricError",
    "FlowError",
    "FlowRefused",
    "FlowReset",
    "IssuerUnreachableError",
    "LinkConfig",
    "LinkError",
    "ListenerConfig",
    "NetworkStatus",
    "NoProviderError",
    "ProtocolError",
    "Settings",
    "Site",
    "SiteConfig",
    "SiteStatus",
    "Token",
    "TokenError",
    "TokenExpiredError",
    "TokenForgedError",
    "TokenFormatError",
    "TokenSpentError",
    "create_site",
    "load_site",
    "open_site",
]
