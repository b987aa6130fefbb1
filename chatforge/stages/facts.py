"""`chatforge facts`: the controlled knowledge probe's fictional people, written before pretraining.

    chatforge facts --run tiny --entities 60 --repeats 150

Writes runs/<run>/facts/:

    facts.jsonl         every person {name, birth_city, profession, birth_year, known}
                        (chatforge.tasks.probing.read_facts reads it back: the SFT stage probes them)
    biographies.parquet short biographies of the *known* people only, `repeats` each, in a `text`
                        column: the corpus entry `stage:facts` mixes them into tokenizer and
                        pretraining text (the tiny preset does)
    DONE                counts

The unknown half appears nowhere in training text, so after SFT the model can only be right about
them by refusing (Llama 3, section 4.3.6; the library is chatforge/tasks/probing.py).
"""

from __future__ import annotations

from chatforge.common import ChatforgeError, is_complete, log0, read_done, stage_dir, stage_run
from chatforge.config import FactsConfig

FACTS_FILE = "facts.jsonl"
BIOGRAPHIES_FILE = "biographies.parquet"


def run(cfg: FactsConfig) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatforge.tasks.probing import entity_documents, make_entities, split_known, write_facts

    out = stage_dir(cfg, "facts")
    if is_complete(out) and not cfg.force:
        log0(f"facts: {out} is complete, skipping (pass --force to redo)")
        return read_done(out)
    if cfg.entities < 2 or not 0 < cfg.known_fraction < 1 or cfg.repeats < 1:
        raise ChatforgeError(f"--entities {cfg.entities} / --known_fraction {cfg.known_fraction} / --repeats "
                             f"{cfg.repeats}: need at least 2 people, a fraction in (0, 1) and at least 1 repeat")
    known, unknown = split_known(make_entities(cfg.entities, cfg.seed), cfg.known_fraction, cfg.seed)
    docs = entity_documents(known, cfg.repeats, cfg.seed)
    with stage_run(cfg, "facts") as run:
        write_facts(out / FACTS_FILE, known, unknown)
        tmp = out / (BIOGRAPHIES_FILE + ".tmp")
        pq.write_table(pa.table({"text": docs}), tmp)
        tmp.replace(out / BIOGRAPHIES_FILE)
        summary = {"known": len(known), "unknown": len(unknown), "documents": len(docs),
                   "chars": sum(len(d) for d in docs), "facts": str(out / FACTS_FILE),
                   "biographies": str(out / BIOGRAPHIES_FILE)}
        run.log(**summary)
        run.finish(summary)
    log0(f"facts: {len(known)} known and {len(unknown)} unknown people; {len(docs):,} biographies "
         f"({summary['chars']:,} chars) for pretraining -> {out}")
    return summary
