"""A store in an S3 bucket (or any S3-compatible server).

Layout under ``s3://BUCKET/PREFIX``: objects at ``PREFIX/<key>``, references
at ``PREFIX/refs/<name>``.  Objects are written with one PUT, which S3 makes
visible whole or not at all.  References use S3 conditional writes for
compare-and-swap: creation with ``If-None-Match: *``, update and deletion with
``If-Match: <ETag of the value read>``; the server rejects a write whose
condition no longer holds with 412 (or 409 when two conditional writes race),
and that becomes RefConflictError.

This is the only module of commitfs that imports boto3/botocore: every botocore
exception is translated here into commitfs.errors, and every request goes
through commitfs.storage.retry (botocore's own retries are switched off so the
two do not multiply).

Every answer is checked before it counts as one: a GET's body must be as long
as its Content-Length (which must be there), a ranged GET's Content-Range must
be the range asked for, a HEAD must carry a Content-Length, a PUT an ETag, a
listing page its IsTruncated, (if truncated) a continuation token, and as many
keys as its KeyCount says.  A connection cut inside the headers parses
as a 200 with no headers and no body; these checks turn it (and a short body, a
page cut short) into a TransientError, retried, then a clear StorageError:
never an empty object, an empty listing or a missing size taken as the truth.
Keys listed from the bucket that commitfs could not have written (``..``,
empty segments: storage.base.valid_key) are left out with a warning.

Ranged GETs (load_range: a mount's reads of packs and index segments, by the
thousand) take a lean path once the store's first one has gone through
botocore: signed by botocore's own SigV4 signer and sent through a urllib3
pool, at about half botocore's CPU per request (_LeanGet says how).  Its
answers get the same checks and its errors the same translation; anything
else (writes, conditional writes, multipart, listings, whole-object GETs)
stays with boto3.  ``lean_get=False`` or COMMITFS_S3_LEAN_GET=0 turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar
from urllib.parse import quote

import boto3
import urllib3
from botocore import exceptions as bx
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.parsers import ResponseParserError

from commitfs.errors import (
    ObjectNotFoundError,
    RefConflictError,
    RepositoryError,
    RepositoryNotFoundError,
    StorageError,
)
from commitfs.storage.base import Store, valid_key
from commitfs.storage.retry import TransientError, retry_call

T = TypeVar("T")

log = logging.getLogger(__name__)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

_REFS = "refs/"
# Parts of a streamed save (save_object_from): S3 wants at least 5 MiB but for the last.
_PART_SIZE = 8 * 1024 * 1024

# Error codes meaning "your credentials are wrong or insufficient".
_ACCESS_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
     "TokenRefreshRequired", "AllAccessDisabled", "403"}
)
# 4xx codes that are nevertheless worth retrying (5xx always are).
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
     "RequestTimeout"}
)


def _error_code(exc: bx.ClientError) -> tuple[str, int]:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _check_name(name: str) -> str:
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"bad key {name!r}")
    return name


def _incomplete(what: str) -> TransientError:
    return TransientError(f"incomplete answer from S3 ({what})", unreachable=True)


def _read_body(resp: dict) -> bytes:
    """A GET's body, all of it: as long as the Content-Length the answer must carry."""
    if "ContentLength" not in resp:
        raise _incomplete("no Content-Length")
    data = resp["Body"].read()
    if len(data) != int(resp["ContentLength"]):
        raise _incomplete(f"{len(data)} of {resp['ContentLength']} bytes")
    return data


def _ranged_body(data: bytes, content_range: str | None, offset: int, length: int) -> bytes:
    """A ranged GET's bytes, once its body is whole: checked against its Content-Range."""
    if content_range is None:  # a server ignoring Range sent the whole object
        return data[offset:offset + length]
    m = _CONTENT_RANGE.fullmatch(str(content_range))
    if not m or int(m.group(1)) != offset or int(m.group(2)) - offset + 1 != len(data):
        raise _incomplete(f"Content-Range {content_range!r} for bytes {offset}+{length}")
    if len(data) < length and m.group(3) != "*" and offset + len(data) != int(m.group(3)):
        raise _incomplete(f"{len(data)} of {length} bytes before the object's end")
    return data


def _default_endpoint() -> str | None:
    """COMMITFS_S3_ENDPOINT_URL, unless boto3 already has an endpoint from the
    environment (AWS_ENDPOINT_URL[_S3], which it reads by itself)."""
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return None
    return os.environ.get("COMMITFS_S3_ENDPOINT_URL") or None


# --- the lean ranged GET --------------------------------------------------------
#: HTTP statuses (besides 5xx) worth retrying.
_TRANSIENT_STATUSES = frozenset({408, 429})
#: Answers meaning the request went to the wrong place (another region, a
#: redirect botocore would follow): the store goes back to boto3 for good.
_ELSEWHERE_CODES = frozenset({"PermanentRedirect", "TemporaryRedirect", "AuthorizationHeaderMalformed",
                              "IllegalLocationConstraintException"})
_XML_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")


class _Elsewhere(Exception):
    """The lean GET cannot serve this store: redo the request with boto3."""


class _LeanGet:
    """Ranged GETs without botocore's request machinery.

    botocore spends about 2 ms of CPU on each GET (endpoint rules, events,
    parameter validation, response parsing), more than a small ranged read
    costs S3 to serve; a mount reading small files makes thousands.  This
    sends the same request itself: the URL and signing region are those
    botocore used for the store's first GetObject (learned from that request's
    ``before-sign`` event, so endpoint_url, addressing style and region are
    botocore's own), signed by botocore's S3SigV4Auth (with the session's
    credentials, refreshed as botocore refreshes them), sent through a urllib3 pool as large as the client's and with
    its timeouts, and every answer is checked as S3Store checks botocore's."""

    def __init__(self, session, *, endpoint: str, pool_size: int, connect_timeout: float,
                 read_timeout: float):
        self._session = session
        self._endpoint = endpoint
        self._read_timeout = read_timeout
        self._pool = urllib3.PoolManager(
            num_pools=4, maxsize=pool_size, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        )
        self.base: str | None = None  # the URL of the store's keys, up to the key
        self._region = ""
        self._lock = threading.Lock()
        self._expected = threading.local()

    def learn(self, request, signature_version=None, region_name=None, **_kw) -> None:
        """botocore's before-sign handler: keep the URL and region of the first
        GetObject S3Store.load_range sent through botocore (``expect``)."""
        key = getattr(self._expected, "key", None)
        if key is None or self.base is not None or signature_version not in ("s3v4", "v4"):
            return
        url = request.url.split("?", 1)[0]
        quoted = quote(key, safe="/~")
        if not url.endswith("/" + quoted):
            return  # a URL this cannot rebuild: stay with botocore
        with self._lock:
            if self.base is None:
                base = url[:len(url) - len(quoted)]
                self._region = request.context.get("signing", {}).get("region") or region_name or "us-east-1"
                self.base = base

    def expect(self, s3_key: str | None) -> None:
        """The key of the GetObject this thread is about to send through botocore."""
        self._expected.key = s3_key

    def signed_headers(self, url: str, byte_range: str) -> dict[str, str]:
        """The headers of ``GET url`` with a Range header, signed by botocore's
        own S3SigV4Auth with the session's current credentials (refreshed as
        botocore refreshes them).  Signing alone costs about 80 us of CPU; the
        rest of botocore's 2 ms a request is what this class leaves out."""
        creds = self._session.get_credentials()
        if creds is None:
            raise bx.NoCredentialsError()
        request = AWSRequest(method="GET", url=url, headers={"Range": byte_range})
        S3SigV4Auth(creds.get_frozen_credentials(), "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    def get(self, s3_key: str, offset: int, length: int) -> tuple[int, urllib3.HTTPHeaderDict, bytes]:
        """Send ``GET s3_key`` for ``length`` bytes from ``offset``: the answer's
        status, headers and whole body as received (a transport failure raised
        as TransientError or StorageError, botocore's credential errors as they are)."""
        url = self.base + quote(s3_key, safe="/~")
        headers = self.signed_headers(url, f"bytes={offset}-{offset + length - 1}")
        try:
            resp = self._pool.request("GET", url, headers=headers,
                                      preload_content=False, decode_content=False, redirect=False)
            try:
                # A body shorter than its Content-Length raises (urllib3 enforces it).
                data = resp.read()
            finally:
                resp.release_conn()
        except urllib3.exceptions.MaxRetryError as exc:  # (retries=False raises the reason itself)
            raise self._transport_error(exc.reason or exc) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise self._transport_error(exc) from exc
        return resp.status, resp.headers, data

    def _transport_error(self, exc: Exception) -> Exception:
        endpoint = self._endpoint
        if isinstance(exc, urllib3.exceptions.SSLError):
            return StorageError(f"TLS error talking to S3 endpoint {endpoint}: {exc}")
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            return TransientError(f"S3 endpoint {endpoint} did not answer within {self._read_timeout:g}s",
                                  unreachable=True)
        if isinstance(exc, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.NewConnectionError,
                            urllib3.exceptions.NameResolutionError, urllib3.exceptions.ProxyError)):
            return TransientError(f"cannot reach S3 endpoint {endpoint}", unreachable=True)
        return TransientError(f"connection to S3 endpoint {endpoint} broke: {exc}", unreachable=True)

    def close(self) -> None:
        self._pool.clear()


# What botocore accepts before it sends anything (its own check gives a
# multi-line message naming two regular expressions).
_BUCKET_NAME = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")


class S3Store(Store):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_pool_connections: int = 32,
        attempts: int = 5,
        deadline_s: float = 60.0,
        lean_get: bool | None = None,
    ):
        self.bucket = bucket
        prefix = prefix.strip("/")
        self._root = prefix + "/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._read_timeout = read_timeout
        self._attempts = attempts
        self._deadline_s = deadline_s
        self._bucket_checked = False
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            retries={"mode": "standard", "total_max_attempts": 1},  # retry.py retries
        )
        try:
            # A private session: boto3's default session is not thread-safe.
            # The client is, and is shared by every thread using this store.
            session = boto3.session.Session()
            self._client = session.client(
                "s3",
                endpoint_url=endpoint_url or _default_endpoint(),
                region_name=region,
                config=config,
            )
        except (bx.BotoCoreError, ValueError) as exc:  # ValueError: malformed endpoint URL
            raise StorageError(f"cannot set up S3 client for {self.url}: {exc}") from exc
        self.endpoint_url = self._client.meta.endpoint_url
        # Ranged GETs by the lean path (_LeanGet), once botocore's first one
        # showed where they go.  COMMITFS_S3_LEAN_GET=0 keeps them all in botocore.
        if lean_get is None:
            lean_get = os.environ.get("COMMITFS_S3_LEAN_GET", "1") != "0"
        self._lean: _LeanGet | None = None
        if lean_get:
            self._lean = _LeanGet(session, endpoint=self.endpoint_url, pool_size=max_pool_connections,
                                  connect_timeout=connect_timeout, read_timeout=read_timeout)
            self._client.meta.events.register("before-sign.s3.GetObject", self._lean.learn)

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None, **opts) -> S3Store:
        """Open ``s3://BUCKET[/PREFIX]``; ``opts`` are the constructor's keywords."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not url.startswith("s3://") or not bucket:
            raise RepositoryError(f"bad S3 URL {url!r}: expected s3://BUCKET/PREFIX")
        if not _BUCKET_NAME.fullmatch(bucket):
            raise RepositoryError(f"bad S3 URL {url!r}: {bucket!r} is not a bucket name "
                                  "(letters, digits, '.', '-' and '_', at most 255)")
        return cls(bucket, prefix, endpoint_url=endpoint_url, **opts)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint_url!r})"

    # --- request plumbing ---------------------------------------------------
    def _call(self, verb: str, s3_key: str, fn: Callable[[], T]) -> T:
        """Run one request ``fn`` with retries, translating botocore errors."""
        what = f"{verb} s3://{self.bucket}/{s3_key}"

        def attempt() -> T:
            try:
                return fn()
            except (bx.ClientError, bx.BotoCoreError, ResponseParserError) as exc:
                raise self._translate(exc, what, s3_key) from exc
            except ValueError as exc:  # a header cut mid-value (botocore parses Last-Modified, dates...)
                raise _incomplete(f"a response that does not parse: {exc}") from exc

        return retry_call(attempt, what=what, attempts=self._attempts, deadline_s=self._deadline_s)

    def _translate(self, exc: Exception, what: str, s3_key: str) -> Exception:
        """The commitfs error (or TransientError, to retry) for a botocore error."""
        endpoint = self.endpoint_url
        if isinstance(exc, bx.ClientError):
            code, status = _error_code(exc)
            if code == "NoSuchBucket":
                return RepositoryNotFoundError(f"bucket {self.bucket} does not exist")
            if code in ("NoSuchKey", "404") or status == 404:
                return ObjectNotFoundError(f"s3://{self.bucket}/{s3_key} does not exist")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return RefConflictError(f"s3://{self.bucket}/{s3_key} changed meanwhile")
            if code in _ACCESS_CODES or status == 403:
                return StorageError(f"access denied to {self.url} ({code}): check credentials")
            message = " ".join(str(exc.response.get("Error", {}).get("Message") or code).split())
            if status >= 500 or code in _TRANSIENT_CODES:
                return TransientError(f"S3 answered {status} {code}: {message}")
            return StorageError(f"{what}: {code}: {message}")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
            return StorageError(
                f"no usable AWS credentials for {self.url} ({exc}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an instance/task role is available"
            )
        if isinstance(exc, bx.SSLError):  # a certificate problem does not go away by retrying
            return StorageError(f"TLS error talking to S3 endpoint {endpoint}: {exc}")
        if isinstance(exc, bx.ConnectionError):  # refused, DNS, connect timeout, proxy
            return TransientError(f"cannot reach S3 endpoint {endpoint}", unreachable=True)
        if isinstance(exc, bx.ReadTimeoutError):
            return TransientError(f"S3 endpoint {endpoint} did not answer within {self._read_timeout:g}s",
                                  unreachable=True)
        if isinstance(exc, ResponseParserError):  # a body cut short: not XML any more
            return TransientError(f"incomplete answer from S3 endpoint {endpoint} (unparsable)", unreachable=True)
        if isinstance(exc, (bx.HTTPClientError, bx.ResponseStreamingError, bx.IncompleteReadError)):
            return TransientError(f"connection to S3 endpoint {endpoint} broke: {exc}", unreachable=True)
        return StorageError(" ".join(f"{what}: {exc}".split()))  # one line, whatever botocore says

    def _s3_key(self, key: str) -> str:
        return self._root + _check_name(key)

    def _ref_key(self, name: str) -> str:
        return self._root + _REFS + _check_name(name)

    def _check_bucket(self) -> None:
        """Raise RepositoryNotFoundError if the bucket is missing.

        Needed after a HEAD answered 404: a HEAD response has no body, so a
        missing object and a missing bucket look alike."""
        if self._bucket_checked:
            return
        try:
            self._call("HEAD", "", lambda: self._client.head_bucket(Bucket=self.bucket))
        except ObjectNotFoundError:
            raise RepositoryNotFoundError(f"bucket {self.bucket} does not exist") from None
        self._bucket_checked = True

    def _list(self, s3_prefix: str) -> Iterator[str]:
        """Every S3 key starting with ``s3_prefix``, one page request at a time."""
        for entry in self._list_entries(s3_prefix):
            yield entry["Key"]

    def _list_entries(self, s3_prefix: str) -> Iterator[dict]:
        """Every listing entry (Key, Size, LastModified) under ``s3_prefix``."""
        kwargs = {"Bucket": self.bucket, "Prefix": s3_prefix}

        def get_page() -> dict:
            page = self._client.list_objects_v2(**kwargs)
            contents = page.get("Contents", ())
            if "IsTruncated" not in page:  # an empty body: the answer was cut in its headers
                raise _incomplete("a listing page without IsTruncated")
            if not all("Key" in e for e in contents) or (
                    "KeyCount" in page and int(page["KeyCount"]) != len(contents)):
                raise _incomplete(f"a listing page of {len(contents)} keys, KeyCount {page.get('KeyCount')}")
            if page["IsTruncated"] and not page.get("NextContinuationToken"):
                raise _incomplete("a truncated listing without a continuation token")
            return page

        while True:
            page = self._call("LIST", s3_prefix, get_page)
            for entry in page.get("Contents", ()):
                yield entry
            if not page["IsTruncated"]:
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    # --- objects -------------------------------------------------------------
    def save_object(self, key: str, data: bytes) -> None:
        # One PUT (up to 5 GiB) is atomic: readers see the old state or all of it.
        s3_key = self._s3_key(key)
        if not isinstance(data, bytes):
            data = bytes(data)  # botocore signs and sends bytes, not arbitrary buffers

        def put() -> None:
            if "ETag" not in self._client.put_object(Bucket=self.bucket, Key=s3_key, Body=data):
                raise _incomplete("a PUT answer without an ETag")  # rewriting is harmless

        self._call("PUT", s3_key, put)

    def save_object_from(self, key: str, f: BinaryIO, size: int) -> None:
        """Streamed: a multipart upload of parts of _PART_SIZE read one at a time
        (the object appears whole when the upload completes, or not at all; a
        failed upload is aborted); an object of one part is one PUT."""
        if size <= _PART_SIZE:
            super().save_object_from(key, f, size)
            return
        s3_key = self._s3_key(key)
        upload = self._call("POST", s3_key, lambda: self._client.create_multipart_upload(
            Bucket=self.bucket, Key=s3_key))["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, _PART_SIZE), start=1):
                f.seek(offset)
                body = f.read(min(_PART_SIZE, size - offset))
                if len(body) != min(_PART_SIZE, size - offset):
                    raise ValueError(f"{key}: the file ended before {size} bytes")

                def put(number=number, body=body) -> str:
                    etag = self._client.upload_part(Bucket=self.bucket, Key=s3_key, UploadId=upload,
                                                    PartNumber=number, Body=body).get("ETag")
                    if not etag:
                        raise _incomplete("an UploadPart answer without an ETag")
                    return etag

                parts.append({"PartNumber": number, "ETag": self._call("PUT", s3_key, put)})

            def complete() -> None:
                try:
                    self._client.complete_multipart_upload(
                        Bucket=self.bucket, Key=s3_key, UploadId=upload, MultipartUpload={"Parts": parts})
                except bx.ClientError as exc:
                    # NoSuchUpload on a retry: an earlier attempt completed the upload and
                    # its answer was lost. The object that is there now settles it: it is
                    # this upload's only if its ETag is the one these parts make.
                    if _error_code(exc)[0] != "NoSuchUpload":
                        raise
                    if not self._completed_as(s3_key, parts, size):
                        raise StorageError(f"POST s3://{self.bucket}/{s3_key}: the multipart upload is gone "
                                           "(aborted?) and the object there, if any, is not its") from None

            self._call("POST", s3_key, complete)
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=s3_key, UploadId=upload)
            except Exception:  # best effort: a bucket's lifecycle rule removes what is left
                log.warning("could not abort the multipart upload of s3://%s/%s", self.bucket, s3_key)
            raise

    def _completed_as(self, s3_key: str, parts: list[dict], size: int) -> bool:
        """Whether the object at ``s3_key`` is the multipart upload of ``parts``
        (``size`` bytes): its ETag is the MD5 of the parts' MD5s, then "-" and their
        count. Where the parts' ETags are not MD5s (SSE-KMS), the count and the size."""
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=s3_key)
        except bx.ClientError:
            return False
        etag = str(head.get("ETag", "")).strip('"')
        try:
            digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)
        except ValueError:
            digests = b""
        if len(digests) == 16 * len(parts):
            return etag == f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"
        return etag.endswith(f"-{len(parts)}") and int(head.get("ContentLength", -1)) == size

    def load_object(self, key: str) -> bytes:
        s3_key = self._s3_key(key)
        # The body is read inside the retried call: a connection dropping
        # mid-body is retried like one dropping before the answer.
        return self._call("GET", s3_key, lambda: _read_body(self._client.get_object(Bucket=self.bucket, Key=s3_key)))

    def load_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length} of {key!r}")
        if length == 0:
            return b""
        s3_key = self._s3_key(key)

        def get() -> bytes:
            lean = self._lean
            if lean is not None and lean.base is not None:
                try:
                    return self._lean_range(lean, s3_key, offset, length)
                except _Elsewhere as exc:
                    log.info("ranged GETs of %s go through botocore from now on: %s", self.url, exc)
                    self._lean = None
            if lean is not None:
                lean.expect(s3_key)  # the first GET shows the lean path its URL and region
            try:
                resp = self._client.get_object(
                    Bucket=self.bucket, Key=s3_key, Range=f"bytes={offset}-{offset + length - 1}"
                )
            except bx.ClientError as exc:
                if _error_code(exc)[0] == "InvalidRange":  # offset at or past the end
                    return b""
                raise
            finally:
                if lean is not None:
                    lean.expect(None)
            data = _read_body(resp)
            return _ranged_body(data, resp.get("ContentRange"), offset, length)

        return self._call("GET", s3_key, get)

    def _lean_range(self, lean: _LeanGet, s3_key: str, offset: int, length: int) -> bytes:
        """load_range's request by the lean path: the same checks, the same errors."""
        status, headers, data = lean.get(s3_key, offset, length)
        if status >= 300:
            code = _XML_CODE.search(data)
            code = code.group(1).decode(errors="replace") if code else str(status)
            if status in (301, 302, 307, 308) or code in _ELSEWHERE_CODES:
                raise _Elsewhere(f"{status} {code}")
            if code == "InvalidRange" or status == 416:  # offset at or past the end
                return b""
            message = _XML_MESSAGE.search(data)
            error = {"Code": code, "Message": message.group(1).decode(errors="replace") if message else code}
            exc = bx.ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
            if status in _TRANSIENT_STATUSES:
                raise TransientError(f"S3 answered {status} {code}: {error['Message']}")
            raise self._translate(exc, f"GET s3://{self.bucket}/{s3_key}", s3_key)
        if status not in (200, 206):
            raise _incomplete(f"HTTP {status} to a ranged GET")
        if "content-length" not in headers:
            raise _incomplete("no Content-Length")
        if len(data) != int(headers["content-length"]):
            raise _incomplete(f"{len(data)} of {headers['content-length']} bytes")
        return _ranged_body(data, headers.get("content-range"), offset, length)

    def lookup_size(self, key: str) -> int | None:
        s3_key = self._s3_key(key)
        def head() -> int:
            resp = self._client.head_object(Bucket=self.bucket, Key=s3_key)
            if "ContentLength" not in resp:
                raise _incomplete("a HEAD answer without Content-Length")
            return int(resp["ContentLength"])

        try:
            return self._call("HEAD", s3_key, head)
        except ObjectNotFoundError:
            self._check_bucket()
            return None

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        if prefix:
            _check_name(prefix)
        for s3_key in self._list(self._root + prefix):
            key = s3_key[len(self._root):]
            # References live beside objects but are not objects; keys ending
            # in '/' are "folder" markers other S3 tools create.
            if key.startswith(_REFS) or key.endswith("/"):
                continue
            if not valid_key(key):
                log.warning("ignoring S3 key %r: not a key commitfs writes", s3_key)
                continue
            yield key

    def iter_objects(self, prefix: str = "") -> Iterator[tuple[str, int, float | None]]:
        if prefix:
            _check_name(prefix)
        for entry in self._list_entries(self._root + prefix):
            key = entry["Key"][len(self._root):]
            if key.startswith(_REFS) or key.endswith("/") or not valid_key(key):
                continue
            modified = entry.get("LastModified")
            yield key, int(entry.get("Size", 0)), modified.timestamp() if modified is not None else None

    def remove_object(self, key: str) -> None:
        # S3 answers 204 for an absent key too: removal is idempotent.
        s3_key = self._s3_key(key)
        self._call("DELETE", s3_key, lambda: self._client.delete_object(Bucket=self.bucket, Key=s3_key))

    # --- references ----------------------------------------------------------
    def _read_ref(self, name: str) -> tuple[bytes, str] | None:
        """The reference's value and ETag, or None if it does not exist."""
        s3_key = self._ref_key(name)

        def get() -> tuple[bytes, str]:
            resp = self._client.get_object(Bucket=self.bucket, Key=s3_key)
            if "ETag" not in resp:
                raise _incomplete("a GET answer without an ETag")
            return _read_body(resp), resp["ETag"]

        try:
            return self._call("GET", s3_key, get)
        except ObjectNotFoundError:
            return None

    def load_ref(self, name: str) -> bytes | None:
        found = self._read_ref(name)
        return None if found is None else found[0]

    def save_ref_if_equals(self, name: str, new: bytes | None, expected: bytes | None) -> None:
        s3_key = self._ref_key(name)
        conflict = RefConflictError(f"reference {name} changed meanwhile")
        if expected is None:
            if new is None:  # "delete if absent": nothing to write, only to check
                if self._read_ref(name) is not None:
                    raise conflict
                return
            verb = "PUT"
            condition = {"IfNoneMatch": "*"}
        else:
            current = self._read_ref(name)
            if current is None or current[0] != expected:
                raise conflict
            # The write only succeeds if the object still is the version we read.
            verb = "PUT" if new is not None else "DELETE"
            condition = {"IfMatch": current[1]}

        tries = 0

        def write() -> None:
            nonlocal tries
            tries += 1
            if new is None:
                # Conditional DELETE is honoured by AWS S3 and moto.  A server
                # ignoring If-Match here would leave a small window between our
                # read and the delete in which another writer's update is lost.
                self._client.delete_object(Bucket=self.bucket, Key=s3_key, **condition)
            else:
                self._client.put_object(Bucket=self.bucket, Key=s3_key, Body=new, **condition)

        try:
            self._call(verb, s3_key, write)
        except (RefConflictError, ObjectNotFoundError):  # 412/409, or 404: deleted meanwhile
            # If an earlier attempt failed transiently, it may have succeeded
            # on the server with only its answer lost; the retry then fails
            # its own precondition.  The reference holding ``new`` means our
            # write (or an identical one) took effect: the swap is done.
            if tries > 1 and self.load_ref(name) == new:
                return
            raise conflict from None

    def iter_refs(self, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        base = self._root + _REFS
        for s3_key in self._list(base + prefix):
            name = s3_key[len(base):]
            if name.endswith("/"):
                continue  # a "folder" marker
            if not valid_key(name):
                log.warning("ignoring S3 key %r: not a reference name commitfs writes", s3_key)
                continue
            value = self.load_ref(name)
            if value is not None:  # deleted since the listing
                yield name, value

    def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        self._client.close()
