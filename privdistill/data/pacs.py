"""PACS source: find instances on an Orthanc or DICOMweb server, download them, keep pixels, label, patient id only."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from privdistill.config import PacsSource
from privdistill.data.sources import RawRecord, RawSource, Skipped, dicom_record
from privdistill.errors import ConfigError, DataError, RetryableNetworkError

log = structlog.get_logger(__name__)

TRIES = 3  # attempts per request on transient errors (connection, timeout, 5xx)
BACKOFF_S = 0.5  # sleep before retry n: BACKOFF_S * 2 ** (n - 1)
PAGE_SIZE = 1000  # instances per find request
PROBE_COUNT_CAP = 10_000  # probe() stops counting matching instances here
# The only tags ever parsed from a downloaded instance besides the label and patient-id tags: what
# pydicom needs to decode the pixels. Names, dates, institutions and UIDs are never read into memory.
PIXEL_KEYWORDS = (
    "SpecificCharacterSet", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "NumberOfFrames", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleIntercept", "RescaleSlope", "PixelData",
)
_DICOMWEB_ACCEPT = 'multipart/related; type="application/dicom"'
_UIDS = ("0020000D", "0020000E", "00080018")  # StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID
T = TypeVar("T")


class _Gone(Exception):
    """The server no longer has an instance the find listed (HTTP 404 on download)."""


class _Refused(Exception):
    """The server refused one instance's download (HTTP 4xx other than auth / 404): that instance is skipped."""


MAX_CONSECUTIVE_FAILURES = 5  # instance downloads failing in a row: the server, not an instance, is the problem


class PacsClient:
    """HTTP access to one PACS: find matching instances, download one instance's DICOM bytes, describe the server."""

    def __init__(self, src: PacsSource, *, transport: httpx.BaseTransport | None = None) -> None:
        self.src = src
        auth = None
        if src.credentials is not None:
            try:
                password = src.credentials.password_file.read_text().rstrip("\r\n")
            except OSError as err:
                raise ConfigError([f"data.source.credentials.password_file: cannot read {src.credentials.password_file}"
                                   f" ({err.strerror}); run the agent as the file's owner"]) from None
            auth = httpx.BasicAuth(src.credentials.username, password)
        verify: ssl.SSLContext | bool = True
        if src.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(src.ca_file))
        host = urlsplit(src.url).hostname or ""
        if urlsplit(src.url).scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("data.pacs.plaintext", reason="images and patient ids cross the network unencrypted; "
                        "use an https:// PACS URL outside a single host")
        self.http = httpx.Client(base_url=src.url, auth=auth, verify=verify, timeout=src.timeout_s,
                                 transport=transport, follow_redirects=False)
        self.root = src.dicomweb_root.rstrip("/")  # "" when the DICOMweb service sits at the URL itself

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one request, errors mapped
    def _request(self, method: str, path: str, *, what: str, **kw: Any) -> httpx.Response:
        where = self.src.url  # never a path: DICOMweb paths hold instance UIDs
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise RetryableNetworkError(
                f"the PACS at {where} did not answer {what} within {self.src.timeout_s:g} s; check the server's "
                "load and network, raise data.source.timeout_s if it is just slow, and run again"
            ) from None
        except httpx.ConnectError as err:
            if "CERTIFICATE_VERIFY_FAILED" in str(err):  # retrying cannot help: the config must name the CA
                raise ConfigError([
                    f"data.source.ca_file: the TLS certificate of the PACS at {where} is not trusted "
                    f"({_reason(err)}); set ca_file to the CA certificate that signed it"
                ]) from None
            raise RetryableNetworkError(
                f"the PACS at {where} is unreachable (ConnectError) for {what}; check that the server "
                "runs and that data.source.url is right, then run again"
            ) from None
        except httpx.TransportError as err:
            raise RetryableNetworkError(
                f"the PACS at {where} is unreachable ({type(err).__name__}) for {what}; check that the server "
                "runs and that data.source.url is right, then run again"
            ) from None
        if r.status_code in (401, 403) and self.src.credentials is None:
            raise ConfigError([f"data.source.credentials: the PACS at {where} requires credentials for {what} "
                               f"(HTTP {r.status_code}); set credentials: {{username: ..., password_file: ...}}"])
        if r.status_code in (401, 403):
            raise ConfigError([
                f"data.source.credentials: the PACS at {where} refused the credentials for {what} "
                f"(HTTP {r.status_code}); check username and password_file"
                + (", and that this user may read the instances" if r.status_code == 403 else "")
            ])
        if 300 <= r.status_code < 400:
            raise DataError(f"the PACS at {where} redirects {what} (HTTP {r.status_code}); set data.source.url to "
                            "the server's final address (https if it redirects to https)")
        if r.status_code >= 500:
            raise RetryableNetworkError(
                f"the PACS at {where} answered HTTP {r.status_code} to {what}{_server_message(r)}; "
                "check the server's logs and run again"
            )
        return r

    def _retrying(self, fn: Callable[[], T], what: str) -> T:
        for attempt in range(1, TRIES + 1):
            try:
                return fn()
            except RetryableNetworkError:
                if attempt == TRIES:
                    raise
                log.info("data.pacs.retry", what=what, attempt=attempt, of=TRIES)
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ find
    def find(self, *, cap: int | None = None) -> list[tuple[str, ...]]:
        """Every matching instance (Orthanc: (id,), DICOMweb: (study, series, sop) UIDs), sorted; at most ``cap``."""
        found: dict[tuple[str, ...], None] = {}
        while True:
            page = self._retrying(lambda: self._find_page(len(found)), "the instance search")
            before = len(found)
            found.update(dict.fromkeys(page))
            # only an empty page, or one that adds nothing new (a server that ignores paging), ends the listing:
            # a server may cap its answers below PAGE_SIZE (Orthanc LimitFindInstances, QIDO maximum results)
            if not page or len(found) == before:
                break
            if cap is not None and len(found) >= cap:
                break
        return sorted(found)

    def _find_page(self, offset: int) -> list[tuple[str, ...]]:
        if self.src.api == "orthanc":
            body = {"Level": "Instance", "Query": dict(self.src.query), "Expand": False,
                    "Since": offset, "Limit": PAGE_SIZE}
            r = self._request("POST", "/tools/find", json=body, what="the instance search (/tools/find)")
            if r.status_code == 404:
                raise DataError(f"{self.src.url} has no Orthanc REST API (/tools/find: HTTP 404); check data.source."
                                "url, or set data.source.api: dicomweb for another DICOMweb server")
            self._check_find(r)
            return [(str(i),) for i in _json(r, "/tools/find")]
        params = {**self.src.query, "limit": str(PAGE_SIZE), "offset": str(offset)}
        r = self._request("GET", f"{self.root}/instances", params=params, headers={"Accept": "application/dicom+json"},
                          what="the QIDO-RS instance search")
        if r.status_code == 404:
            raise self._no_dicomweb()
        self._check_find(r)
        if r.status_code == 204:
            return []
        out: list[tuple[str, ...]] = []
        for item in _json(r, "QIDO-RS /instances"):  # holds names etc.: only the three UIDs are read
            uids = [_first(item, tag) for tag in _UIDS]
            present = [u for u in uids if u]
            if len(present) == len(uids):
                out.append(tuple(present))
        return out

    def _check_find(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            raise DataError(f"the PACS at {self.src.url} refused the search (HTTP {r.status_code}"
                            f"{_server_message(r)}); check data.source.query")

    def _no_dicomweb(self) -> DataError:
        return DataError(
            f"no DICOMweb service at {self.src.url}{self.src.dicomweb_root} (HTTP 404): the DICOMweb plugin is not "
            "enabled (Orthanc: install orthanc-dicomweb and set DicomWeb.Enable true) or data.source.dicomweb_root "
            "is wrong"
        )

    # ------------------------------------------------------------------ download
    def fetch(self, ref: tuple[str, ...]) -> bytes:
        """One instance's DICOM file; retried on transient errors; raises _Gone when the server lost it."""
        return self._retrying(lambda: self._fetch_once(ref), "an instance download")

    def _fetch_once(self, ref: tuple[str, ...]) -> bytes:
        if self.src.api == "orthanc":
            r = self._request("GET", f"/instances/{quote(ref[0], safe='')}/file", what="an instance download",
                              headers={"Accept": "application/dicom"})
        else:
            study, series, sop = (quote(u, safe="") for u in ref)
            r = self._request("GET", f"{self.root}/studies/{study}/series/{series}/instances/{sop}",
                              headers={"Accept": _DICOMWEB_ACCEPT}, what="a WADO-RS instance download")
        if r.status_code == 404:
            raise _Gone()
        if r.status_code >= 400:
            raise _Refused(f"HTTP {r.status_code}{_server_message(r)}")
        if self.src.api == "orthanc":
            return r.content
        parts = parse_multipart_related(r.content, r.headers.get("content-type", ""))
        if len(parts) != 1:
            raise ValueError(f"WADO-RS answered {len(parts)} parts for one instance")
        return parts[0]

    # ------------------------------------------------------------------ describe
    def about(self) -> dict[str, Any]:
        """Server name and version: Orthanc's /system; for DICOMweb, that the QIDO root answers (Server header)."""
        if self.src.api == "orthanc":
            r = self._retrying(lambda: self._request("GET", "/system", what="the server description (/system)"),
                               "the server description")
            if r.status_code != 200:
                raise DataError(f"{self.src.url}/system answered HTTP {r.status_code}: not an Orthanc server? "
                                "Check data.source.url, or set data.source.api: dicomweb")
            info = _json(r, "/system")
            return {"server": "Orthanc", "version": info.get("Version"), "name": info.get("Name")}
        r = self._retrying(lambda: self._request("GET", f"{self.root}/studies", params={"limit": "1"},
                                                 headers={"Accept": "application/dicom+json"},
                                                 what="the QIDO-RS root"), "the QIDO-RS root")
        if r.status_code == 404:
            raise self._no_dicomweb()
        self._check_find(r)
        return {"server": r.headers.get("server", "DICOMweb"), "version": None, "name": None}


# ----------------------------------------------------------------------------- helpers
def _json(r: httpx.Response, what: str) -> Any:
    try:
        return r.json()
    except ValueError:
        raise RetryableNetworkError(f"the PACS answered {what} with a body that is not JSON; check the server "
                                    "and data.source.url / api, then run again") from None


def _reason(err: Exception) -> str:
    text, marker = str(err), "certificate verify failed"
    return text[text.find(marker):][:80] if marker in text else marker


def _first(item: dict[str, Any], tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0] if isinstance(values[0], str) else None


def _server_message(r: httpx.Response) -> str:
    """Orthanc's short error 'Message' (e.g. 'Unknown DICOM tag'), never the rest of a body that may echo data."""
    try:
        msg = r.json().get("Message")
    except (ValueError, AttributeError):
        return ""
    return f": {msg[:120]}" if isinstance(msg, str) and msg else ""


def parse_multipart_related(body: bytes, content_type: str) -> list[bytes]:
    """The part bodies of a multipart/related answer (RFC 2046 framing, CRLF line ends); ValueError if malformed."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not content_type.lower().startswith("multipart/") or not boundary:
        raise ValueError(f"not a multipart answer with a boundary (Content-Type {content_type[:80]!r})")
    delim = b"--" + boundary.encode("ascii")
    start = body.find(delim)
    if start < 0 or not body.startswith(delim, start):
        raise ValueError("multipart boundary not found in the body")
    parts: list[bytes] = []
    pos = start + len(delim)
    while True:
        if body.startswith(b"--", pos):  # close delimiter
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise ValueError("multipart body ends inside a delimiter line")
        head_end = body.find(b"\r\n\r\n", line_end)
        if head_end < 0:
            raise ValueError("multipart part without a header/body separator")
        nxt = body.find(b"\r\n" + delim, head_end + 4)
        if nxt < 0:
            raise ValueError("multipart part without a closing boundary (truncated answer?)")
        parts.append(body[head_end + 4 : nxt])
        pos = nxt + 2 + len(delim)


def parse_instance(blob: bytes, ref: str, src: PacsSource) -> RawRecord | Skipped:
    """A downloaded instance as a RawRecord (pixels, label, patient id only) or a Skipped."""
    tags = [*PIXEL_KEYWORDS, src.patient_id_tag] + ([src.label_tag] if src.label_tag else [])
    try:
        ds = dcmread(io.BytesIO(blob), specific_tags=tags)
    except InvalidDicomError:
        return Skipped(ref, "not_dicom", "not a DICOM file")
    except Exception as err:  # pydicom raises many types for malformed files
        return Skipped(ref, "malformed_dicom", f"malformed DICOM ({type(err).__name__})")
    return dicom_record(ds, ref, label_tag=src.label_tag, patient_id_tag=src.patient_id_tag)


@contextmanager
def _client(src: PacsSource, transport: httpx.BaseTransport | None) -> Iterator[PacsClient]:
    """A client, with httpx's own INFO request lines (whose URLs hold instance ids and UIDs) held back
    unless debug logging is on."""
    httpx_log = logging.getLogger("httpx")
    before = httpx_log.level
    if httpx_log.getEffectiveLevel() > logging.DEBUG:
        httpx_log.setLevel(logging.WARNING)
    client = PacsClient(src, transport=transport)
    try:
        yield client
    finally:
        client.close()
        httpx_log.setLevel(before)


def read_pacs(src: PacsSource, *, transport: httpx.BaseTransport | None = None) -> RawSource:
    """Every instance matching ``src.query`` (sorted, at most ``max_instances``) as records; bad instances skipped."""
    out = RawSource("pacs", [], has_labels=src.label_tag is not None, has_patient_ids=True,
                    class_names=src.class_names)
    with _client(src, transport) as client:
        refs = client.find(cap=src.max_instances)[: src.max_instances]
        out.seen = len(refs)
        log.info("data.pacs.found", api=src.api, instances=len(refs), query_keys=sorted(src.query))
        failing = 0
        for n, ref in enumerate(refs, start=1):
            name = f"pacs instance {n}/{len(refs)}"  # position in the sorted search result, not an id
            try:
                blob = client.fetch(ref)
            except _Gone:
                out.skipped.append(Skipped(name, "instance_gone", "deleted on the PACS after the search"))
                continue
            except _Refused as err:
                out.skipped.append(Skipped(name, "download_refused", f"the PACS refused this instance ({err})"))
                continue
            except RetryableNetworkError:
                failing += 1
                if failing >= MAX_CONSECUTIVE_FAILURES:
                    raise  # the server, not one instance, is failing: the run stops with a retryable error
                out.skipped.append(Skipped(name, "download_failed", f"failed {TRIES} times (server error)"))
                continue
            except ValueError as err:
                out.skipped.append(Skipped(name, "bad_multipart", f"unreadable WADO-RS answer ({err})"))
                continue
            failing = 0
            item = parse_instance(blob, name, src)
            if isinstance(item, Skipped):
                out.skipped.append(item)
            else:
                out.records.append(item)
    return out


def probe(src: PacsSource, *, transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
    """Check the server answers with these settings: its name/version and how many instances match (capped)."""
    t0 = time.monotonic()
    with _client(src, transport) as client:
        about = client.about()
        cap = min(src.max_instances or PROBE_COUNT_CAP, PROBE_COUNT_CAP)
        matching = len(client.find(cap=cap))
    return {
        "reachable": True,
        "url": src.url,
        "api": src.api,
        **about,
        "matching_instances": min(matching, cap),
        "matching_capped": matching >= cap,
        "seconds": round(time.monotonic() - t0, 3),
    }


def listing_digest(src: PacsSource, *, transport: httpx.BaseTransport | None = None) -> str:
    """sha256 of the sorted matching-instance list: changes when studies arrive or leave, so ingest re-runs.
    The ids themselves go nowhere but this hash."""
    with _client(src, transport) as client:
        refs = client.find(cap=src.max_instances)[: src.max_instances]
    return hashlib.sha256(json.dumps(refs).encode()).hexdigest()
