"""The fabric error family: one root, split by cause.

Everything the library raises on purpose is a `FabricError`. Errors from trio,
OpenSSL or the OS are translated where they happen, so the CLI can print
`str(error)` as one line that names the cause.
"""


class FabricError(Exception):
    """Root of every error fabric raises on purpose."""


class ConfigError(FabricError):
    """The site directory or its config is missing, malformed or inconsistent."""


class TokenError(FabricError):
    """A token could not be issued, read or redeemed."""


class TokenFormatError(TokenError):
    """The file is not a fabric token (mistyped, truncated, another format)."""


class TokenSpentError(TokenError):
    """The token has been redeemed as many times as it allows."""


class TokenExpiredError(TokenError):
    """The token's expiration window has passed."""


class TokenForgedError(TokenError):
    """The token's secret does not match, or the issuer never issued it."""


class IssuerUnreachableError(TokenError):
    """None of the token's link addresses answered."""


class LinkError(FabricError):
    """A link could not be made or was lost.

    `code` is the reason code (router.frames.Reason) a GOAWAY carries to the
    peer when this error refuses a link; None means a protocol error.
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(LinkError):
    """The peer broke the link protocol; the link is closed with this reason."""


class FrameError(ProtocolError):
    """Bytes from the peer do not decode as a frame."""


class FlowError(FabricError):
    """A flow could not be opened or was ended abnormally."""


class FlowRefused(FlowError):
    """OPEN_FAIL came back: no route, no connector, or the target refused the dial."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class FlowReset(FlowError):
    """The flow was reset: by the peer, by a link that broke, or by shutdown."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class NoProviderError(FabricError):
    """No reachable site has a connector for the routing key."""


def sole_exception(
    group: BaseExceptionGroup, *, ignore: type[BaseException] | tuple[type[BaseException], ...] = ()
) -> BaseException | None:
    """The one exception in `group` and the groups nested in it, leaving out those of the `ignore` types.

    None when there are several, or none: then the group itself says more. Trio
    nurseries wrap what their tasks raise; a caller that expects one failure
    raises it as itself.
    """
    if ignore:
        _, rest = group.split(ignore)
        if rest is None:
            return None
        group = rest
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending and len(leaves) < 2:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 and not pending else None


def describe(error: BaseException) -> str:
    """The one line a user sees for an error fabric or the OS raised."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename
        return f"{error.strerror}: {where}" if where else error.strerror
    return str(error) or type(error).__name__
