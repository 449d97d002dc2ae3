"""Prompt input for the command line: arguments, text files, JSONL, or standard input.

Prompt text is data: it is tokenized, never evaluated. A chat prompt is a list of
``{"role": ..., "content": ...}`` messages; a plain prompt is a string.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

Prompt = Union[str, list[dict]]

# What `cbkernels generate` answers when given nothing: short chat prompts of mixed lengths.
DEFAULT_PROMPTS: list[str] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for writing clear Python code.",
    "What is 12 times 7?",
    "Name three planets of the solar system and one fact about each.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do I boil an egg?",
]


class PromptError(ValueError):
    """The prompt input is unusable; the message says where and why."""


def _from_json_line(obj, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise PromptError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
    if "messages" in obj:
        messages = obj["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise PromptError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        return messages
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise PromptError(f"{where}: 'prompt' must be a non-empty string")
        return obj["prompt"]
    raise PromptError(f"{where}: expected a 'prompt' or 'messages' field")


def parse_jsonl(text: str, source: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{where}: malformed JSON ({exc.msg})") from None
        prompts.append(_from_json_line(obj, where))
    return prompts


def parse_lines(text: str) -> list[Prompt]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompt_file(path: str) -> list[Prompt]:
    """One prompt per line, or JSONL when the file ends in .jsonl / .json (or its first line is JSON)."""
    file = Path(path)
    if not file.is_file():
        raise PromptError(f"prompt file not found: {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read {path}: {exc}") from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    if file.suffix in (".jsonl", ".json") or first.lstrip().startswith("{"):
        prompts = parse_jsonl(text, path)
    else:
        prompts = parse_lines(text)
    if not prompts:
        raise PromptError(f"{path} holds no prompts")
    return prompts


def collect_prompts(args: list[str], file: str | None, stdin) -> list[Prompt]:
    """Arguments, then the file, then standard input (when it is not a terminal); else the defaults."""
    prompts: list[Prompt] = [a for a in args]
    if any(not p.strip() for p in prompts):
        raise PromptError("empty prompt given as an argument")
    if file is not None:
        prompts += read_prompt_file(file)
    if not prompts and stdin is not None and not stdin.isatty():
        text = stdin.read()
        first = next((line for line in text.splitlines() if line.strip()), "")
        prompts = parse_jsonl(text, "<stdin>") if first.lstrip().startswith("{") else parse_lines(text)
    return prompts or list(DEFAULT_PROMPTS)


def encode(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt, through the chat template when the tokenizer has one."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])
