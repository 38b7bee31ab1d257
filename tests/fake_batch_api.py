"""A fake of OpenAI's Batch API (Files + Batches) for tests of a client that batches a step.

``FakeBatchAPI`` is a :class:`~tests.fake_openai.FakeOpenAI` (same online chat completions,
probes, ``requests``/``probes`` records and fault options) that also serves:

* ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files``, ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content`` and ``DELETE /v1/files/{id}``;
* ``POST /v1/batches``, ``GET /v1/batches`` (``limit``/``after``), ``GET /v1/batches/{id}`` and
  ``POST /v1/batches/{id}/cancel``.

A batch lives in a thread of its own and walks the documented states: ``validating`` for
``validating_seconds``; then ``failed`` (``errors.data`` has one entry per bad line) or
``in_progress``, answering its requests one by one over ``seconds``; then ``finalizing`` and
``completed``. ``expire_after`` ends batches in ``expired`` after that many requests, ``fail_fn``
fails single requests with an HTTP status, ``hold()`` keeps batches in ``in_progress`` until
``release()`` (for tests that kill the client while a batch runs), and a cancel goes through
``cancelling`` to ``cancelled``. Options are read when a batch gets to them, so a test may change
them (``server.expire_after = None``) between batches.

Result files are written the way OpenAI writes them, which a client must cope with: lines come
in no particular order (``shuffle_output``), ``output_file_id`` is null when no request
succeeded and ``error_file_id`` is null when none failed.
"""

from __future__ import annotations

import copy
import json
import random
import re
import socket
import threading
import time
import uuid
from email.parser import BytesHeaderParser
from email.policy import HTTP
from urllib.parse import parse_qs, urlsplit

from .fake_openai import FakeOpenAI, echo, limited

ENDPOINT = "/v1/chat/completions"  # the only endpoint this fake batches
COMPLETION_WINDOW = "24h"
WINDOW_SECONDS = 24 * 3600
MAX_REQUESTS = 50_000  # OpenAI's limit on requests per batch
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
FINAL = {"completed", "failed", "expired", "cancelled"}

_FILES = re.compile(r"^/v1/files(?:/(?P<id>[^/]+)(?P<content>/content)?)?/?$")
_BATCHES = re.compile(r"^/v1/batches(?:/(?P<id>[^/]+)(?P<cancel>/cancel)?)?/?$")


def _hex(n: int = 24) -> str:
    return uuid.uuid4().hex[:n]


def _error(message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> dict:
    """An error body as OpenAI sends it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """A refused API call: the handler answers ``status`` with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = _error(message, param, code)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body, byte-exact.

    Args:
        content_type: The request's Content-Type header, with its ``boundary``.
        body: The raw request body.

    Returns:
        ``{name: (filename or None, bytes)}``.

    Raises:
        ApiError: No boundary or a part without a name.
    """
    header = BytesHeaderParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode())
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not boundary:
        raise ApiError(400, "Expected a multipart/form-data body with a boundary.")
    fields = {}
    # The email package's message parser would do, but it may rewrite line endings inside a
    # part; a JSONL upload has to come back byte for byte, so the parts are split by hand.
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = BytesHeaderParser(policy=HTTP).parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if not name:
            raise ApiError(400, "A multipart part has no name.")
        fields[name] = (headers.get_filename(), content.removesuffix(b"\r\n"))
    return fields


class FakeBatchAPI(FakeOpenAI):
    """An OpenAI-compatible server with the Files and Batches APIs, for tests.

    Use it like ``FakeOpenAI``: ``with FakeBatchAPI() as server: ... server.base_url``.

    Args:
        reply_fn: ``reply_fn(body, index) -> str``, the text of choice ``index`` of a request;
            cut after ``max_tokens`` words with finish reason ``length``. Also answers online.
        seconds: How long answering all requests of a batch takes (spread evenly over them).
        validating_seconds: How long a batch stays in ``validating``.
        finalizing_seconds: How long a batch stays in ``finalizing``.
        fail_fn: ``fail_fn(custom_id, body) -> None | int``; an int fails that request with
            this HTTP status (the line goes to the error file and counts as failed).
        usage_fn: ``usage_fn(body) -> dict`` with ``prompt_tokens`` and ``completion_tokens``
            (``total_tokens`` is added when missing); by default 7 and 3 per choice.
        expire_after: Answer only this many requests of each batch, then let it expire.
        shuffle_output: Write result lines in a shuffled order (OpenAI promises no order).
        **online: The other ``FakeOpenAI`` options (``fault_fn``, ``latency``, ``models``,
            ``honours_n``, ``accepts``, ...). ``models`` also fails batch lines naming another
            model (``model_not_found``) and ``accepts`` fails requests with other fields (400).

    Attributes:
        files: ``{file_id: {"object": file object, "content": bytes}}``, uploads and results.
        deleted_files: Ids of files deleted through the API, in order.
        batches: ``{batch_id: batch object}``, the live state (the API serves copies).
        created: Batch ids in creation order.
        batch_requests: ``(batch_id, custom_id, body)`` of every request a batch answered, with
            a reply or an error status, in the order answered: what would be billed. Requests
            left unanswered by expiry or a cancel are not in it.
        polls: How many ``GET /v1/batches/{id}`` calls were made.
        requests, probes, served: The online records ``FakeOpenAI`` keeps.

    Test hooks: :meth:`hold`, :meth:`release`, :meth:`wait_for_batches`, :meth:`wait_for_status`.
    """

    def __init__(self, reply_fn=echo, *, seconds: float = 0.2, validating_seconds: float = 0.05,
                 finalizing_seconds: float = 0.01, fail_fn=None, usage_fn=None,
                 expire_after: int | None = None, shuffle_output: bool = True, **online):
        super().__init__(reply_fn=reply_fn, **online)
        self.seconds = seconds
        self.validating_seconds = validating_seconds
        self.finalizing_seconds = finalizing_seconds
        self.fail_fn = fail_fn  # distinct from FakeOpenAI's fault_fn, which is for online requests
        self.usage_fn = usage_fn
        self.expire_after = expire_after
        self.shuffle_output = shuffle_output
        self.files: dict[str, dict] = {}
        self.deleted_files: list[str] = []
        self.batches: dict[str, dict] = {}
        self.created: list[str] = []
        self.batch_requests: list[tuple[str, str, dict]] = []
        self.polls = 0
        # One lock for everything, FakeOpenAI's records included; the condition on it wakes
        # batch threads on cancel, release and shutdown, and wait_for_batches on creation.
        self.changed = threading.Condition(self.lock)
        self._held = False
        self._closed = False
        self._workers: list[threading.Thread] = []
        # FakeOpenAI builds its handler class inside __init__; the batch routes go in a subclass
        # of it, which the server instantiates per connection from RequestHandlerClass.
        self.httpd.RequestHandlerClass = _batch_handler(self, self.httpd.RequestHandlerClass)
        # serve_forever's default poll of 0.5 s is what shutdown() waits for at every test's end.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # ----------------------------------------------------------------------------- test hooks

    def hold(self) -> None:
        """Keep every batch in ``in_progress`` with nothing more answered until :meth:`release`."""
        with self.changed:
            self._held = True

    def release(self) -> None:
        """Let held batches go on."""
        with self.changed:
            self._held = False
            self.changed.notify_all()

    def wait_for_batches(self, count: int, timeout: float = 10.0) -> list[str]:
        """Block until at least ``count`` batches were created.

        Returns:
            The ids of the batches created so far, in creation order.

        Raises:
            TimeoutError: Fewer than ``count`` batches after ``timeout`` seconds.
        """
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.created) >= count, timeout):
                raise TimeoutError(f"{len(self.created)} batches created in {timeout}s, expected {count}")
            return list(self.created)

    def wait_for_status(self, batch_id: str, statuses: str | set[str] = FINAL, timeout: float = 10.0) -> dict:
        """Block until batch ``batch_id`` is in one of ``statuses`` (by default a final one).

        Returns:
            A copy of the batch object.

        Raises:
            TimeoutError: It was not after ``timeout`` seconds.
        """
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)
        with self.changed:
            if not self.changed.wait_for(lambda: self.batches[batch_id]["status"] in wanted, timeout):
                raise TimeoutError(f"batch {batch_id} is {self.batches[batch_id]['status']}, not {sorted(wanted)}")
            return copy.deepcopy(self.batches[batch_id])

    def __exit__(self, *exc):
        with self.changed:
            self._closed = True
            self.changed.notify_all()
        for worker in self._workers:
            worker.join(timeout=2)
        return super().__exit__(*exc)

    # ----------------------------------------------------------------------------------- files

    def _add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        """Stores a file (the caller holds the lock) and returns its object."""
        file = {"id": f"file-{_hex()}", "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "expires_at": None, "filename": filename, "purpose": purpose,
                "status": "processed", "status_details": None}  # the last two are deprecated but still sent
        self.files[file["id"]] = {"object": file, "content": content}
        return file

    def upload(self, content_type: str, body: bytes) -> dict:
        """``POST /v1/files``."""
        fields = parse_multipart(content_type, body)
        if "purpose" not in fields:
            raise ApiError(400, "Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        purpose = fields["purpose"][1].decode()
        if purpose != "batch":  # the only purpose this fake knows
            raise ApiError(400, f"'{purpose}' is not one of ['batch'] - 'purpose'", "purpose")
        if "file" not in fields or fields["file"][0] is None:
            raise ApiError(400, "Missing required parameter: 'file'.", "file", "missing_required_parameter")
        filename, content = fields["file"]
        if not filename.endswith(".jsonl"):
            raise ApiError(400, "Invalid file format for Batch API. Must be .jsonl", "file")
        with self.lock:
            return copy.deepcopy(self._add_file(content, filename, purpose))

    def _file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", "id")
        return self.files[file_id]

    def get_file(self, file_id: str) -> dict:
        """``GET /v1/files/{id}``."""
        with self.lock:
            return copy.deepcopy(self._file(file_id)["object"])

    def file_content(self, file_id: str) -> bytes:
        """``GET /v1/files/{id}/content``."""
        with self.lock:
            return self._file(file_id)["content"]

    def list_files(self, query: dict) -> dict:
        """``GET /v1/files`` (newest first, ``purpose`` filter; no paging: tests have few files)."""
        purpose = query.get("purpose", [None])[0]
        with self.lock:
            data = [copy.deepcopy(f["object"]) for f in reversed(self.files.values())
                    if purpose in (None, f["object"]["purpose"])]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}

    def delete_file(self, file_id: str) -> dict:
        """``DELETE /v1/files/{id}``."""
        with self.lock:
            self._file(file_id)
            del self.files[file_id]
            self.deleted_files.append(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # --------------------------------------------------------------------------------- batches

    def create_batch(self, payload: dict) -> dict:
        """``POST /v1/batches``: checks the call, stores the batch and starts its thread."""
        for field in ("input_file_id", "endpoint", "completion_window"):
            if field not in payload:
                raise ApiError(400, f"Missing required parameter: '{field}'.", field, "missing_required_parameter")
        if payload["endpoint"] != ENDPOINT:
            raise ApiError(400, f"Invalid value: '{payload['endpoint']}'. Supported values are: '{ENDPOINT}'.",
                           "endpoint", "invalid_value")
        if payload["completion_window"] != COMPLETION_WINDOW:
            raise ApiError(400, f"Invalid value: '{payload['completion_window']}'. Supported values are: "
                           f"'{COMPLETION_WINDOW}'.", "completion_window", "invalid_value")
        metadata = payload.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items())):
            raise ApiError(400, "Invalid 'metadata': at most 16 string pairs (keys up to 64 characters, "
                           "values up to 512).", "metadata", "invalid_value")
        with self.changed:
            file = self._file(payload["input_file_id"])["object"]
            file_content = self.files[file["id"]]["content"]
            if file["purpose"] != "batch":
                raise ApiError(400, f"File {file['id']} has purpose '{file['purpose']}', not 'batch'.",
                               "input_file_id")
            now = int(time.time())
            batch = {"id": f"batch_{_hex(32)}", "object": "batch", "endpoint": payload["endpoint"], "model": None,
                     "errors": None, "input_file_id": file["id"], "completion_window": COMPLETION_WINDOW,
                     "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
                     "in_progress_at": None, "expires_at": now + WINDOW_SECONDS, "finalizing_at": None,
                     "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
                     "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                     "usage": None, "metadata": metadata}
            self.batches[batch["id"]] = batch
            self.created.append(batch["id"])
            # The thread gets the content now: the input file may be deleted while the batch runs.
            worker = threading.Thread(target=self._run, args=(batch["id"], file_content), daemon=True,
                                      name=f"fake-{batch['id']}")
            self._workers.append(worker)
            self.changed.notify_all()
            served = copy.deepcopy(batch)
        worker.start()
        return served

    def _batch(self, batch_id: str) -> dict:
        if batch_id not in self.batches:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", "batch_id")
        return self.batches[batch_id]

    def get_batch(self, batch_id: str) -> dict:
        """``GET /v1/batches/{id}``, counted in ``polls``."""
        with self.lock:
            self.polls += 1
            return copy.deepcopy(self._batch(batch_id))

    def list_batches(self, query: dict) -> dict:
        """``GET /v1/batches``: newest first, ``limit`` (1 to 100, default 20) after ``after``."""
        try:
            limit = int(query.get("limit", ["20"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise ApiError(400, "Invalid 'limit': expected an integer between 1 and 100.", "limit", "invalid_value")
        with self.lock:
            ids = self.created[::-1]
            after = query.get("after", [None])[0]
            if after is not None:
                if after not in self.batches:
                    raise ApiError(404, f"No batch found with id '{after}'.", "after")
                ids = ids[ids.index(after) + 1:]
            data = [copy.deepcopy(self.batches[i]) for i in ids[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(ids) > limit}

    def cancel_batch(self, batch_id: str) -> dict:
        """``POST /v1/batches/{id}/cancel``: ``cancelling`` now, ``cancelled`` once its thread stops."""
        with self.changed:
            batch = self._batch(batch_id)
            if batch["status"] in FINAL:
                raise ApiError(409, f"Cannot cancel a batch with status '{batch['status']}'.")
            if batch["status"] != "cancelling":
                batch["status"] = "cancelling"
                batch["cancelling_at"] = int(time.time())
                self.changed.notify_all()
            return copy.deepcopy(batch)

    # ------------------------------------------------------------------------ batch processing

    def _set(self, batch: dict, status: str, **fields) -> None:
        """Moves a batch to ``status``, stamping ``<status>_at`` (the caller holds the lock)."""
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())
        batch.update(fields)
        self.changed.notify_all()

    def _wait(self, batch: dict, seconds: float, holdable: bool = False) -> bool:
        """Waits ``seconds`` (the caller holds the lock), then, if ``holdable``, while held.

        Returns:
            False when the batch is being cancelled or the server shuts down.
        """
        def stopped():
            return batch["status"] == "cancelling" or self._closed

        if seconds > 0:
            self.changed.wait_for(stopped, seconds)
        if holdable:
            self.changed.wait_for(lambda: stopped() or not self._held)
        return not stopped()

    def _run(self, batch_id: str, content: bytes) -> None:
        """A batch's life, in its own thread."""
        with self.changed:
            batch = self.batches[batch_id]
            if not self._wait(batch, self.validating_seconds):
                return self._stop(batch, [], [])
            lines, errors = self._validate(content, batch["endpoint"])
            if errors:
                return self._set(batch, "failed", errors={"object": "list", "data": errors})
            self._set(batch, "in_progress", model=lines[0]["body"]["model"],
                      request_counts={"total": len(lines), "completed": 0, "failed": 0},
                      usage={"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                             "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens_details": {"reasoning_tokens": 0}})
        answered = []  # result lines
        for number, line in enumerate(lines):
            with self.changed:
                if not self._wait(batch, self.seconds / len(lines), holdable=True):
                    return self._stop(batch, answered, lines[number:])
                if self.expire_after is not None and number >= self.expire_after:
                    return self._stop(batch, answered, lines[number:])
            result, usage = self._answer(line)  # outside the lock: reply_fn may be slow
            with self.changed:
                self.batch_requests.append((batch_id, line["custom_id"], line["body"]))
                answered.append(result)
                batch["request_counts"]["completed" if usage else "failed"] += 1
                if usage:
                    batch["usage"]["input_tokens"] += usage["prompt_tokens"]
                    batch["usage"]["output_tokens"] += usage["completion_tokens"]
                    batch["usage"]["total_tokens"] += usage["total_tokens"]
                self.changed.notify_all()
        with self.changed:
            # A cancel may have come while the last request was answered, outside the lock.
            if not self._wait(batch, 0):
                return self._stop(batch, answered, [])
            self._set(batch, "finalizing")
            if not self._wait(batch, self.finalizing_seconds):
                return self._stop(batch, answered, [])
            self._set(batch, "completed", **self._write_results(batch, answered, []))

    def _stop(self, batch: dict, answered: list[dict], unanswered: list[dict]) -> None:
        """Ends a batch that did not get through its requests (the caller holds the lock).

        A cancelled batch ends ``cancelled``; otherwise the window ran out (``expire_after``) and it
        ends ``expired``. Either way the answered requests go to the result files and each
        unanswered one gets an error line. Nothing is written after shutdown.
        """
        if self._closed:
            return
        cancelled = batch["status"] == "cancelling"
        code, message = ("batch_cancelled", CANCELLED_MESSAGE) if cancelled else ("batch_expired", EXPIRED_MESSAGE)
        unanswered = [{"id": f"batch_req_{_hex(32)}", "custom_id": line["custom_id"], "response": None,
                       "error": {"code": code, "message": message}} for line in unanswered]
        batch["request_counts"]["failed"] += len(unanswered)
        self._set(batch, "cancelled" if cancelled else "expired", **self._write_results(batch, answered, unanswered))

    def _write_results(self, batch: dict, answered: list[dict], unanswered: list[dict]) -> dict:
        """Writes the output and error files (the caller holds the lock); returns their ids.

        A file with no lines is not written and its id stays null, as OpenAI does.
        """
        ok = [r for r in answered if r["response"]["status_code"] == 200]
        bad = [r for r in answered if r["response"]["status_code"] != 200] + unanswered
        ids = {}
        for field, name, results in (("output_file_id", "output", ok), ("error_file_id", "error", bad)):
            if self.shuffle_output:  # seeded, so a failing test fails the same way again
                random.Random(f"{batch['id']}{name}").shuffle(results)
            content = "".join(json.dumps(r) + "\n" for r in results).encode()
            ids[field] = self._add_file(content, f"{batch['id']}_{name}.jsonl", "batch_output")["id"] \
                if results else None
        return ids

    def _validate(self, content: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
        """Parses and checks the input file (the caller holds the lock).

        Returns:
            The request lines and the errors, one per bad line (the first problem found on it),
            with OpenAI's codes where it documents them.
        """
        lines, errors, seen, model = [], [], set(), None

        def bad(number, code, message, param=None):
            errors.append({"code": code, "message": message, "param": param, "line": number})

        raw = [(n, text) for n, text in enumerate(content.decode("utf-8", "replace").splitlines(), 1)
               if text.strip()]
        if not raw:
            bad(None, "empty_file", "The batch input file is empty.")
        elif len(raw) > MAX_REQUESTS:
            bad(None, "too_many_tasks", f"The batch input file has {len(raw)} requests, more than the "
                f"{MAX_REQUESTS} allowed.")
        for number, text in raw if not errors else []:
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            if not isinstance(line, dict):
                bad(number, "invalid_json_line", "This line is not parseable as valid JSON.")
                continue
            missing = [f for f in ("custom_id", "method", "url", "body") if f not in line]
            body = line.get("body")
            if missing:
                bad(number, "missing_required_parameter", f"Missing required parameter: '{missing[0]}'.", missing[0])
            elif not isinstance(line["custom_id"], str):
                bad(number, "invalid_type", "Invalid type for 'custom_id': expected a string.", "custom_id")
            elif line["custom_id"] in seen:
                bad(number, "duplicate_custom_id", f"The custom_id '{line['custom_id']}' is not unique in this "
                    "batch; each request needs a custom_id of its own.", "custom_id")
            elif line["method"] != "POST":
                bad(number, "invalid_method", f"Invalid method '{line['method']}'; only 'POST' is supported.",
                    "method")
            elif line["url"] != endpoint:
                bad(number, "url_mismatch", f"The url '{line['url']}' does not match the batch's endpoint "
                    f"'{endpoint}'.", "url")
            elif not isinstance(body, dict):
                bad(number, "invalid_type", "Invalid type for 'body': expected an object.", "body")
            elif not isinstance(body.get("model"), str):
                bad(number, "missing_required_parameter", "Missing required parameter: 'body.model'.", "body.model")
            elif self.models is not None and body["model"] not in self.models:
                bad(number, "model_not_found", f"The model '{body['model']}' does not exist.", "body.model")
            elif model is not None and body["model"] != model:
                bad(number, "model_mismatch", f"The model '{body['model']}' differs from the batch's model "
                    f"'{model}'; a batch serves one model.", "body.model")
            else:
                model = model or body["model"]
            if isinstance(line.get("custom_id"), str):
                seen.add(line["custom_id"])
            lines.append(line)
        return lines, errors

    def _answer(self, line: dict) -> tuple[dict, dict | None]:
        """Answers one request line.

        Returns:
            Its result line and its usage (None when it failed).
        """
        body, request = line["body"], {"id": f"batch_req_{_hex(32)}", "custom_id": line["custom_id"], "error": None}
        status = self.fail_fn(line["custom_id"], body) if self.fail_fn is not None else None
        extra = sorted(set(body) - self.accepts) if self.accepts is not None else []
        if status is None and extra:
            status, message, param = 400, f"Unrecognized request argument supplied: {extra[0]}", extra[0]
        else:
            message = param = None
        if status is not None:
            if status >= 500:
                kind, code = "server_error", None
                message = "The server had an error while processing your request. Sorry about that!"
            elif status == 429:
                kind, code = "requests", "rate_limit_exceeded"
                message = "Rate limit reached for requests."
            else:
                kind, code = "invalid_request_error", None
                message = message or f"Request failed with status {status}."
            request["response"] = {"status_code": status, "request_id": _hex(32),
                                   "body": _error(message, param, code, kind)}
            return request, None
        n = int(body.get("n", 1)) if self.honours_n else 1
        replies = [limited(self.reply_fn(body, i), body) for i in range(n)]
        usage = dict(self.usage_fn(body)) if self.usage_fn else {"prompt_tokens": 7, "completion_tokens": 3 * n}
        usage.setdefault("total_tokens", usage["prompt_tokens"] + usage["completion_tokens"])
        completion = {"id": f"chatcmpl-{_hex(29)}", "object": "chat.completion", "created": int(time.time()),
                      "model": body["model"], "system_fingerprint": None, "usage": usage,
                      "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                   "logprobs": None, "finish_reason": finish}
                                  for i, (text, finish) in enumerate(replies)]}
        request["response"] = {"status_code": 200, "request_id": _hex(32), "body": completion}
        return request, usage


def _batch_handler(api: FakeBatchAPI, base: type) -> type:
    """FakeOpenAI's handler class with the Files and Batches routes in front of its own."""

    class BatchHandler(base):
        def setup(self):
            super().setup()
            # The handler writes headers and body separately; with Nagle's algorithm and the
            # client's delayed ACK, every poll would then take about 40 ms on loopback.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _body(self) -> bytes:
            """The request body; chunked too (FakeOpenAI's routes only see Content-Length)."""
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)

        def _answer(self, call) -> None:
            """Sends ``call()``'s JSON (or bytes) with 200, or the OpenAI error it raised."""
            try:
                result = call()
            except ApiError as error:
                return self._send(error.status, error.body)
            self._send(200, result, content_type="application/octet-stream" if isinstance(result, bytes)
                       else "application/json")

        def _json(self, body: bytes) -> dict:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                raise ApiError(400, "We could not parse the JSON body of your request.")
            return payload

        def do_GET(self):
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if match := _FILES.match(url.path):
                file_id = match["id"]
                if file_id is None:
                    return self._answer(lambda: api.list_files(query))
                if match["content"]:
                    return self._answer(lambda: api.file_content(file_id))
                return self._answer(lambda: api.get_file(file_id))
            if match := _BATCHES.match(url.path):
                if match["cancel"]:
                    return self._send(405, json.dumps(_error("Use POST to cancel a batch.")).encode())
                batch_id = match["id"]
                return self._answer(lambda: api.get_batch(batch_id) if batch_id else api.list_batches(query))
            return super().do_GET()

        def do_POST(self):
            path = urlsplit(self.path).path
            if _FILES.match(path):
                body = self._body()
                return self._answer(lambda: api.upload(self.headers.get("Content-Type", ""), body))
            if match := _BATCHES.match(path):
                body = self._body()
                if match["cancel"]:
                    return self._answer(lambda: api.cancel_batch(match["id"]))
                if match["id"]:
                    return self._send(404, json.dumps(_error(f"Invalid URL (POST {path})")).encode())
                return self._answer(lambda: api.create_batch(self._json(body)))
            return super().do_POST()

        def do_DELETE(self):
            self._body()  # keep-alive: read what was sent before answering
            match = _FILES.match(urlsplit(self.path).path)
            if match and match["id"] and not match["content"]:
                return self._answer(lambda: api.delete_file(match["id"]))
            return self._send(404, json.dumps(_error(f"Invalid URL (DELETE {self.path})")).encode())

    return BatchHandler
