"""Container health check (stdlib only): GET a /healthz URL (TLS verified with --ca) or check the install."""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request


def check_url(url: str, ca: str | None, timeout: float) -> str | None:
    """None when ``url`` answers 200 with {"status": "ok"}; else why not."""
    ctx = ssl.create_default_context(cafile=ca) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
            body = resp.read(4096)
            status = resp.status
    except urllib.error.HTTPError as err:
        return f"{url}: HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {getattr(err, 'reason', err)}"
    if status != 200:
        return f"{url}: HTTP {status}"
    try:
        doc = json.loads(body)
    except ValueError:
        return f"{url}: not JSON"
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        return f"{url}: status {doc.get('status') if isinstance(doc, dict) else doc!r}"
    return None


def check_tcp(address: str, timeout: float) -> str | None:
    """None when HOST:PORT accepts a TCP connection (the SuperLink speaks gRPC/HTTP2 only)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except (OSError, ValueError) as err:
        return f"{address}: {err}"


def check_install() -> str | None:
    """None when the three commands' packages import (the image's default check)."""
    try:
        import coordinator  # noqa: F401
        import privdistill  # noqa: F401
        import site_agent  # noqa: F401
    except ImportError as err:
        return f"install broken: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("url", nargs="?", help="http(s)://HOST:PORT/healthz; omitted: check the install only")
    p.add_argument("--ca", help="CA certificate that signed the server's certificate (https)")
    p.add_argument("--tcp", help="HOST:PORT that must accept a connection instead of a URL")
    p.add_argument("--timeout", type=float, default=4.0)
    args = p.parse_args(argv)
    if args.tcp:
        problem = check_tcp(args.tcp, args.timeout)
    elif args.url:
        problem = check_url(args.url, args.ca, args.timeout)
    else:
        problem = check_install()
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
