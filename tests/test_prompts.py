"""Prompt input of the command line: files, JSONL, stdin, and clear errors for bad input."""
import io

import pytest

from cbkernels.prompts import DEFAULT_PROMPTS, PromptError, collect_prompts, encode, read_prompt_file


class FakeStdin(io.StringIO):
    def __init__(self, text, tty=False):
        super().__init__(text)
        self._tty = tty

    def isatty(self):
        return self._tty


def test_text_file_one_prompt_per_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n  second prompt  \n")
    assert read_prompt_file(str(f)) == ["first prompt", "second prompt"]


def test_jsonl_prompts_and_chats(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert read_prompt_file(str(f)) == ["hello", [{"role": "user", "content": "hi"}]]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{not json\n', "p.jsonl:2: malformed JSON"),
    ('{"text": "x"}\n', "p.jsonl:1: expected a 'prompt' or 'messages' field"),
    ('{"messages": []}\n', "p.jsonl:1: 'messages' must be"),
    ('{"prompt": 3}\n', "p.jsonl:1: 'prompt' must be a non-empty string"),
    ('[1, 2]\n', "p.jsonl:1: expected a JSON object"),
    ('\n\n', "holds no prompts"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(PromptError, match=message):
        read_prompt_file(str(f))


def test_missing_file():
    with pytest.raises(PromptError, match="not found"):
        read_prompt_file("/nonexistent/prompts.txt")


def test_sources_in_order_and_defaults():
    assert collect_prompts(["a"], None, FakeStdin("ignored\n")) == ["a"]
    assert collect_prompts([], None, FakeStdin("x\ny\n")) == ["x", "y"]
    assert collect_prompts([], None, FakeStdin('{"prompt": "j"}\n')) == ["j"]
    assert collect_prompts([], None, FakeStdin("typed", tty=True)) == DEFAULT_PROMPTS
    assert collect_prompts([], None, FakeStdin("")) == DEFAULT_PROMPTS
    with pytest.raises(PromptError, match="empty prompt"):
        collect_prompts(["  "], None, None)


def test_prompt_text_is_never_evaluated():
    class Tok:
        chat_template = None

        def __call__(self, text):
            return {"input_ids": [len(text)]}

    assert encode(Tok(), "__import__('os').system('false')") == [len("__import__('os').system('false')")]
