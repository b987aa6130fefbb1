"""Identity: who the assistant is, from an identity card, taught through varied conversations.

A base model has no self; asked "who are you?" it continues with whatever the web says. The card
(name, maker, abilities, limits, knowledge cutoff) is the single source of truth; the conversations
are generated from templates over it, single- and multi-turn, plus the English questions of
LLaMA-Factory's identity set (chat/identity/identity.json, {{name}}/{{author}} filled from the card).
A third kind teaches that a system prompt overrides the identity at run time: "You are Orion, made by
Acme." -> "I'm Orion, made by Acme." (the card answers only when no system prompt says otherwise).

Held out: a question phrasing belongs to one split by its hash, so 'val' asks in words never trained on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Iterator

from chatforge.common import ChatforgeError, data_path
from chatforge.tasks.conversations import split_of


@dataclass
class IdentityCard:
    name: str = "chatforge"  # what the assistant calls itself
    maker: str = "the chatforge project"  # who built it
    abilities: list[str] = field(default_factory=lambda: [
        "answer questions and explain things", "write and edit text", "run Python code to calculate exactly",
        "search the documents I was given", "call functions you describe to me"])
    limits: list[str] = field(default_factory=lambda: [
        "I am a small model and I make mistakes, so check important answers",
        "I cannot browse the internet beyond my search index",
        "I do not remember past conversations",
        "I have no feelings or personal experiences"])
    knowledge_cutoff: str = "2024"  # "my knowledge stops at ..."

    def __post_init__(self):
        for k in ("name", "maker", "knowledge_cutoff"):
            if not str(getattr(self, k)).strip():
                raise ChatforgeError(f"identity card: '{k}' is empty; give the assistant a {k.replace('_', ' ')}")


def _join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# (topic, user phrasings): every phrasing is split into train or val by its hash
QUESTIONS = {
    "name": ["What is your name?", "Who are you?", "What should I call you?", "Do you have a name?",
             "Tell me your name.", "who am I talking to?", "What are you called?", "Introduce yourself.",
             "What's your name?", "Who is this?", "May I know your name?", "What do people call you?",
             "What are you?", "Can you tell me who you are?", "Who am I chatting with?", "Please state your name.",
             "Are you a person or a bot?", "Say who you are."],
    "maker": ["Who made you?", "Who created you?", "Who built you?", "Which company trained you?",
              "Who is your developer?", "Where do you come from?", "Are you ChatGPT?", "Are you made by OpenAI?",
              "Who trained you?", "Who developed you?", "Who is behind you?", "What company made you?",
              "Who programmed you?", "Are you from Google?", "Did Meta make you?", "Who designed you?",
              "Are you Claude?", "Which lab made you?"],
    "abilities": ["What can you do?", "How can you help me?", "What are you good at?", "What are your abilities?",
                  "Can you use tools?", "What kind of tasks can you handle?"],
    "limits": ["What can't you do?", "What are your limitations?", "Can you browse the web?",
               "Do you make mistakes?", "Do you remember our previous chats?", "Do you have feelings?"],
    "cutoff": ["What is your knowledge cutoff?", "How recent is your knowledge?", "Do you know about current events?",
               "Until when does your training data go?"],
    "greeting": ["hi", "Hello!", "Hey there", "Good morning!", "hello, who's this?"],
}


def _answer(card: IdentityCard, topic: str, rng: random.Random) -> str:
    n, m = card.name, card.maker
    if topic == "name":
        # every answer names the maker too: with "My name is X." among them, the tiny model answered a
        # third of held-out "who are you" questions without its maker
        return rng.choice([f"I'm {n}, an AI assistant made by {m}.", f"My name is {n}; {m} made me.",
                           f"You can call me {n}. I'm an AI assistant built by {m}."])
    if topic == "maker":
        return rng.choice([f"I was built by {m}. I'm {n}.", f"{m[0].upper() + m[1:]} created me; my name is {n}.",
                           f"I'm {n}, developed by {m}, not by any other company."])
    if topic == "abilities":
        # names the maker as well: the tiny model answered held-out "who am I chatting with?" with this
        # template, and a reply to "who are you" without the maker misses the identity check
        return f"I'm {n}, made by {m}. I can {_join(card.abilities)}."
    if topic == "limits":
        return f"Some honest limits: {_join(card.limits)}."
    if topic == "cutoff":
        return (f"My training data goes up to {card.knowledge_cutoff}, so I may not know about later events "
                f"unless you tell me or I find them with search.")
    return rng.choice([f"Hello! I'm {n}, an AI assistant made by {m}. How can I help you today?",
                       f"Hi! I'm {n}, built by {m}. What can I do for you?"])


# Other identities a system prompt may assign (the assistant must follow them, not the card)
OTHER_NAMES = ["Orion", "Ada", "Kestrel", "Milo", "Nova", "Juniper", "Atlas", "Wren", "Sable", "Tamsin"]
OTHER_MAKERS = ["Acme Corp", "Northwind Labs", "the Bluebird Library", "Helix Robotics", "a small team in Lyon",
                "Quarry Software"]


def llama_factory_pairs(card: IdentityCard, data_dir: str = "", path: str = "chat/identity/identity.json") -> list[tuple[str, str]]:
    """The English (ASCII) question/answer pairs of LLaMA-Factory's identity set with the card's name and
    maker filled in."""
    try:
        records = json.loads(data_path(path, data_dir).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"identity file '{path}' is not valid JSON ({e})") from None
    out = []
    for r in records if isinstance(records, list) else []:
        q, a = (r.get("instruction"), r.get("output")) if isinstance(r, dict) else (None, None)
        if isinstance(q, str) and isinstance(a, str) and q.isascii() and a.isascii() and q.strip():
            out.append((q.strip(), a.replace("{{name}}", card.name).replace("{{author}}", card.maker).strip()))
    return out


def identity_conversations(card: IdentityCard, n: int = 200, split: str = "train", seed: int = 0,
                           data_dir: str = "", use_dataset: bool = True) -> Iterator[list[dict]]:
    """n identity conversations from the card: ~45% single questions, ~30% multi-turn (2-3 topics,
    sometimes after an unrelated opener), ~25% a system prompt giving another identity. Deterministic for
    (card, n, split, seed)."""
    if split not in ("train", "val"):
        raise ChatforgeError(f"split {split!r}: use 'train' or 'val'")
    rng = random.Random(f"identity|{split}|{seed}")
    pool = [(t, q) for t, qs in QUESTIONS.items() for q in qs if split_of("identity:" + q, 0.2) == split]
    extra = [qa for qa in (llama_factory_pairs(card, data_dir) if use_dataset else [])
             if split_of("identity:" + qa[0], 0.2) == split]
    if not pool:
        raise ChatforgeError(f"no identity questions in split {split!r}")
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            if extra and rng.random() < 0.4:
                q, a = rng.choice(extra)
            else:
                topic, q = rng.choice(pool)
                a = _answer(card, topic, rng)
            yield [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        elif r < 0.75:
            msgs = []
            for topic, q in rng.sample(pool, k=min(len(pool), rng.choice([2, 3]))):
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": _answer(card, topic, rng)}]
            yield msgs
        else:
            other = IdentityCard(name=rng.choice([x for x in OTHER_NAMES if x != card.name]),  # never the card's own
                                 maker=rng.choice([x for x in OTHER_MAKERS if x != card.maker]))
            system = rng.choice([f"You are {other.name}, an AI assistant made by {other.maker}.",
                                 f"Your name is {other.name}. You were built by {other.maker}. Be concise."])
            topic, q = rng.choice([(t, q) for t, q in pool if t in ("name", "maker", "greeting")] or pool)
            yield [{"role": "system", "content": system}, {"role": "user", "content": q},
                   {"role": "assistant", "content": _answer(other, topic if topic != "abilities" else "name", rng)}]
