"""A fake OpenAI Chat Completions upstream for tests, benchmarks and the offline dev stack.

It speaks the real wire format (``chat.completion`` objects and ``chat.completion.chunk``
SSE events ending with ``data: [DONE]``) so the official ``openai`` SDK parses it, and its
answers are a pure function of the request (see :func:`expected_content`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal, get_args, get_origin

import orjson
from aiohttp import web
from pydantic import ValidationError

from compose import fake_anthropic, fake_gemini
from compose.fake_scenario import (
    Ask,
    Failure,
    Plan,
    admit,
    answer_ready,
    fail,
    failing,
    plan,
    refusing,
    send_stream,
)
from compose.fake_state import (
    DEFAULT_MODELS,
    STATE_KEY,
    FakeConfig,
    FakeState,
    FakeStats,
)

_FINGERPRINT = "fp_switchyard_fake"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _answer_tokens(messages: Sequence[Mapping[str, object]], tokens: int) -> list[str]:
    word = "empty"
    for msg in reversed(messages):
        if isinstance(msg, Mapping) and msg.get("role") == "user":
            words = _text_of(msg.get("content")).split(maxsplit=1)
            word = words[0] if words else "empty"
            break
    return [f"{word}-{i} " for i in range(tokens)]


def expected_content(messages: Sequence[Mapping[str, object]], tokens: int) -> str:
    """The exact answer the fake gives to ``messages`` when it emits ``tokens`` tokens."""
    return "".join(_answer_tokens(messages, tokens))


def _error(status: int, message: str, etype: str, stats: FakeStats | None = None,
           code: str | None = None) -> web.Response:
    if stats is not None:
        stats.errors_sent += 1
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _failure(failure: Failure) -> web.Response:
    etype = {"rate_limited": "rate_limit_error", "bad_request": "invalid_request_error",
             "context_length": "invalid_request_error",
             "content_filter": "invalid_request_error"}
    code = {"context_length": "context_length_exceeded", "content_filter": "content_filter"}
    return _error(failure.status, failure.message, etype.get(failure.kind, "server_error"),
                  code=code.get(failure.kind))


_FINISH = {"stop": "stop", "length": "length", "tool_call": "tool_calls"}


def _usage(plan_: Plan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan_.prompt_tokens,
        "completion_tokens": plan_.completion_tokens,
        "total_tokens": plan_.prompt_tokens + plan_.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": plan_.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _ask(body: dict[str, Any]) -> Ask:
    messages = body["messages"]
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    tools = [t["function"]["name"] for t in body.get("tools") or ()
             if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name")
    fmt = body.get("response_format")
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return Ask(
        last_user_text=_text_of(user[-1].get("content")) if user else "",
        all_texts=[_text_of(m.get("content")) for m in messages if isinstance(m, dict)],
        tools=tools, tool_choice=choice if isinstance(choice, str) else None,
        json_mode=isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"),
        max_tokens=limit if isinstance(limit, int) else None,
        after_tool_result=isinstance(messages[-1], dict) and messages[-1].get("role") == "tool",
        prefill=isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant")


def _model_of(body: object) -> str | None:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


async def _chat(request: web.Request) -> web.StreamResponse:
    try:
        body = orjson.loads(await request.read())
    except ValueError:
        body = None  # refused below, once the call is counted like any other
    admitted = admit(request, _model_of(body))
    if isinstance(admitted, Failure):
        return await fail(request, request.app[STATE_KEY].stats, admitted, _failure)
    cfg, stats = admitted
    stats.last_chat = body if isinstance(body, dict) else None
    try:
        if not isinstance(body, dict):
            raise TypeError
        messages, model = body["messages"], body["model"]
        if not isinstance(messages, list) or not messages or not isinstance(model, str):
            raise TypeError
        ask = _ask(body)
        plan_ = plan(cfg, ask)
    except (ValueError, TypeError, KeyError):
        msg = "Expected a JSON object with 'model' (string) and 'messages' (non-empty array)."
        return _error(400, msg, "invalid_request_error", stats)
    if (failure := failing(request, cfg, stats, model)
            or refusing(request, cfg, stats, ask, plan_, "openai")) is not None:
        return await fail(request, stats, failure, _failure)

    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.get("stream"):
        opts = body.get("stream_options")
        with_usage = (isinstance(opts, dict) and bool(opts.get("include_usage"))
                      and not cfg.omit_stream_usage)
        return await _stream(request, stats, cfg, plan_, (cid, created, model, with_usage))
    if not await answer_ready(request, stats, cfg):
        return web.Response(status=499)
    message: dict[str, Any] = {"role": "assistant", "content": plan_.text, "refusal": None,
                               "annotations": []}
    if plan_.kind == "tool_call":
        message["content"] = None
        message["tool_calls"] = [{"id": plan_.tool_call_id, "type": "function",
                                  "function": {"name": plan_.tool_name,
                                               "arguments": plan_.text}}]
    payload = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": _FINGERPRINT,
        "service_tier": "default",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": _FINISH[plan_.finish],
                     "message": message}],
        "usage": _usage(plan_),
    }
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


async def _stream(
    request: web.Request,
    stats: FakeStats,
    cfg: FakeConfig,
    plan_: Plan,
    meta: tuple[str, int, str, bool],
) -> web.StreamResponse:
    cid, created, model, with_usage = meta
    # Every chunk shares this envelope, so encode it once and splice the choice in.
    head = (
        b"data: "
        + orjson.dumps(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
                "service_tier": "default",
            }
        )[:-1]
        + b',"choices":['
    )
    tail = b'],"usage":null}\n\n' if with_usage else b"]}\n\n"
    pre, post = b'{"index":0,"delta":', b',"logprobs":null,"finish_reason":null}'
    opening = [head + pre + b'{"role":"assistant","content":"","refusal":null}' + post + tail]
    closing = [head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":'
               + orjson.dumps(_FINISH[plan_.finish]) + b"}" + tail]
    if with_usage:
        closing.append(head + b'],"usage":' + orjson.dumps(_usage(plan_)) + b"}\n\n")
    closing.append(_DONE)
    return await send_stream(
        request, web.StreamResponse(headers=_SSE_HEADERS), stats, cfg, opening,
        [b"".join((head, pre, delta, post, tail)) for delta in _deltas(plan_)], closing)


def _deltas(plan_: Plan) -> list[bytes]:
    """One `delta` object per streamed piece: text, or a tool call and its argument pieces."""
    if plan_.kind != "tool_call":
        return [b'{"content":' + orjson.dumps(piece) + b"}" for piece in plan_.pieces]
    opening = {"index": 0, "id": plan_.tool_call_id, "type": "function",
               "function": {"name": plan_.tool_name, "arguments": ""}}
    return [orjson.dumps({"tool_calls": [opening]})] + [
        orjson.dumps({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        for piece in plan_.pieces]


async def _embeddings(request: web.Request) -> web.StreamResponse:
    """Deterministic vectors (a hash of each input) with usage, like OpenAI's endpoint."""
    try:
        body = orjson.loads(await request.read())
    except ValueError:
        body = None
    admitted = admit(request, _model_of(body))
    if isinstance(admitted, Failure):
        return await fail(request, request.app[STATE_KEY].stats, admitted,
                          lambda f: _error(f.status, f.message, f.kind))
    try:
        inputs = body["input"]
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        dims = int(body.get("dimensions") or 8)
    except (ValueError, TypeError, KeyError):
        return _error(400, "Expected 'model' and 'input'.", "invalid_request_error")
    data = [{"object": "embedding", "index": i, "embedding": embedding_of(text, dims)}
            for i, text in enumerate(inputs)]
    tokens = sum(len(str(text).split()) for text in inputs)
    payload = {"object": "list", "data": data, "model": body.get("model"),
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def embedding_of(text: object, dims: int) -> list[float]:
    digest = hashlib.sha256(str(text).encode()).digest()
    return [round(digest[i % len(digest)] / 255, 6) for i in range(dims)]


async def _models(request: web.Request) -> web.Response:
    cfg = request.app[STATE_KEY].config
    data = [
        {"id": m, "object": "model", "created": 1700000000, "owned_by": "switchyard-fake"}
        for m in cfg.models
    ]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def _config(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "PUT":
        try:
            patch = orjson.loads(await request.read())
            if not isinstance(patch, dict):
                raise ValueError("config must be a JSON object")
            state.configure(state.config.merged(patch))
        except (ValueError, ValidationError) as exc:
            return _error(400, f"invalid config: {exc}", "invalid_request_error")
        if "seed" in patch:
            state.rng.seed(state.config.seed)
    return web.json_response(state.config.model_dump())


async def _stats(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        state.reset()
    return web.json_response(asdict(state.stats))


MAX_BODY_BYTES = 64 * 1024 * 1024


def make_app(config: FakeConfig | None = None) -> web.Application:
    """Build the fake's app. Run it with ``handler_cancellation=True`` for instant disconnects."""
    # Real providers take bodies far past aiohttp's 1 MiB default (a 1M-token prompt is ~5 MB,
    # images more): so does the fake, up to the gateway's default body limit and then some.
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    config = config or FakeConfig()
    app[STATE_KEY] = FakeState(initial=config, config=config, rng=random.Random(config.seed))
    app.add_routes(
        [
            web.post("/v1/chat/completions", _chat),
            web.post("/v1/embeddings", _embeddings),
            web.get("/v1/models", _models),
            web.get("/_fake/config", _config),
            web.put("/_fake/config", _config),
            web.get("/_fake/stats", _stats),
            web.post("/_fake/reset", _stats),
        ]
    )
    fake_anthropic.add_routes(app)
    fake_gemini.add_routes(app)
    return app


class FakeUpstream:
    """Runs the fake inside the current event loop; ``async with FakeUpstream() as fake:``."""

    def __init__(
        self, config: FakeConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.app = make_app(config)
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None

    @property
    def config(self) -> FakeConfig:
        return self.app[STATE_KEY].config

    @config.setter
    def config(self, config: FakeConfig) -> None:
        self.app[STATE_KEY].configure(config)
        self.app[STATE_KEY].rng.seed(config.seed)

    def configure(self, **knobs: Any) -> FakeConfig:
        """Apply knobs on top of the current config (validated), like ``PUT /_fake/config``."""
        self.config = self.config.merged(knobs)
        return self.config

    @property
    def stats(self) -> FakeStats:
        return self.app[STATE_KEY].stats

    def reset(self) -> None:
        """Zero the stats and restore the startup config, like ``POST /_fake/reset``."""
        self.app[STATE_KEY].reset()

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1"

    async def start(self) -> None:
        # A short shutdown timeout keeps stop() from waiting on half-finished slow streams.
        runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fake OpenAI Chat Completions upstream.")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9100)
    # Flags mirror FakeConfig so a new knob is reachable from the CLI without extra code.
    for name, info in FakeConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "models":
            p.add_argument(flag, default=",".join(DEFAULT_MODELS), help="comma-separated ids")
        elif info.annotation is bool:
            p.add_argument(flag, action="store_true")
        elif info.default_factory is not None:  # lists and per_model: given as JSON
            p.add_argument(flag, type=orjson.loads, default=None, help="JSON")
        elif get_origin(info.annotation) is Literal:
            p.add_argument(flag, choices=get_args(info.annotation), default=info.default)
        else:
            kinds: dict[object, Callable[[str], object]] = {float: float, str | None: str}
            kind = kinds.get(info.annotation, int)
            p.add_argument(flag, type=kind, default=info.default)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    host, port = args.pop("host"), args.pop("port")
    args["models"] = [m for m in args["models"].split(",") if m]
    config = FakeConfig(**args)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        make_app(config),
        host=host,
        port=port,
        access_log=None,
        handler_cancellation=True,
        loop=loop,
        print=None,
    )


if __name__ == "__main__":
    main()
