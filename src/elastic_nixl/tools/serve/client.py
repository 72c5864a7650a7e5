"""The P/D proxy flow of vLLM's toy proxy, and the served-whole baseline.

vLLM's ``tests/v1/kv_connector/nixl_integration/toy_proxy_server.py`` (0.32)
does, per request: POST the prompt to the prefill server's
``/v1/completions`` with ``max_tokens: 1``, ``stream: false`` and
``kv_transfer_params`` ``{"do_remote_decode": true, "do_remote_prefill":
false, "remote_engine_id": null, "remote_block_ids": null, "remote_host":
null, "remote_port": null}`` and an ``X-Request-Id`` header; take the
``kv_transfer_params`` of the response; POST the original request to the
decode server with them (same ``X-Request-Id``). :class:`PDClient` does the
same, without a proxy process, and adds what a comparison needs: greedy
sampling (``temperature: 0``), ``ignore_eos`` (fixed lengths),
``return_token_ids`` (token ids, not only text) and a streamed decode so
that the time to first token is measured where the user sees it.

:meth:`PDClient.whole` sends the same request without ``kv_transfer_params``
to a server (by default the decode server, which then computes the prompt
itself): the non-disaggregated baseline. Only the standard library is used.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_TIMEOUT_S = 300.0

PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""The ``kv_transfer_params`` vLLM's toy proxy sends to the prefill server."""


class RequestFailed(RuntimeError):
    """A completion request did not produce a completion."""

    def __init__(self, what: str, status: int | None, body: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:2000]}")
        self.what = what
        self.status = status
        self.body = body


@dataclass
class Completion:
    """What one completion request returned, and when."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    ttft_s: float  # from ``t0`` (see the methods) to the first token
    total_s: float
    prompt_tokens: int | None = None
    kv_transfer_params: dict[str, Any] | None = None


@dataclass
class PDResult:
    """One request through the proxy flow."""

    prompt_tokens: int
    prefill_s: float
    kv_transfer_params: dict[str, Any]
    completion: Completion
    prefill_token_ids: list[int] = field(default_factory=list)

    @property
    def remote_blocks(self) -> int:
        """Blocks the decode was told to read (all KV cache groups)."""
        ids = self.kv_transfer_params.get("remote_block_ids") or []
        return sum(len(g) for g in ids if isinstance(g, list))


def _connection(base_url: str, timeout: float) -> http.client.HTTPConnection:
    u = urlsplit(base_url)
    host = u.hostname or "127.0.0.1"
    return http.client.HTTPConnection(host, u.port, timeout=timeout)


def post_json(
    base_url: str,
    path: str,
    body: dict[str, Any],
    *,
    request_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    what: str = "request",
) -> dict[str, Any]:
    """POST ``body`` as JSON; the decoded answer, or :class:`RequestFailed`."""
    conn = _connection(base_url, timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if request_id:
            headers["X-Request-Id"] = request_id
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        raw = resp.read().decode(errors="replace")
        if resp.status != 200:
            raise RequestFailed(what, resp.status, raw)
        out = json.loads(raw)
        if not isinstance(out, dict):
            raise RequestFailed(what, resp.status, raw)
        return out
    except (OSError, http.client.HTTPException) as e:
        raise RequestFailed(what, None, f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()


def stream_completion(
    base_url: str,
    body: dict[str, Any],
    *,
    t0: float,
    request_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    what: str = "request",
) -> Completion:
    """POST a streamed ``/v1/completions`` and collect it (server-sent events).

    ``t0`` is the ``time.monotonic()`` that ``ttft_s`` and ``total_s`` count
    from. An error the server reports inside the stream raises
    :class:`RequestFailed` too.
    """
    body = dict(body, stream=True, stream_options={"include_usage": True})
    conn = _connection(base_url, timeout)
    token_ids: list[int] = []
    text: list[str] = []
    finish: str | None = None
    ttft: float | None = None
    usage: dict[str, Any] | None = None
    try:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if request_id:
            headers["X-Request-Id"] = request_id
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RequestFailed(what, resp.status, resp.read().decode(errors="replace"))
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RequestFailed(what, resp.status, json.dumps(event))
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                ids = choice.get("token_ids") or []
                if ids and ttft is None:
                    ttft = time.monotonic() - t0
                token_ids.extend(int(i) for i in ids)
                text.append(choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise RequestFailed(what, None, f"{type(e).__name__}: {e}") from e
    finally:
        conn.close()
    total = time.monotonic() - t0
    return Completion(
        token_ids=token_ids,
        text="".join(text),
        finish_reason=finish,
        ttft_s=ttft if ttft is not None else total,
        total_s=total,
        prompt_tokens=(usage or {}).get("prompt_tokens"),
    )


class PDClient:
    """Prefill -> decode the way vLLM's toy proxy does, plus the baseline."""

    def __init__(
        self,
        prefill_url: str,
        decode_url: str,
        model: str,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.prefill_url = prefill_url
        self.decode_url = decode_url
        self.model = model
        self.timeout = timeout

    def body(self, prompt: str | list[int], max_tokens: int) -> dict[str, Any]:
        """The request a user would send: greedy, fixed length, token ids."""
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }

    def prefill(
        self, prompt: str | list[int], request_id: str
    ) -> tuple[dict[str, Any], list[int], dict[str, Any]]:
        """Step 1: (kv_transfer_params, prefill's token ids, full response)."""
        body = dict(
            self.body(prompt, 1), stream=False, kv_transfer_params=dict(PREFILL_PARAMS)
        )
        out = post_json(
            self.prefill_url,
            "/v1/completions",
            body,
            request_id=request_id,
            timeout=self.timeout,
            what="prefill",
        )
        params = out.get("kv_transfer_params")
        if not isinstance(params, dict):
            raise RequestFailed(
                "prefill", 200, f"no kv_transfer_params in the answer: {out}"
            )
        choice = (out.get("choices") or [{}])[0]
        return params, list(choice.get("token_ids") or []), out

    def decode(
        self,
        prompt: str | list[int],
        kv_transfer_params: dict[str, Any] | None,
        max_tokens: int,
        *,
        request_id: str,
        t0: float,
    ) -> Completion:
        """Step 2: the request with the prefill's params, streamed from decode."""
        body = self.body(prompt, max_tokens)
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        return stream_completion(
            self.decode_url,
            body,
            t0=t0,
            request_id=request_id,
            timeout=self.timeout,
            what="decode",
        )

    def disaggregated(self, prompt: str | list[int], max_tokens: int) -> PDResult:
        """Both steps; TTFT counts from before the prefill request."""
        rid = f"pd-{uuid.uuid4().hex}"
        t0 = time.monotonic()
        params, first, out = self.prefill(prompt, rid)
        prefill_s = time.monotonic() - t0
        comp = self.decode(prompt, params, max_tokens, request_id=rid, t0=t0)
        usage = out.get("usage") or {}
        return PDResult(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            prefill_s=prefill_s,
            kv_transfer_params=params,
            completion=comp,
            prefill_token_ids=first,
        )

    def whole(
        self, prompt: str | list[int], max_tokens: int, url: str | None = None
    ) -> Completion:
        """The same request served whole (no ``kv_transfer_params``)."""
        t0 = time.monotonic()
        return stream_completion(
            url or self.decode_url,
            self.body(prompt, max_tokens),
            t0=t0,
            request_id=f"whole-{uuid.uuid4().hex}",
            timeout=self.timeout,
            what="whole",
        )
