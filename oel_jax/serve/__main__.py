"""``python -m oel_jax.serve --model DIR --workdir DIR``: see `oel_jax.serve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from oel_jax.errors import InputError, one_line

API_KEY_ENV = "OEL_API_KEY"
"""The environment variable an API key may come from (``--api_key`` wins)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line (see ``--help``)."""
  p = argparse.ArgumentParser(
      prog="python -m oel_jax.serve",
      description="Serve a Qwen3 checkpoint behind the OpenAI chat-completions API, recording "
                  "every reply as a trajectory in --workdir.")
  p.add_argument("--model", required=True, help="checkpoint directory (load_hf: config.json, "
                 "safetensors, tokenizer with a chat template)")
  p.add_argument("--workdir", required=True, help="folder of served.jsonl and feedback.jsonl "
                 "(created if missing; appended to)")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, "
                 "this machine only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--api_key", default=None, help=f"require 'Authorization: Bearer KEY' on "
                 f"every route (default: ${API_KEY_ENV}, else none)")
  p.add_argument("--served_model_name", default=None, help="the model's name in /v1/models "
                 "and the records (default: --model as given); kept across reloads")
  p.add_argument("--round", type=int, default=None, help="the OEL round of --model, recorded "
                 "with each reply (default: unknown)")
  p.add_argument("--env_id", default="chat", help="env id recorded for requests that declare "
                 "none (oel_env)")
  p.add_argument("--thinking", choices=("on", "off"), default="on", help="thinking when a "
                 "request does not set chat_template_kwargs.enable_thinking")
  p.add_argument("--max_tokens", type=int, default=1024, help="most tokens of a reply (and "
                 "the default of a request that names no max_tokens)")
  p.add_argument("--max_seq_len", type=int, default=8192, help="most prompt + reply tokens")
  p.add_argument("--slots", type=int, default=8, help="requests decoded at once (per "
                 "sampling-settings group)")
  p.add_argument("--chunk_steps", type=int, default=8, help="decode steps between admissions")
  p.add_argument("--max_groups", type=int, default=4, help="sampling-settings groups decoded "
                 "at once")
  p.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--compute_dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--min_prompt_bucket", type=int, default=32, help="smallest padded prompt")
  p.add_argument("--mesh", default="", help="DATA,FSDP,TP: split the weights over a mesh of "
                 "this process's devices and decode on it (-1 on one axis takes the rest, e.g. "
                 "1,-1,1); default: one device")
  p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
  args = p.parse_args(argv)
  for name in ("port", "max_tokens", "max_seq_len", "slots", "chunk_steps", "max_groups",
               "min_prompt_bucket"):
    if getattr(args, name) < (0 if name == "port" else 1):
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.round is not None and args.round < 0:
    p.error(f"--round must be >= 0, got {args.round}")
  if args.mesh:
    from oel_jax import parallel  # pylint: disable=import-outside-toplevel
    try:
      data, fsdp, tp = (int(x) for x in args.mesh.split(","))
      args.mesh_config = parallel.MeshConfig(data=data, fsdp=fsdp, tp=tp)
    except ValueError as e:
      p.error(f"--mesh must be DATA,FSDP,TP (positive sizes, -1 on at most one axis), got "
              f"{args.mesh!r}: {one_line(e)}")
  if args.max_tokens >= args.max_seq_len:
    p.error(f"--max_tokens ({args.max_tokens}) must be less than --max_seq_len "
            f"({args.max_seq_len})")
  return args


def build_service(args: argparse.Namespace):
  """The checkpoint loaded and the engine started behind a `ChatService`."""
  # pylint: disable=import-outside-toplevel
  from oel_jax import parallel
  from oel_jax.serve import checkpoint
  from oel_jax.serve.engine import Engine, EngineOptions
  from oel_jax.serve.records import ServedModel
  from oel_jax.serve.service import ChatService, ServiceOptions

  mesh = None
  if args.mesh:
    try:
      mesh = parallel.make_mesh(args.mesh_config)
    except ValueError as e:
      raise InputError(f"--mesh {args.mesh}: {one_line(e)}") from None
  load = checkpoint.LoadOptions(param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                                max_seq_len=args.max_seq_len,
                                min_prompt_bucket=args.min_prompt_bucket, mesh=mesh)
  tokenizer = checkpoint.load_tokenizer(args.model)
  sampler = checkpoint.make_sampler(checkpoint.load_model(args.model, load), tokenizer, load)
  model = ServedModel(name=args.served_model_name or args.model, round=args.round,
                      path=args.model)
  engine = Engine(sampler, model, EngineOptions(
      slots=args.slots, max_tokens=args.max_tokens, chunk_steps=args.chunk_steps,
      max_groups=args.max_groups)).warm_up().start()
  return ChatService(tokenizer, engine, args.workdir, load, ServiceOptions(
      env_id=args.env_id, enable_thinking=args.thinking == "on",
      fixed_name=args.served_model_name is not None))


def main(argv: list[str] | None = None) -> int:
  """Runs the server until interrupted; 2 on bad input (one ``error:`` line)."""
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
  try:
    import uvicorn  # pylint: disable=import-outside-toplevel

    from oel_jax.serve.app import create_app  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"error: serving needs the 'serve' extra (pip install 'oel-jax[serve]'): {e}",
          file=sys.stderr)
    return 2
  try:
    service = build_service(args)
  except InputError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
  app = create_app(service, args.api_key or os.environ.get(API_KEY_ENV) or None)
  uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
  return 0


if __name__ == "__main__":
  sys.exit(main())
