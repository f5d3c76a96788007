"""The environment a sandbox needs so that common tools send traffic through the proxy."""

from __future__ import annotations

from forgehand.sandbox.egress.forwarder import DEFAULT_HOST, DEFAULT_PORT

NO_PROXY = "localhost,127.0.0.1,::1"


def proxy_environment(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> dict[str, str]:
    """Variables pointing curl, pip, npm, yarn, cargo, go, git, apt, gem and the JVM at the
    in-sandbox forwarder on host:port. Merge them into the sandbox's environment."""
    url = f"http://{host}:{port}"
    env = {name: url for name in _URL_VARIABLES}
    env |= {"NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY}
    env["JAVA_TOOL_OPTIONS"] = _java_options(host, port)
    return env


_URL_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "PIP_PROXY",
    "npm_config_proxy",
    "npm_config_https_proxy",
    "YARN_HTTP_PROXY",
    "YARN_HTTPS_PROXY",
    "CARGO_HTTP_PROXY",
)


def _java_options(host: str, port: int) -> str:
    parts = [
        f"-D{scheme}.{key}={value}"
        for scheme in ("http", "https")
        for key, value in (("proxyHost", host), ("proxyPort", port))
    ]
    return " ".join([*parts, "-Dhttp.nonProxyHosts=localhost|127.0.0.1"])
