#!/usr/bin/env python3
"""Drives llm-audit's proxy with the official OpenAI Python SDK, the way an application does.

Usage: openai_sdk_check.py BASE_URL API_KEY MODEL

Makes four calls through the proxy, in this order (tests/proxy_cli.rs scripts the fake upstream
to match): a plain chat completion, a streamed one, one the upstream answers with 429, and one
the proxy itself rejects (400). Prints one JSON object describing what the SDK returned.
Exits 3 when the `openai` package cannot be imported, so the caller can tell "not installed"
from "failed".
"""

import json
import sys

try:
    import openai
except ImportError as exc:  # pragma: no cover - depends on the environment
    print(json.dumps({"import_error": str(exc)}))
    sys.exit(3)


def error_info(exc):
    """What an SDK exception carries from our OpenAI-shaped error body."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return {
        "raised": type(exc).__name__,
        "status": exc.status_code,
        "message": body.get("message"),
        "type": exc.type,
        "code": exc.code,
        "request_id": exc.response.headers.get("x-llm-audit-request-id"),
    }


def main():
    base_url, api_key, model = sys.argv[1:4]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=20.0)
    messages = [{"role": "user", "content": "Say hello."}]
    out = {"sdk_version": openai.__version__}

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, user="sdk-user"
    )
    completion = raw.parse()
    out["plain"] = {
        "request_id": raw.headers.get("x-llm-audit-request-id"),
        "cost_usd": raw.headers.get("x-llm-audit-cost-usd"),
        "id": completion.id,
        "model": completion.model,
        "content": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "usage": {
            "prompt_tokens": completion.usage.prompt_tokens,
            "completion_tokens": completion.usage.completion_tokens,
            "total_tokens": completion.usage.total_tokens,
        },
    }

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, stream=True
    )
    chunks = list(raw.parse())
    out["stream"] = {
        "request_id": raw.headers.get("x-llm-audit-request-id"),
        "content_type": raw.headers.get("content-type"),
        "chunks": len(chunks),
        "content": "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices
        ),
        "finish_reason": next(
            (c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason),
            None,
        ),
        "chunks_with_usage": sum(1 for c in chunks if c.usage is not None),
        "chunks_without_choices": sum(1 for c in chunks if not c.choices),
    }

    try:
        client.chat.completions.create(model=model, messages=messages)
        out["rate_limited"] = {"raised": None}
    except openai.APIStatusError as exc:
        out["rate_limited"] = error_info(exc)

    try:
        # `messages` must be an array: the proxy refuses the call before it goes upstream.
        client.chat.completions.create(model=model, messages=messages, extra_body={"messages": 42})
        out["rejected"] = {"raised": None}
    except openai.APIStatusError as exc:
        out["rejected"] = error_info(exc)

    print(json.dumps(out))


if __name__ == "__main__":
    main()
