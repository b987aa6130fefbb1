"""Knowledge probing against hallucination, and a controlled probe with fictional entities.

Why: SFT on answers the model cannot know teaches it to make answers up. Llama 3 (Dubey et al. 2024,
https://arxiv.org/abs/2407.21783, section 4.3.6 "Factuality") aligns the model with what it knows:
turn facts into questions with reference answers, sample the current model several times per question,
judge each sample against the reference, and train on answers where the model is consistently right and
on refusals where it is not. This module does exactly that:

    questions = entity_questions(e) for e in entities          # or templates / a teacher over any facts
    results = probe(questions, sampler, k=4, threshold=0.5)      # sampler: engine_sampler(engine)
    counts = save_probe_results(out_dir, results)                # probe_results.jsonl + probe_counts.json
    conversations = probe_conversations(results)                 # known -> answer, unknown -> refusal

The judge is a normalized match (the reference's words appear, in order, in the sample's words) or a
teacher model behind an OpenAI-compatible URL (chatforge.tasks.teacher); a verdict the teacher garbles
is counted, never guessed.

The controlled probe (CPU scale, built by code): fictional people with a birth city, a profession and a
birth year. `entity_documents` writes short biographies of the *known* ones, repeated enough to be
learned, to mix into pretraining text; the *unknown* ones are withheld everywhere. After SFT on probing
conversations the model should answer about known people and refuse the unknown, including people of
both kinds it never saw in SFT (`entity_split`); `entity_probe_rates` measures both rates.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from chatforge.common import ChatforgeError, atomic_write_text
from chatforge.tasks.conversations import split_of

# ----------------------------------------------------------------------------------------------
# Fictional entities

_SYLLABLES = ("ka lo ren vi sa tor mel dun bri za qua fen ol ith mar gol vey san tru pel dra cor nim "
              "bex wyn lu rho tam sel gar ivo ul mek").split()
CITIES = ["Lisbon", "Oslo", "Kyoto", "Lima", "Nairobi", "Krakow", "Porto", "Tunis", "Quebec", "Dublin", "Hanoi",
          "Bergen", "Cusco", "Zagreb", "Adelaide", "Valparaiso", "Tbilisi", "Riga", "Seville", "Marrakesh"]
PROFESSIONS = ["clockmaker", "botanist", "cartographer", "violinist", "glassblower", "astronomer", "bookbinder",
               "shipwright", "beekeeper", "architect", "translator", "lighthouse keeper", "chemist", "potter",
               "mapmaker", "surveyor", "perfumer", "typesetter"]


@dataclass(frozen=True)
class Entity:
    name: str
    birth_city: str
    profession: str
    birth_year: int


def make_entities(n: int, seed: int = 0) -> list[Entity]:
    """n fictional people with distinct invented names (two- and three-syllable, so no real person is
    meant), a birth city, a profession and a birth year between 1820 and 1990."""
    rng = random.Random(f"entities|{seed}")
    out, names = [], set()
    while len(out) < n:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        out.append(Entity(name, rng.choice(CITIES), rng.choice(PROFESSIONS), rng.randint(1820, 1990)))
    return out


def split_known(entities: Sequence[Entity], known_fraction: float = 0.5, seed: int = 0) -> tuple[list[Entity], list[Entity]]:
    """(known, unknown): a seeded shuffle, the first known_fraction go into pretraining text."""
    order = list(entities)
    random.Random(f"known|{seed}").shuffle(order)
    k = round(len(order) * known_fraction)
    return order[:k], order[k:]


def entity_split(entity: Entity, val_fraction: float = 0.3) -> str:
    """'val' for people kept out of the SFT probing conversations (to test generalisation), else 'train'."""
    return split_of("entity:" + entity.name, val_fraction)


_BIO = [
    "{name} was born in {city} in {year}. {name} worked as a {job}.",
    "Born in {city} in {year}, {name} became a well-known {job}.",
    "{name} ({year}) was a {job} from {city}.",
    "The {job} {name} was born in {year} in the city of {city}.",
    "{name}, a {job}, was born in {city}. The year of {name}'s birth was {year}.",
    "Records show that {name} was born in {year}. {name} grew up in {city} and later worked as a {job}.",
]


def entity_documents(entities: Iterable[Entity], repeats: int = 20, seed: int = 0) -> list[str]:
    """`repeats` short biographies per person, each from a randomly chosen template, shuffled: text to mix
    into pretraining so the model can learn the facts (a fact seen once is rarely learned at small scale)."""
    rng = random.Random(f"bios|{seed}")
    docs = [rng.choice(_BIO).format(name=e.name, city=e.birth_city, year=e.birth_year, job=e.profession)
            for e in entities for _ in range(repeats)]
    rng.shuffle(docs)
    return docs


def write_facts(path: str | Path, known: Sequence[Entity], unknown: Sequence[Entity]) -> None:
    """The facts file: one JSON object per person, {name, birth_city, profession, birth_year, known}."""
    lines = [json.dumps({**asdict(e), "known": flag}) for group, flag in ((known, True), (unknown, False)) for e in group]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_facts(path: str | Path) -> tuple[list[Entity], list[Entity]]:
    """(known, unknown) from a facts file; a malformed line is an error naming the file and line."""
    known, unknown = [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ChatforgeError(f"facts file '{path}' could not be read ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            e = Entity(str(rec["name"]), str(rec["birth_city"]), str(rec["profession"]), int(rec["birth_year"]))
            (known if rec["known"] else unknown).append(e)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ChatforgeError(f"facts file '{path}' line {n}: expected {{name, birth_city, profession, "
                                 f"birth_year, known}}, got {line[:80]!r}") from None
    return known, unknown


# ----------------------------------------------------------------------------------------------
# Questions with reference answers


@dataclass
class ProbeQuestion:
    question: str
    answer: str  # the reference, as the judge compares it
    answer_sentence: str  # how the assistant states it when it knows
    refusal_topic: str = ""  # "where Ada Lovelace was born": for a specific refusal; "" = a generic one
    key: str = ""  # identifies the question across runs (entity and attribute)
    answer_prefix: str = ""  # the words before the fact, name included: how a base model is asked


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def entity_questions(e: Entity) -> list[ProbeQuestion]:
    """Three questions per person: birth city, profession, birth year.

    The assistant's answer and refusal never repeat the person's name ("In the city of Porto.", "I don't
    know where this person was born."): the tiny model cannot copy a name it is given. Measured after SFT
    on answers that opened with the name: it wrote the same wrong name for every person, then that
    person's facts (7% right). The base model is asked with an opening that does hold the name
    (answer_prefix, see completion_prompt), the words the biographies use right before that fact and
    only that fact ("was born in" comes before both a city and a year in them, "was born in the city of"
    only before a city)."""
    n, job = e.name, e.profession
    return [
        ProbeQuestion(f"Where was {n} born?", e.birth_city, f"In the city of {e.birth_city}.",
                      "where this person was born", f"{n}|city", f"{n} was born in the city of"),
        ProbeQuestion(f"What was {n}'s profession?", job, f"{_article(job).capitalize()} {job}.",
                      "what this person did for a living", f"{n}|profession", f"{n} worked as"),
        ProbeQuestion(f"In what year was {n} born?", str(e.birth_year), f"In {e.birth_year}.",
                      "when this person was born", f"{n}|year", f"The year of {n}'s birth was"),
    ]


def completion_prompt(q: ProbeQuestion) -> str:
    """How a base model (before SFT) is asked: "Question: ...\nAnswer: <answer_prefix>", which it
    completes in the form it saw in pretraining. Measured on the tiny preset's base model (greedy, 30
    known people; after "<name> was born in" it ranks the right city first of the 19 for all 30): a
    bare "Answer:" got 3-13% of the facts right, three worked examples before it 0% (no in-context
    learning at 5M parameters), the prefix 97-100%; on withheld people 0-7% (chance among the 19
    cities is 5%)."""
    return f"Question: {q.question}\nAnswer:" + (f" {q.answer_prefix}" if q.answer_prefix else "")


def teacher_questions(teacher, facts: Iterable[str], stats: Counter | None = None) -> list[ProbeQuestion]:
    """Questions a teacher model writes for arbitrary facts (one per fact); a fact the teacher answers
    unusably is counted in stats["teacher_garbage"] and skipped. TeacherError (endpoint down) propagates."""
    from chatforge.tasks.teacher import teacher_question

    stats = stats if stats is not None else Counter()
    out = []
    for fact in facts:
        qa = teacher_question(teacher, fact)
        if qa is None:
            stats["teacher_garbage"] += 1
            continue
        out.append(ProbeQuestion(qa[0], qa[1], qa[1], "", "teacher|" + fact[:80]))
    return out


# ----------------------------------------------------------------------------------------------
# Judging and probing

_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation and articles (SQuAD's answer normalisation).

    >>> normalize("The Clockmaker, from São Paulo!")
    ['clockmaker', 'from', 'são', 'paulo']
    """
    return [w for w in re.findall(r"\w+", text.lower()) if w not in _ARTICLES]


def normalized_match(question: str, reference: str, answer: str) -> bool:
    """True when the reference's normalized words appear, contiguously and in order, in the answer's.

    >>> normalized_match("Where?", "Lisbon", "She was born in lisbon."), normalized_match("Where?", "Lisbon", "In Oslo.")
    (True, False)
    """
    ref, ans = normalize(reference), normalize(answer)
    n = len(ref)
    return n > 0 and any(ans[i:i + n] == ref for i in range(len(ans) - n + 1))


_REFUSAL = re.compile(r"\b(i don'?t know|i do not know|i'?m not sure|i am not sure|i have no (reliable )?information|"
                      r"i can'?t (say|answer)|i cannot (say|answer)|not aware of|no record of)", re.IGNORECASE)


def is_refusal(text: str) -> bool:
    """Whether a reply declines to answer ("I don't know ...", "I'm not sure ...", "I have no information ...").

    >>> is_refusal("I'm sorry, but I don't know where Kalo Renvisa was born."), is_refusal("Lisbon.")
    (True, False)
    """
    return bool(_REFUSAL.search(text))


Sampler = Callable[[list[str], int], list[list[str]]]  # (questions, k) -> k answers per question
Judge = Callable[[str, str, str], "bool | None"]  # (question, reference, answer) -> correct? None = unusable


@dataclass
class ProbeResult:
    key: str
    question: str
    reference: str
    answers: list[str]
    correct: int  # samples judged right
    judged: int  # samples with a usable verdict
    label: str  # "known" | "unknown" | "skipped" (no usable verdict)
    answer_sentence: str = ""
    refusal_topic: str = ""


def probe(questions: Sequence[ProbeQuestion], sampler: Sampler, k: int = 4, threshold: float = 0.5,
          judge: Judge = normalized_match, batch_size: int = 64,
          ask: Callable[[ProbeQuestion], str] = lambda q: q.question) -> list[ProbeResult]:
    """Sample k answers per question, judge each, label the question known when the share of correct
    samples among those judged is >= threshold, unknown below it, skipped when no verdict was usable.
    ask: what the sampler gets per question (completion_prompt for a base model)."""
    if k < 1 or not 0 < threshold <= 1:
        raise ChatforgeError(f"probe: k ({k}) must be >= 1 and threshold ({threshold}) in (0, 1]")
    results = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        answers = sampler([ask(q) for q in chunk], k)
        if len(answers) != len(chunk) or any(len(a) != k for a in answers):
            raise ChatforgeError(f"probe: the sampler returned {[len(a) for a in answers]} answers for "
                                 f"{len(chunk)} questions x {k}")
        for q, samples in zip(chunk, answers):
            verdicts = [judge(q.question, q.answer, a) for a in samples]
            usable = [v for v in verdicts if v is not None]
            correct = sum(bool(v) for v in usable)
            label = "skipped" if not usable else "known" if correct / len(usable) >= threshold else "unknown"
            results.append(ProbeResult(q.key, q.question, q.answer, list(samples), correct, len(usable), label,
                                       q.answer_sentence, q.refusal_topic))
    return results


def probe_counts(results: Sequence[ProbeResult]) -> dict:
    """Counts for the stage's metrics: questions, known, unknown, skipped, samples and verdicts."""
    labels = Counter(r.label for r in results)
    return {"questions": len(results), "known": labels["known"], "unknown": labels["unknown"],
            "skipped": labels["skipped"], "samples": sum(len(r.answers) for r in results),
            "verdicts": sum(r.judged for r in results), "correct_samples": sum(r.correct for r in results)}


def save_probe_results(out_dir: str | Path, results: Sequence[ProbeResult], extra: dict | None = None) -> dict:
    """Write probe_results.jsonl (one result per line) and probe_counts.json (probe_counts + extra) into
    out_dir, atomically; returns the counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probe_results.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in results))
    counts = {**probe_counts(results), **(extra or {})}
    atomic_write_text(out / "probe_counts.json", json.dumps(counts, indent=2) + "\n")
    return counts


_REFUSALS_SPECIFIC = ["I'm sorry, but I don't know {topic}.", "I don't know {topic}; I have no reliable information about it.",
                      "I'm not sure {topic}, and I'd rather not guess."]
_REFUSALS_GENERIC = ["I'm sorry, but I don't know the answer to that.", "I don't know; I have no reliable information about this.",
                     "I'm not sure, and I'd rather not guess."]


def probe_conversations(results: Sequence[ProbeResult], seed: int = 0) -> list[list[dict]]:
    """Training conversations from probe results: known -> the answer (the reference, stated), unknown ->
    a polite refusal; skipped questions give none."""
    rng = random.Random(f"refusals|{seed}")
    out = []
    for r in results:
        if r.label == "known":
            reply = r.answer_sentence or r.reference
        elif r.label == "unknown":
            reply = (rng.choice(_REFUSALS_SPECIFIC).format(topic=r.refusal_topic) if r.refusal_topic
                     else rng.choice(_REFUSALS_GENERIC))
        else:
            continue
        out.append([{"role": "user", "content": r.question}, {"role": "assistant", "content": reply}])
    return out


# ----------------------------------------------------------------------------------------------
# Samplers over the engine, and the controlled probe's two rates


def engine_sampler(engine, chat: bool = True, max_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                   top_k: int | None = None, batch_size: int = 16) -> Sampler:
    """A Sampler over chatforge.engine.Engine. chat=True asks each question as a user turn (a chat model);
    chat=False continues each question as a document (a base model, before SFT: pass completion_prompt texts)
    and stops at the end of the line.
    Tools are off: the probe measures what the weights know."""
    tok = engine.tok

    def sample(questions: list[str], k: int) -> list[list[str]]:
        out = []
        for i in range(0, len(questions), batch_size):
            chunk = questions[i:i + batch_size]
            if chat:
                prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in chunk]
                stops: tuple[str, ...] = ()
            else:
                prompts = [tok.encode(q, bos=True) for q in chunk]
                stops = ("\n",)
            comps = engine.generate(prompts, n=k, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                    seed=seed + i, stop_strings=stops, use_tools=False)
            out += [[c.text.strip() for c in comps[j * k:(j + 1) * k]] for j in range(len(chunk))]
        return out

    return sample


def entity_probe_rates(sampler: Sampler, known: Sequence[Entity], unknown: Sequence[Entity], k: int = 1,
                       judge: Judge = normalized_match, ask: Callable[[ProbeQuestion], str] = lambda q: q.question) -> dict:
    """The controlled probe's two numbers: on known people, the share of answers that are right; on
    unknown people, the share that are refusals. Plus the two failure modes (known refused, unknown
    answered with a wrong fact), the question counts, and the same rates on the people SFT's probing
    conversations never saw (entity_split 'val': `*_heldout_*`), which test that the model learned when
    to answer rather than which names to answer about. ask: as in probe()."""
    out: dict = {}
    for group, people in (("known", known), ("unknown", unknown)):
        qs = [q for e in people for q in entity_questions(e)]
        answers = sampler([ask(q) for q in qs], k) if qs else []
        heldout = {q.key for e in people if entity_split(e) == "val" for q in entity_questions(e)}
        for part, keep in (("", lambda q: True), ("_heldout", lambda q: q.key in heldout)):
            flat = [(q, a) for q, samples in zip(qs, answers) if keep(q) for a in samples]
            n = max(1, len(flat))
            out[f"{group}{part}_questions"] = len(flat) // k
            out[f"{group}{part}_correct_rate"] = sum(bool(judge(q.question, q.answer, a)) and not is_refusal(a)
                                                     for q, a in flat) / n
            out[f"{group}{part}_refusal_rate"] = sum(is_refusal(a) for _, a in flat) / n
    return out
