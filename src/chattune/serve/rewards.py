"""A reward model served: ``POST /v1/rewards`` scores conversations (a chattune extension of the
OpenAI-style API), over a :class:`~chattune.inference.reward.RewardScorer`.

Request (one conversation, or a list of them; each ends with the assistant's answer)::

    {"model": "rm", "messages": [[{"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "4"}], ...]}

Answer::

    {"object": "list", "model": "rm", "data": [{"object": "reward", "index": 0, "reward": 1.73}],
     "usage": {"prompt_tokens": 17, "total_tokens": 17}}

A reward model generates no text: its ``/v1/chat/completions`` and ``/v1/completions`` answer
400 saying so. A chat model's server answers ``/v1/rewards`` with a 400 saying it is not a reward
model (:func:`chattune.serve.schema.not_a_reward_model`). Errors are OpenAI's ``{"error": {...}}`` body naming the field.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI

from chattune.inference.reward import RewardScorer
from chattune.serve.app import LimitBody, RequireKey, add_error_handlers
from chattune.serve.schema import APIError, RewardRequest


def _not_a_chat_model(name: str, route: str) -> APIError:
    return APIError(400, f"model {name!r} is a reward model (stage rm): it scores conversations at POST "
                    f"/v1/rewards and generates no text, so it has no {route}", param="model",
                    code="not_a_chat_model")


def score_request(scorer: RewardScorer, body: RewardRequest) -> dict:
    """The answer to one ``POST /v1/rewards`` (CPU and model work, for a worker thread): every
    conversation encoded as training encoded it (a 400 naming the one that cannot be), then
    scored in batches."""
    given, _ = body.conversations()
    sequences = []
    for where, conversation in given:
        try:
            sequences.append(scorer.encode(conversation, where))
        except ValueError as exc:  # RecordError, DataError: the message names the field
            raise APIError(400, str(exc), param=str(exc).split(":", 1)[0].split(" ", 1)[0]) from exc
    rewards = scorer.score_ids(sequences)
    tokens = sum(len(ids) for ids in sequences)
    return {"object": "list", "model": scorer.name,
            "data": [{"object": "reward", "index": i, "reward": reward} for i, reward in enumerate(rewards)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def create_reward_app(scorer: RewardScorer, *, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The API over a loaded reward model: ``GET /health``, ``GET /v1/models``, ``POST /v1/rewards``,
    and a 400 on the generating routes. No web page."""
    app = FastAPI(title="chattune reward model", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scorer = scorer
    app.add_middleware(LimitBody, limit=max_body_bytes)
    app.add_middleware(RequireKey, key=api_key)
    add_error_handlers(app)
    created = int(time.time())
    card = {"id": scorer.name, "object": "model", "created": created, "owned_by": "chattune",
            "root": str(scorer.run_dir) if scorer.run_dir else None, "parent": None, "template": scorer.template,
            "context_length": scorer.max_seq_length, "vision": False, "reward_model": True}

    def pick(name: str | None) -> None:
        if name not in (None, scorer.name):
            raise APIError(404, f"The model '{name}' does not exist; this server has: {scorer.name}", param="model",
                           code="model_not_found")

    @app.get("/health")
    async def health():
        """Liveness; needs no API key."""
        return {"status": "ok", "models": [scorer.name], "reward_model": True}

    @app.get("/v1/models")
    async def list_models():
        """The one model this server scores with."""
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        """The model, or 404."""
        pick(name)
        return card

    @app.post("/v1/rewards")
    async def rewards(body: RewardRequest):
        """One reward per conversation, in order."""
        pick(body.model)
        return await asyncio.to_thread(score_request, scorer, body)

    @app.post("/v1/chat/completions")
    async def chat_completions():
        """Refused: a reward model generates no text."""
        raise _not_a_chat_model(scorer.name, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions():
        """Refused: a reward model generates no text."""
        raise _not_a_chat_model(scorer.name, "/v1/completions")

    return app
