"""``tuneserve chat MODEL``: one message (``-m``) or a conversation, the answer streamed as it is
generated. In a conversation every turn is sent with the ones before it; ``/exit`` or end of
input (Ctrl-D) ends it, ``/reset`` starts over."""

from __future__ import annotations

import argparse
import json
import sys

from service.cli.client import Client, CliError, make_client


def add_command(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    chat = sub.add_parser("chat", parents=[common], help="chat with a base or tuned model")
    chat.add_argument("model")
    chat.add_argument("-m", "--message", help="send one message, print the answer, exit")
    chat.add_argument("--system", help="a system message to start with")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--seed", type=int)
    chat.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    client = make_client(args, timeout=600)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        history.append({"role": "user", "content": args.message})
        answer = ask(client, args, history)
        if args.json:
            sys.stdout.write(json.dumps({"model": args.model, "content": answer}) + "\n")
        return 0
    return converse(client, args, history)


def converse(client: Client, args: argparse.Namespace, history: list[dict]) -> int:
    start = list(history)
    interactive = sys.stdin.isatty()
    if interactive:
        sys.stderr.write(f"chatting with {args.model}; /exit or Ctrl-D ends, /reset starts over\n")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history[:] = start
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write(f"{args.model}> ")
        try:
            answer = ask(client, args, history)
        except CliError as exc:
            if not interactive:
                raise
            history.pop()  # the turn failed: do not send it again with the next one
            sys.stderr.write(f"tuneserve: {exc}\n")
            continue
        history.append({"role": "assistant", "content": answer})


def ask(client: Client, args: argparse.Namespace, messages: list[dict]) -> str:
    """Stream one answer to stdout (unless --json) and return it."""
    body = {"model": args.model, "messages": messages, "stream": True,
            "max_tokens": args.max_tokens}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.seed is not None:
        body["seed"] = args.seed
    pieces: list[str] = []
    for chunk in client.sse("POST", "/chat/completions", json=body, timeout=600):
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                pieces.append(text)
                if not args.json:
                    sys.stdout.write(text)
                    sys.stdout.flush()
    if not args.json:
        sys.stdout.write("\n")
    return "".join(pieces)
