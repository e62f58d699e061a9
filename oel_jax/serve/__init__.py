"""Serving a model behind the OpenAI chat-completions API, recording what it serves.

    pip install 'oel-jax[serve]'        # FastAPI and uvicorn
    python -m oel_jax.serve --model runs/demo/round_0/model --workdir runs/deployed \\
        --round 1 [--port 8000] [--api_key KEY] [--served_model_name NAME]

Any checkpoint `oel_jax.models.load_hf` reads (config.json, safetensors, and its tokenizer with
a chat template) is served by our sampler on one device, bound to 127.0.0.1 unless ``--host``
says otherwise. Concurrent requests share decode steps (continuous batching,
`oel_jax.slots.SlotDecoder`, driven by one engine thread: `oel_jax.serve.engine`).

Endpoints (with ``--api_key``, or ``OEL_API_KEY`` in the environment, every one of them wants
``Authorization: Bearer KEY``; 401 otherwise):

- ``POST /v1/chat/completions``: OpenAI's request body: ``model`` (any name: the reply's
  ``model`` and ``oel_model`` say which model and round produced it), ``messages`` (system,
  user, assistant; text content; the last one the user's), ``temperature``, ``top_p``,
  ``top_k`` (vLLM's extension), ``max_tokens`` / ``max_completion_tokens`` (at most the
  server's ``--max_tokens``, its default), ``seed`` (with a seed, the reply is that of
  `Sampler.generate` on this prompt alone, whatever else is being served), ``stop``,
  ``n`` (1 only), ``chat_template_kwargs={"enable_thinking": bool}`` (Qwen3 thinking on or
  off; default ``--thinking``). The reply's ``content`` is the raw text, thinking included;
  ``finish_reason`` is "stop" or "length"; ``usage`` counts tokens. ``stream=true`` answers
  with server-sent ``chat.completion.chunk`` events, but only once the reply is done (its whole
  text in one chunk, then the finish reason, then the usage if ``stream_options`` asks): for
  clients that want a stream, not for latency. A ``stop`` string cuts the text; decoding still
  runs to a stop token or ``max_tokens``. Tools, penalties and log-probabilities are refused
  with a 400 that names the field, as is any malformed field (and nothing is recorded). Extensions (the openai client's ``extra_body``):
  ``oel_prompt={"format", "content", "observation"?}`` declares the messages to be
  ``oel_jax.prompts.formats.FORMATS[format].messages(content)`` (checked), so the record keeps
  that format (a game played through the API is consolidated as our games are);
  ``oel_env={"id", "settings"}`` names the environment recorded.
- ``GET /v1/models``: the model serving now (``oel_round``: its round).
- ``POST /v1/feedback``: ``{"conversation_id", "success"?, "reward"?, "feedback"?}`` (at
  least one of the three) attaches an outcome to a served conversation (404 if none has that
  id).
- ``POST /admin/reload``: ``{"model": DIR, "round"?: int, "name"?: str}`` loads another
  checkpoint with the same tokenizer (400 otherwise: a server serves one tokenizer) and swaps
  it in without failing a request: requests in flight finish on the old weights, later ones
  start on the new (no reply mixes two), each record naming the model and round that
  produced it. Answers once the new model serves. The name stays ``--served_model_name`` when
  one was given, else becomes DIR, unless ``name`` says.

Conversations: a request names its conversation with the ``X-Conversation-Id`` header or
``metadata={"conversation_id": ...}``; without either it is a conversation of its own (its
id is the request id). Every reply carries it in its ``X-Conversation-Id`` header.

The workdir's log files (appended; each line written whole with one write on an ``O_APPEND``
descriptor and fsynced before the reply is sent, so a killed server loses at most the
requests it had not answered, and a restarted one appends after what is there):

- ``served.jsonl``: one trajectory record (`oel_jax.envs.Trajectory`, schema v1) per reply:
  one turn with the last user message as ``prompt`` (and ``observation``), the raw reply as
  ``response``, the conversation as ``content`` in the ``"chat"`` prompt format (or the
  declared one), token counts, finish reason and thinking in the turn's metadata; the model's
  name and round; the conversation id, request id, arrival time (``created``) and sampling
  settings (the seed used included) in the record's metadata. `oel_jax.serve.records`.
- ``feedback.jsonl``: ``{"conversation_id", "created", "success", "reward", "feedback"}`` per
  accepted feedback.

`oel_jax.trajectories` reads them back as trajectories (grouped by conversation, feedback as
the outcome) for the OEL loop. Importing this package needs no web framework; FastAPI and
uvicorn are imported by `oel_jax.serve.app` and the command.
"""
