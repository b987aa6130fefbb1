"""A teacher model behind an OpenAI-compatible URL (vLLM, llama.cpp's server, Ollama, OpenAI itself,
or `chatforge serve`), for writing questions from facts and judging answers against a reference.

Failures are never silent and never corrupt data:
- the endpoint is down, refuses, times out or answers with an HTTP error -> TeacherError naming the URL
  and the fix (`check()` finds this before a long job starts);
- it answers, but not with an OpenAI chat completion (HTML, an empty body, a JSON without
  choices[0].message.content) -> TeacherError too: a misconfigured URL is an error for the user;
- it answers a completion whose *text* is unusable (a judge that says neither yes nor no, a question
  that is not the JSON asked for) -> the helpers return None and the caller counts a skip.

Standard library only (urllib): no client package needed to use a teacher.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from chatforge.common import ChatforgeError


class TeacherError(ChatforgeError):
    """The teacher endpoint is unreachable or does not speak the OpenAI chat API."""


class Teacher:
    """Chat completions from `base_url` (e.g. "http://127.0.0.1:8000/v1"; "/chat/completions" is appended)."""

    def __init__(self, base_url: str, model: str = "", api_key: str = "", timeout_s: float = 60.0):
        if not base_url.startswith(("http://", "https://")):
            raise TeacherError(f"teacher URL {base_url!r} must start with http:// or https:// "
                               f"(e.g. http://127.0.0.1:8000/v1)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s
        self.calls = 0

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0) -> str:
        """The assistant text of one completion; TeacherError when the endpoint fails (see module doc)."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.calls += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read(4_000_000)
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace") if e.fp else ""
            raise TeacherError(f"teacher {self.url} answered HTTP {e.code} ({detail.strip()[:200]!r}); check the URL, "
                               f"the model name {self.model!r} and the API key") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TeacherError(f"teacher {self.url} is not reachable ({reason}); start the server or fix "
                               f"--teacher_url") from None
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise TeacherError(f"teacher {self.url} did not answer with an OpenAI chat completion (got "
                               f"{raw[:120]!r}); is it an OpenAI-compatible /v1 endpoint?") from None
        if not isinstance(text, str):
            raise TeacherError(f"teacher {self.url}: choices[0].message.content is not text ({type(text).__name__})")
        return text

    def check(self) -> None:
        """One tiny request, so a wrong URL fails before hours of work, not after."""
        self.chat([{"role": "user", "content": "Say OK."}], max_tokens=4)


def parse_yes_no(text: str) -> bool | None:
    """True / False for a reply that starts with yes / no (after spaces, quotes, markdown); else None.

    >>> parse_yes_no("Yes."), parse_yes_no("**no**, because"), parse_yes_no("The answer is correct")
    (True, False, None)
    """
    word = text.strip().strip("*\"'` ").split(maxsplit=1)[:1]
    w = word[0].strip(".,!:;*\"'").lower() if word else ""
    return True if w == "yes" else False if w == "no" else None


def teacher_judge(teacher: Teacher, question: str, reference: str, answer: str) -> bool | None:
    """Whether `answer` agrees with the reference, by the teacher; None when its verdict is unusable."""
    prompt = ("You grade answers to factual questions.\n"
              f"Question: {question}\nReference answer: {reference}\nProposed answer: {answer}\n"
              "Does the proposed answer state the same fact as the reference? A refusal or a different fact "
              "is not correct. Reply with exactly one word: yes or no.")
    return parse_yes_no(teacher.chat([{"role": "user", "content": prompt}], max_tokens=4))


def teacher_question(teacher: Teacher, fact: str) -> tuple[str, str] | None:
    """(question, short answer) the teacher writes for a fact, or None when it does not answer with the
    JSON object asked for."""
    prompt = ("Write one question that the following fact answers, and the short answer.\n"
              f"Fact: {fact}\n"
              'Reply with only a JSON object: {"question": "...", "answer": "..."}')
    text = teacher.chat([{"role": "user", "content": prompt}], max_tokens=128).strip()
    if text.startswith("```"):  # a fenced block is still the JSON asked for
        text = text.strip("`").removeprefix("json").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    q, a = (obj.get("question"), obj.get("answer")) if isinstance(obj, dict) else (None, None)
    if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
        return None
    return q.strip(), a.strip()
