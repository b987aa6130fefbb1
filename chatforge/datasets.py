"""Named public datasets: the registry behind `chatforge data list` and `chatforge data download NAME`.

The data directory (`--data_dir` > $CHATFORGE_DATA_DIR > ~/.cache/chatforge/data, see
`common.data_dir`) has the layout of the team's shared/data folder. Every file of that layout is listed
here with its public origin (a GitHub raw URL at the commit named in shared/data/MANIFEST.md, or
OpenAI's blob store for the GPT-2 tokenizer), the first 16 hex digits of its sha256 as stored, its size
and the transform that turns the upstream bytes into the stored form:

    ""                 stored as published
    "gzip"             upstream is plain, stored gzipped (MANIFEST: `gzip -9 -n` of upstream files
                       over 1 MiB); done with Python's gzip module, so no `gzip` binary is needed
    "drop_first_line"  GPT-2 merges.txt is OpenAI's vocab.bpe without its `#version: 0.2` line

Verification, the decision: a file is good when the sha256 of its stored bytes matches `sha256`. For
"gzip" files the stored bytes depend on the compressor: GNU `gzip -9 -n` reproduces the shared files
byte for byte, Python's zlib does not (different deflate choices, OS byte 255 in the header). So those
entries also carry `content_sha256`, the sha256 of the decompressed content, and a stored file whose
own sha differs is still good when its decompressed content matches. The content is the contract, the
compressed bytes are not. Every other file is verified on its exact bytes.

A mirror (`--mirror URL`, or a local folder) is laid out like the data dir and already holds
stored-form files, so nothing is transformed; the same verification applies. Four documentation WARCs
were built by wrapping the HTML of Debian packages in WARC records (see MANIFEST.md) and have no public
download: they come only from a mirror or a copy of a data folder.

Downloads stream to a temp file next to the target, are transformed and verified there, then renamed
into place, so a failed or interrupted download never leaves a partial or unverified file behind.

`cc` is not a registry entry but a sample of a Common Crawl crawl: the first N WARC files (~1 GB each)
listed in `crawl-data/<CRAWL>/warc.paths.gz`, stored under the same relative path in the data dir, where
the data stage reads a `crawl-data/...` input from instead of streaming it. Common Crawl publishes no
checksum per WARC, so a WARC is good when its size matches the server's Content-Length, every gzip member
decompresses to its end (CRC checked) and it starts with a WARC record; see `check_warc_gz`. These files
are big, so an interrupted download is kept as `.NAME.part` and resumed (HTTP Range) on the next run.
`all` does not include `cc`.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Callable, Iterator

from chatforge.common import DATA_DIR_ENV, ChatforgeError
from chatforge.common import data_dir as resolve_data_dir

TIMEOUT_S = 60  # per socket operation (connect, each read), not for the whole file
CHUNK = 1 << 20
USER_AGENT = "chatforge/0.1 (+https://github.com; python-urllib)"


@dataclass(frozen=True)
class DataFile:
    """One file of the data-dir layout."""

    path: str  # relative path in the data dir, e.g. "math/gsm8k/test.jsonl"
    url: str | None  # public origin; None: no public download (mirror or copy only)
    sha256: str  # first 16 hex digits of the stored file's sha256 (shared/data/MANIFEST.md)
    size: int  # stored bytes (MANIFEST), for `data list`
    transform: str = ""  # "", "gzip" or "drop_first_line": upstream bytes -> stored form
    content_sha256: str = ""  # "gzip" only: sha256 prefix of the decompressed content


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    license: str
    files: tuple[DataFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def gh(repo: str, commit: str, path: str) -> str:
    """GitHub raw URL of `path` in `repo` at `commit`.

    >>> gh("openai/human-eval", "6d43fb980f9f", "data/HumanEval.jsonl.gz")
    'https://raw.githubusercontent.com/openai/human-eval/6d43fb980f9f/data/HumanEval.jsonl.gz'

    Where the full commit was not at hand we pin MANIFEST's 12-digit prefix; GitHub resolves an
    unambiguous abbreviated commit in raw URLs.
    """
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


# Upstream commits (MANIFEST.md names 12-digit prefixes; full ids where known).
GSM8K = "3101c7d5072418e28b9008a6636bde82a006892c"
MATH_HARNESS = "db77bc6bb2a17c90ed2d63e88ebd8c40a82858c5"
SVAMP = "689d7ccac74b9983a2ac7cc3b264f441b99e7c53"
LLAMA_FACTORY = "ff6d4d12eeb0"
FASTCHAT = "0e6d3e4beaab"
OASST = "f1e6ed9526f5817531f3ab85441a40b3671ddccb"
SELF_INSTRUCT = "0b26ccaa415992100fa32df62d41b994cf928e23"
GORILLA = "6ea57973c7a6097fd7c5915698c54c17c5b1b6c8"
HH_RLHF = "354e5c3cb896"
CHAR_RNN = "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e"
DOLMA = "669f534823b08d266a8fff01f8a1c916a5a56576"
WARCIO = "2a797aa8c6d67e70966ce9d1a690208ab250fbe7"
WHIRLWIND = "08dcfbe4d579"
UT1 = "804da92a9177"
LLM_FOUNDRY = "8c8dd48f7216"
DCLM = "361714bdd60bb9b7f4b2d8354cebbf0dec0c329e"
HELLASWAG = "1105d370f834"
HUMAN_EVAL = "6d43fb980f9fee3c892a914eda09951f772ad10d"
CS336_A5 = "eb2c562e05802d3c9ee4c4ec2eec43b104d77e9e"
GPT2_BLOB = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"

F = DataFile
_FOUNDRY = "scripts/eval/local_data"


def _foundry(path: str, upstream: str, size: int, sha: str, **kw) -> DataFile:
    return F(path, gh("mosaicml/llm-foundry", LLM_FOUNDRY, f"{_FOUNDRY}/{upstream}"), sha, size, **kw)


def _warcio(name: str, size: int, sha: str) -> DataFile:
    return F(f"web/warcio-edge-cases/{name}", gh("webrecorder/warcio", WARCIO, f"test/data/{name}"), sha, size)


def _ut1(category: str, kind: str, size: int, sha: str) -> DataFile:
    rel = f"{category}/{kind}"
    return F(f"blocklists/ut1/{rel}", gh("olbat/ut1-blacklists", UT1, f"blacklists/{rel}"), sha, size)


# MMLU (stanford-cs336/assignment5-alignment copy of hendrycks/test): subject, then size:sha256 (as
# stored) of the dev, val and test CSVs. Generated once from MANIFEST.md; the test suite checks it.
_MMLU = """
abstract_algebra                    719:bd8c73f3c75bea9d   1791:ab0c6d19c4523969   17358:4be89c0fb1d24197
anatomy                             830:0985685cf5ab13cc   2784:09e9959486ebf364   29844:966dfd5c4579885e
astronomy                           1943:bb03eca519a3fbc0  4615:3dbe51f827890dd0   42999:87c9c3cb5a55395c
business_ethics                     2095:7cd487e4ba7d9fe4  2815:929daf023cce06fa   31394:cd3fc3a85a34cb17
clinical_knowledge                  1078:13c88c266cf2a8aa  5980:85f87578c62618ae   56562:06a1ea973000d5ef
college_biology                     1403:31f4ae0707ba3f74  4417:f624eaf75ee2add7   45351:e1204cb9d19887ea
college_chemistry                   1200:9ba27ba571b8ad40  2140:7d0594e7f35c8309   22314:4d61d7887f845b88
college_computer_science            2638:fc1a43187cd68390  4410:4f7a08808c39218f   40401:d53a1d0d1c4362da
college_mathematics                 1366:27731ee1402e720e  2405:12621b0f192fe877   22429:8b5bef14d4209c79
college_medicine                    1545:63928a944fda769d  7375:9a490f6aaeb2e7c1   78334:9c533cfff89edaa3
college_physics                     1279:6e043d6c566091c5  3231:55c80f8fdd225c5f   27811:079c3696eda22c13
computer_security                   974:09e276300dbd2d07   4310:52faa1f86a4fa029   24840:8e40f809858db9dd
conceptual_physics                  799:5e65be1f6fdd82f4   3826:dba647511d25b8de   34992:7b39a241bb20424f
econometrics                        1521:7a01a925199c246d  4693:062b8b3ae560c7bf   44039:10eb6b2d3a519a46
electrical_engineering              851:5aad11b1d1c8dc1a   2511:31462254765b0525   21595:8b0d747a97cb2cbb
elementary_mathematics              1315:9aca9cd215b7c170  8034:bc9806fe460cac38   61602:65a46a0e1927ea37
formal_logic                        1628:e4b579358ed4878f  5930:306d64079d5a1651   46929:bc2dc7373a664ae7
global_facts                        1111:685577fc3f0bf09a  1619:c32a9e14e2994414   16191:a81058ee8e2385ed
high_school_biology                 1538:6a200085c1507948  10284:c0b264a94514f732  102424:cfaba2b58b9714d2
high_school_chemistry               1091:1ba44aeea98ca223  6580:ed0c2c9846a70933   53918:0e3d94da331d1eb3
high_school_computer_science        2809:5de3800dfbbfaa89  3148:5e40b8773655e592   42281:63806168fb0e5a72
high_school_european_history        11445:a3677065cf51abc3 29242:82f2bbbf8148f3c7  266888:09983655452c3c40
high_school_geography               1268:e43fc27b9fa8b808  3778:94444fda55747826   37386:c6acdaa9d94c88cd
high_school_government_and_politics 1648:daf013a3eae04b59  6554:0fd2fd6ec975ed75   61553:fbd7a89eb2c78060
high_school_macroeconomics          1191:23ed995071c47e62  11941:3533d53f9f803657  108402:354b12cc74d2806c
high_school_mathematics             1168:d7401d5cbad5ae69  5084:233f0811fb852a08   48584:fe8f7a154834bba3
high_school_microeconomics          1167:a409b422561f1fb0  6929:51a6993ff0e2de9d   70131:a250cc4976654e47
high_school_physics                 1367:5f008c3a44e7b14d  6370:3861ace8d359bac8   56252:573e0f8d8309e466
high_school_psychology              1785:b39b304a436fa623  15845:785e5c3e90eafb1c  146542:88c33b6b0ade567d
high_school_statistics              2422:9441f8da50bfb931  9482:ee65f842e44b0f9a   105978:d62843d2fd084d6a
high_school_us_history              8758:028b3c81c7be1138  31271:b28f9c1a3382cb1c  292834:0338dea3b11881be
high_school_world_history           4771:b6e87a14718b0415  44987:7ba62c498d5bbe64  373770:7787343ae18e4e1e
human_aging                         880:d2439fb3c2292e7d   4132:5f4e2e4eebf704c4   40617:01299d7e0ae4a8d0
human_sexuality                     942:0da7f8f7aeb6d5a0   2129:3f8b1c5317703fd7   29052:43ca779587725f12
international_law                   2293:6f7f1c0191c0bcfe  6160:627a60c758991976   50691:51b3a6d74cc84651
jurisprudence                       1172:27533d9741020310  3450:a54d080420bbdb86   31375:bf7a770aebfbdb18
logical_fallacies                   1444:4de026c2d116c381  4667:35820dc5ddf469d0   46290:3fe8b48c74832525
machine_learning                    2197:e4b1b09985dbdc49  2983:23ea00a670424f7f   31698:05984b90f887a7da
management                          761:f75224958ab245d8   1543:73f1407eedac9d6b   17457:4a535a11bb480a09
marketing                           1354:15b3cf450ebc11e1  6795:521b52fd9be14088   57435:ecf0ae0ae906194d
medical_genetics                    952:70cd9ff940bef360   2722:03d44b759f35da63   18520:cc30c698e94f12c0
miscellaneous                       562:72f74676c37fe477   12300:ae3d2dd1438655b9  129221:061b283bb2640723
moral_disputes                      1635:c80d35650189d237  11552:941826c9761dade3  99902:673f5e9054f55fc5
moral_scenarios                     1974:dbe2196287f89a6c  40926:73735e0bf74f045c  361484:128d7bd823d793f8
nutrition                           1971:84444f3a5c5bf3cc  7712:b9c542cf888e13a5   85926:309432be237ac2b6
philosophy                          859:587be220837bbe08   8388:e190e2653bf42254   72820:a0f0c6fc9e4f08c0
prehistory                          1758:f62e146bc64a3335  9474:08d0748aa24b77a3   82193:8d44938332ea3d19
professional_accounting             2041:efc070ed71676829  13685:865b30e9a3c8dedb  118484:27071efa2f8fd850
professional_law                    6503:15d8589900ccf472  200624:175350a6b9a39a1f 595950:aa95e750c30b2972
professional_medicine               3678:486456d578890d47  23126:8ccce8d3ca49f2a8  211585:a034bf0dda10cb08
professional_psychology             2148:222e690db42dfb21  27484:ef9cac4327293305  212333:99785591dfe18717
public_relations                    1363:8895f665f4c696ae  4270:7acad9ec286d3032   26236:3712f955d0c38b07
security_studies                    5231:c726278f37ce1548  22080:5287f8757b00302e  199745:ab7634702670ee0d
sociology                           1484:2e2bb34b4cabdc50  6664:593bf2643ee40f28   61540:f6c464600032aa2b
us_foreign_policy                   1480:3a9677a89fd67c3a  2997:c427b2d9da892992   26047:2821ee009a2b1b7d
virology                            962:30af41f604f2ee7f   5019:bfd8a9560123c397   34689:4355b9d79142da0e
world_religions                     540:d4f7550bb8a32a59   2308:4352332375435709   21156:3be96b2465419289
"""


# Files over 1 MiB are stored gzipped: stored name -> sha256 prefix of the decompressed content.
_MMLU_GZIPPED = {"test/professional_law_test.csv": "eeb81cac576a5f53"}


def _mmlu_files() -> tuple[DataFile, ...]:
    files = [F("eval/mmlu/README.txt", gh("stanford-cs336/assignment5-alignment", CS336_A5, "data/mmlu/README.txt"),
               "00569069f8784772", 1486)]
    for line in _MMLU.strip().splitlines():
        subject, *entries = line.split()
        for split, entry in zip(("dev", "val", "test"), entries):
            size, sha = entry.split(":")
            name = f"{split}/{subject}_{split}.csv"
            url = gh("stanford-cs336/assignment5-alignment", CS336_A5, f"data/mmlu/{name}")
            if name in _MMLU_GZIPPED:
                files.append(F(f"eval/mmlu/{name}.gz", url, sha, int(size), "gzip", _MMLU_GZIPPED[name]))
            else:
                files.append(F(f"eval/mmlu/{name}", url, sha, int(size)))
    return tuple(files)


def _debian_warc(name: str, size: int, sha: str) -> DataFile:
    return F(f"web/{name}", None, sha, size)  # built locally from a Debian package: no URL to fetch


_DATASETS = [
    # ---- math ------------------------------------------------------------------------------------
    Dataset("gsm8k", "GSM8K grade-school math word problems, train (7,473) + test (1,319); answers end '#### N'",
            "MIT", tuple(
                F(f"math/gsm8k/{split}.jsonl", gh("openai/grade-school-math", GSM8K,
                                                   f"grade_school_math/data/{split}.jsonl"), sha, size)
                for split, sha, size in (("train", "17f347dc51477c50", 4166206),
                                         ("test", "3730d312f6e34405", 749738)))),
    Dataset("math500", "MATH-500 competition problems (PRM800K split) with solutions and answers", "MIT", (
        F("math/math500/test.jsonl", gh("ZubinGou/math-evaluation-harness", MATH_HARNESS, "data/math_oai/test.jsonl"),
          "35dc41080a368085", 446564),
    )),
    Dataset("svamp", "SVAMP: 1,000 simple arithmetic word problems with equations", "MIT", (
        F("math/svamp/SVAMP.json", gh("arkilpatel/SVAMP", SVAMP, "SVAMP.json"), "5be77703a6d891ae", 339970),
    )),
    # ---- chat ------------------------------------------------------------------------------------
    Dataset("identity", "Alpaca-format identity Q/A with {{name}} / {{author}} placeholders", "Apache-2.0", (
        F("chat/identity/identity.json", gh("hiyouga/LLaMA-Factory", LLAMA_FACTORY, "data/identity.json"),
          "fd029da7dd3df283", 20306),
    )),
    Dataset("mt_bench", "MT-bench: 80 two-turn questions for judged chat evaluation", "Apache-2.0", (
        F("chat/mt_bench/question.jsonl",
          gh("lm-sys/FastChat", FASTCHAT, "fastchat/llm_judge/data/mt_bench/question.jsonl"),
          "119565adbab82227", 48929),
    )),
    Dataset("oasst", "OpenAssistant: 100 English ranked message trees (two layouts) + 250 user prompts",
            "Apache-2.0", tuple(
                F(f"chat/oasst/{n}", gh("LAION-AI/Open-Assistant", OASST, f"model/model_eval/manual/data/{n}"), s, b)
                for n, s, b in (("en_100_message.jsonl", "d70f5706f746dc96", 1025038),
                                ("en_100_tree.jsonl", "a27639214a5098bf", 979838),
                                ("prompt_lottery_en_250_text.jsonl", "c5c706385a8166d3", 29026)))),
    Dataset("self_instruct", "Self-Instruct: 175 seed tasks + 252 user-oriented instructions", "Apache-2.0", (
        F("chat/self_instruct/seed_tasks.jsonl", gh("yizhongw/self-instruct", SELF_INSTRUCT, "data/seed_tasks.jsonl"),
          "7779004fa198fdf2", 110934),
        F("chat/self_instruct/user_oriented_instructions.jsonl",
          gh("yizhongw/self-instruct", SELF_INSTRUCT, "human_eval/user_oriented_instructions.jsonl"),
          "81d60a117db495ce", 170193),
    )),
    Dataset("toolcall", "Tool use: Glaive function-calling demo (ShareGPT) + BFCL v4 simple_python with answers",
            "Apache-2.0", (
                F("chat/toolcall/glaive_toolcall_en_demo.json",
                  gh("hiyouga/LLaMA-Factory", LLAMA_FACTORY, "data/glaive_toolcall_en_demo.json"),
                  "8b84773e44e71881", 738925),
                F("chat/toolcall/bfcl/BFCL_v4_simple_python.json",
                  gh("ShishirPatil/gorilla", GORILLA,
                     "berkeley-function-call-leaderboard/bfcl_eval/data/BFCL_v4_simple_python.json"),
                  "82dd63ba502eb252", 283274),
                F("chat/toolcall/bfcl/possible_answer_simple_python.json",
                  gh("ShishirPatil/gorilla", GORILLA,
                     "berkeley-function-call-leaderboard/bfcl_eval/data/possible_answer/BFCL_v4_simple_python.json"),
                  "90cd5bc653690ee8", 63627),
            )),
    # ---- preference ------------------------------------------------------------------------------
    Dataset("hh_rlhf", "Anthropic HH harmless-base test pairs {chosen, rejected}; contains offensive red-team text",
            "MIT", (
                F("preference/hh_rlhf_harmless_base_test.jsonl.gz",
                  gh("anthropics/hh-rlhf", HH_RLHF, "harmless-base/test.jsonl.gz"), "ebfaaed21162a4de", 742801),
            )),
    # ---- text ------------------------------------------------------------------------------------
    Dataset("tinyshakespeare", "Tiny Shakespeare, 1.1 MB of plain text (stored gzipped)",
            "MIT (char-rnn); text public domain", (
                F("text/tinyshakespeare.txt.gz", gh("karpathy/char-rnn", CHAR_RNN, "data/tinyshakespeare/input.txt"),
                  "bed00f18e91cda68", 433627, "gzip", "86c4e6aa9db7c042"),
            )),
    Dataset("c4_demo", "300 C4 web documents {text}", "Apache-2.0; C4 text ODC-BY 1.0", (
        F("text/c4_demo.jsonl", gh("hiyouga/LLaMA-Factory", LLAMA_FACTORY, "data/c4_demo.jsonl"),
          "f51528081ef22279", 747189),
    )),
    Dataset("wiki_demo", "30 English Wikipedia articles, one per line", "Apache-2.0; Wikipedia text CC BY-SA", (
        F("text/wiki_demo.txt", gh("hiyouga/LLaMA-Factory", LLAMA_FACTORY, "data/wiki_demo.txt"),
          "69c0c4d067a95a1a", 1028326),
    )),
    # ---- web -------------------------------------------------------------------------------------
    Dataset("dolma", "Two real 2024 crawl WARCs (request/response/metadata records) from Dolma's tests",
            "Apache-2.0; pages remain their sites' content", tuple(
                F(f"web/dolma-sample-{i}.warc.gz", gh("allenai/dolma", DOLMA, f"tests/data/warc/sample-{i}.warc.gz"),
                  s, b)
                for i, s, b in (("0000", "53bca229270eb5f5", 214006), ("0001", "fe202be30b77ee0f", 236859)))),
    Dataset("whirlwind", "One Common Crawl capture (CC-MAIN-2024-22) as WARC, WAT and WET",
            "Apache-2.0; captured page CC BY-SA 4.0", tuple(
                F(f"web/{n}", gh("commoncrawl/whirlwind-python", WHIRLWIND, n), s, b)
                for n, s, b in (("whirlwind.warc.gz", "2219c8d0fe743f47", 18857),
                                ("whirlwind.warc.wat.gz", "7ed4e56a1ddebeed", 1361),
                                ("whirlwind.warc.wet.gz", "b2f1db3943b2bfbb", 3006)))),
    Dataset("warcio_edge_cases", "warcio's test WARC/ARC files, some deliberately malformed", "Apache-2.0", (
        _warcio("bad.arc", 331, "e83988ef0e46f9b8"),
        _warcio("example-bad-non-chunked.warc.gz", 2113, "2fb33d4b5c6fb273"),
        _warcio("example-bad.warc.gz.bad", 1950, "1031dd5e89139b21"),
        _warcio("example-digest.warc", 3672, "bfaf8596b743a8fc"),
        _warcio("example-iana.org-chunked.warc", 8831, "539c746feb63bd12"),
        _warcio("example-resource.warc.gz", 1779, "9d3f830f757a3733"),
        _warcio("example-space-in-target-uri.warc.gz", 583, "86e0039c4dadb395"),
        _warcio("example-space-in-url.arc", 1873, "477418dd57d01809"),
        _warcio("example-trunc.warc", 3370, "2f14d2a2ff6ce39a"),
        _warcio("example-wget-bad-target-uri.warc.gz", 3267, "46c5ac2c893a5e20"),
        _warcio("example-wrong-chunks.warc.gz", 1575, "1f563e1b9ac122ef"),
        _warcio("example.arc", 1808, "433c37ee6dd68484"),
        _warcio("example.arc.gz", 1027, "d6d0d772521e89dc"),
        _warcio("example.warc", 5120, "5cc2724ab2969d5f"),
        _warcio("example.warc.gz", 3816, "5144459799b3bcb8"),
        _warcio("post-test.warc.gz", 3593, "4a889c4d15f56245"),
    )),
    # Built from Debian packages (HTML pages wrapped as WARC/1.0 response records): no public download.
    Dataset("postgresql_docs", "PostgreSQL 15 HTML docs, 1,169 pages as a WARC (built from Debian "
            "postgresql-doc-15; mirror only)", "PostgreSQL License", (
                _debian_warc("postgresql-docs.warc.gz", 4473502, "9bbf65305579df4b"),)),
    Dataset("python_docs", "Python 3.11 HTML docs, 530 pages as a WARC (built from Debian python3.11-doc; "
            "mirror only)", "PSF License", (
                _debian_warc("python-docs.warc.gz", 7436230, "6d4a3ad915a23e2d"),)),
    Dataset("git_docs", "Git HTML docs, 241 pages as a WARC (built from Debian git-doc; mirror only)", "GPL-2", (
        _debian_warc("git-docs.warc.gz", 2570707, "1ec7d1ac046bcde6"),)),
    Dataset("debian_handbook", "Debian Administrator's Handbook in 26 languages, 752 pages as a WARC (built "
            "from Debian debian-handbook; mirror only)", "GPL-2+ or CC BY-SA 3.0", (
                _debian_warc("debian-handbook-multilingual.warc.gz", 5165378, "9b2203f84035b86e"),)),
    Dataset("blocklists", "UT1 URL/domain blocklists: adult, mixed_adult, gambling, phishing, malware",
            "CC BY-SA 4.0 (UT1, Universite Toulouse Capitole)", (
                _ut1("adult", "urls", 61216, "f5a7960639c2fca6"),
                _ut1("gambling", "domains", 626484, "4afea5bb723cffab"),
                _ut1("malware", "urls", 880553, "77942d0fe79e9994"),
                _ut1("mixed_adult", "domains", 2272, "14b9dbf994db0fc0"),
                _ut1("phishing", "urls", 887676, "c3bff94392b125a6"),
            )),
    # ---- eval ------------------------------------------------------------------------------------
    Dataset("arc", "ARC challenge + easy multiple-choice science questions (ICL jsonl)",
            "Apache-2.0 (llm-foundry); ARC CC BY-SA 4.0", (
                _foundry("eval/arc/arc_challenge.jsonl", "world_knowledge/arc_challenge.jsonl", 365606,
                         "1ae3aeedf1951d88"),
                _foundry("eval/arc/arc_easy.jsonl", "world_knowledge/arc_easy.jsonl", 636665, "d2d12e59543acf9a"),
            )),
    Dataset("hellaswag", "HellaSwag validation, full text format (bz2)", "MIT", (
        F("eval/hellaswag/hellaswag_val_full.txt.bz2",
          gh("klosax/hellaswag_text_data", HELLASWAG, "hellaswag_val_full.txt.bz2"), "50b637899e4263c2", 1964544),
    )),
    Dataset("piqa", "PIQA physical commonsense, two-choice (ICL jsonl)",
            "Apache-2.0 (llm-foundry); PIQA: no licence stated", (
                _foundry("eval/piqa/piqa.jsonl", "commonsense_reasoning/piqa.jsonl", 533992, "d2870e73aec5154d"),)),
    Dataset("winogrande", "WinoGrande pronoun resolution (ICL jsonl)", "Apache-2.0 (llm-foundry); WinoGrande CC-BY", (
        _foundry("eval/winogrande/winogrande.jsonl", "language_understanding/winogrande.jsonl", 312369,
                 "ea1592526f3bfdd0"),)),
    Dataset("openbookqa", "OpenBookQA elementary science, four-choice (ICL jsonl)", "Apache-2.0", (
        _foundry("eval/openbookqa/openbook_qa.jsonl", "commonsense_reasoning/openbook_qa.jsonl", 88043,
                 "adb2e5c7f8db810d"),)),
    Dataset("copa", "COPA cause/effect, two-choice (ICL jsonl)", "Apache-2.0 (llm-foundry); COPA BSD-2-Clause", (
        _foundry("eval/copa/copa.jsonl", "commonsense_reasoning/copa.jsonl", 14627, "595dca44dec54c84"),)),
    Dataset("lambada", "LAMBADA (OpenAI version) last-word prediction (ICL jsonl, stored gzipped)",
            "Apache-2.0 (llm-foundry); LAMBADA CC BY 4.0", (
                _foundry("eval/lambada/lambada_openai.jsonl.gz", "language_understanding/lambada_openai.jsonl",
                         716539, "f178a099618d4461", transform="gzip", content_sha256="411bfbe5b9054346"),)),
    Dataset("boolq", "BoolQ yes/no reading comprehension (ICL jsonl, stored gzipped)",
            "Apache-2.0 (llm-foundry); BoolQ CC BY-SA 3.0", (
                _foundry("eval/boolq/boolq.jsonl.gz", "reading_comprehension/boolq.jsonl", 803544, "e702b7f4bad84d31",
                         transform="gzip", content_sha256="454ff101e614370b"),)),
    Dataset("humaneval", "HumanEval: 164 Python programming problems with unit tests", "MIT", (
        F("eval/humaneval/HumanEval.jsonl.gz", gh("openai/human-eval", HUMAN_EVAL, "data/HumanEval.jsonl.gz"),
          "b796127e635a67f9", 44877),)),
    Dataset("mmlu", "MMLU: 57 subjects x dev/val/test CSVs (question, A-D, answer)", "MIT", _mmlu_files()),
    Dataset("core_meta", "DCLM CORE eval metadata: random-guess baselines per task", "MIT", (
        F("eval/core_meta/eval_meta_data.csv", gh("mlfoundations/dclm", DCLM, "eval/eval_meta_data.csv"),
          "3d8191d45cc64a80", 16606),)),
    # ---- tokenizers ------------------------------------------------------------------------------
    # tiktoken pins the originals' sha256: vocab.bpe 1ce16647..., encoder.json 19613966...
    Dataset("gpt2-tokenizer", "GPT-2 byte-level BPE: vocab.json (OpenAI encoder.json) + merges.txt (vocab.bpe)",
            "MIT", (
                F("tokenizers/gpt2/vocab.json", f"{GPT2_BLOB}/encoder.json", "196139668be63f3b", 1042301),
                F("tokenizers/gpt2/merges.txt", f"{GPT2_BLOB}/vocab.bpe", "ac33235097fe06d4", 456304,
                  "drop_first_line"),
            )),
]

REGISTRY: dict[str, Dataset] = {d.name: d for d in _DATASETS}
assert len(REGISTRY) == len(_DATASETS), "duplicate dataset name"


# ----------------------------------------------------------------------------------------------
# Verification and transforms


def _sha256_prefix(path: Path, n: int = 16, gunzip: bool = False) -> str:
    """sha256 (first n hex digits) of a file's bytes, or of its decompressed content if gunzip."""
    h = hashlib.sha256()
    with (gzip.open(path, "rb") if gunzip else open(path, "rb")) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()[:n]


def verify(path: Path, f: DataFile) -> tuple[bool, str]:
    """(ok, what we measured). See the module docstring for why gzip files also accept their content."""
    got = _sha256_prefix(path, len(f.sha256))
    if got == f.sha256:
        return True, got
    if f.content_sha256:
        try:
            content = _sha256_prefix(path, len(f.content_sha256), gunzip=True)
        except (OSError, EOFError, zlib.error):  # not gzip at all, corrupt or truncated
            return False, got
        if content == f.content_sha256:
            return True, f"content {content}"
        return False, f"{got} (content {content}, expected content {f.content_sha256})"
    return False, got


def _apply_transform(kind: str, src: Path, dst: Path) -> None:
    if kind == "gzip":
        # mtime=0 and no file name in the header, like `gzip -n`: the output depends on content only.
        with open(src, "rb") as fin, open(dst, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
    elif kind == "drop_first_line":
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fin.readline()
            shutil.copyfileobj(fin, fout, CHUNK)
    else:
        raise ValueError(f"unknown transform {kind!r}")


# ----------------------------------------------------------------------------------------------
# Download


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def resolve(names: list[str]) -> list[Dataset]:
    """Dataset names (or 'all') -> datasets, in order, without repeats; a clear error for unknown ones."""
    out: list[Dataset] = []
    for name in names:
        if name == "all":
            picked = list(REGISTRY.values())
        elif name in REGISTRY:
            picked = [REGISTRY[name]]
        else:
            close = difflib.get_close_matches(name, [*REGISTRY, CC_NAME], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ChatforgeError(
                f"unknown dataset '{name}'.{hint} Known datasets: {', '.join(REGISTRY)} (or 'all'), and "
                f"'{CC_NAME}' for Common Crawl WARC files; `chatforge data list` shows them with sizes and licences")
        out += [d for d in picked if d not in out]
    return out


def _mirror_base(mirror: str) -> str:
    """A mirror is a URL (http://, https://, file://) or a local folder laid out like the data dir."""
    if "://" not in mirror:
        path = Path(mirror).expanduser()
        if not path.is_dir():
            raise ChatforgeError(f"--mirror {mirror}: not a URL and not an existing folder")
        mirror = path.resolve().as_uri()
    return mirror.rstrip("/") + "/"


def _fetch(url: str, dest: Path, desc: str) -> None:
    """Stream url into dest with a byte progress bar (on a terminal). Network errors propagate."""
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc, file=sys.stderr, disable=None, leave=False) as bar:
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
        if total and out.tell() != int(total):
            raise HTTPException(f"connection closed after {out.tell():,} of {int(total):,} bytes")
        out.flush()
        os.fsync(out.fileno())


def _download_file(ds: Dataset, f: DataFile, root: Path, base: str) -> str:
    """Fetch, transform, verify and move one file into place; returns the summary word."""
    dest = root / f.path
    url = base + urllib.parse.quote(f.path) if base else f.url
    transform = "" if base else f.transform
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
    except OSError as e:
        raise ChatforgeError(f"cannot write into the data dir {root}: {e}; pass --data_dir or set "
                             f"${DATA_DIR_ENV} to a writable folder") from None
    tmp, tmp2 = Path(name), Path(name + ".t")
    try:
        try:
            _fetch(url, tmp, f.path)
        except urllib.error.HTTPError as e:
            raise ChatforgeError(_fetch_error(ds, f, url, root, f"HTTP {e.code} {e.reason}", offline=False)) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise ChatforgeError(_fetch_error(ds, f, url, root, str(reason), offline=True)) from None
        except OSError as e:  # local: disk full, permissions
            raise ChatforgeError(f"dataset '{ds.name}': could not write {dest} while downloading {url}: "
                                 f"{e}") from None
        if transform:
            _apply_transform(transform, tmp, tmp2)
            os.replace(tmp2, tmp)
        ok, got = verify(tmp, f)
        if not ok:
            raise ChatforgeError(
                f"dataset '{ds.name}': {f.path} downloaded from {url} failed its checksum: expected sha256 "
                f"{f.sha256}..., got {got}...; the file was not kept. The source may have changed or the "
                f"transfer was corrupted: try again, or use another --mirror")
        os.replace(tmp, dest)
        return "downloaded"
    finally:
        tmp.unlink(missing_ok=True)
        tmp2.unlink(missing_ok=True)


def _fetch_error(ds: Dataset, f: DataFile, url: str, root: Path, reason: str, offline: bool) -> str:
    if url.startswith("file:"):
        what = "The mirror folder does not have it"
    elif offline:
        what = "You appear to be offline, or the host cannot be reached"
    else:
        what = "The server did not deliver it"
    return (f"could not download dataset '{ds.name}' file {f.path} from {url}: {reason}. {what}: "
            f"copy the files into {root / f.path}, point ${DATA_DIR_ENV} at a folder that has them, or pass "
            f"--mirror URL (a server or folder laid out like the data dir)")


def download(names: list[str], data_dir: str = "", mirror: str = "", force: bool = False,
             crawl: str | None = None, files: int | None = None) -> dict[str, int]:
    """Fetch the named datasets ('all' for every one; 'cc' for Common Crawl WARCs, see `download_cc`)
    into the data dir; returns counts per outcome.

    A file already present with the right checksum is kept unless force. One line per file is printed.
    `crawl` and `files` choose the Common Crawl sample and go with 'cc' only.
    """
    want_cc = CC_NAME in names
    if want_cc:
        crawl, files = _check_cc_args(crawl, files)
    elif crawl is not None or files is not None:
        raise ChatforgeError(f"--crawl and --files choose Common Crawl WARC files: they go with the name "
                             f"'{CC_NAME}', e.g. `chatforge data download {CC_NAME} --files 2`")
    # Everything is checked before the first byte moves: a typo must not surface after a 1 GB download.
    datasets = resolve([n for n in names if n != CC_NAME])
    root = resolve_data_dir(data_dir)
    base = _mirror_base(mirror) if mirror else ""
    counts = _download_registry(datasets, root, base, force, explicit="all" not in names) if datasets else {}
    if want_cc:
        for k, v in download_cc(crawl, files, root, base, force).items():
            counts[k] = counts.get(k, 0) + v
    return counts


def _download_registry(datasets: list[Dataset], root: Path, base: str, force: bool,
                       explicit: bool) -> dict[str, int]:
    """The registry's files, one line each; `explicit` (named, not 'all'): a file with no public
    download is an error rather than a skip."""
    counts = {"downloaded": 0, "already present": 0, "skipped": 0}
    for ds in datasets:
        for f in ds.files:
            dest = root / f.path
            if dest.exists() and not force:
                ok, _ = verify(dest, f)
                if ok:
                    counts["already present"] += 1
                    print(f"{ds.name:<18} {f.path}  already present")
                    continue
                print(f"{ds.name:<18} {f.path}  present but its checksum differs; downloading again")
            if not base and f.url is None:
                msg = (f"dataset '{ds.name}': {f.path} has no public download (it was built from a Debian "
                       f"package, see MANIFEST.md); copy it into {dest}, point {DATA_DIR_ENV} at a folder "
                       f"that has it, or pass --mirror URL")
                if explicit:
                    raise ChatforgeError(msg)
                counts["skipped"] += 1
                print(f"{ds.name:<18} {f.path}  skipped: no public download (use --mirror or copy it)")
                continue
            outcome = _download_file(ds, f, root, base)
            counts[outcome] += 1
            print(f"{ds.name:<18} {f.path}  {outcome} ({_human(dest.stat().st_size)}, sha256 ok)")
    print(f"{sum(counts.values())} files in {root}: {counts['downloaded']} downloaded, "
          f"{counts['already present']} were there" + (f", {counts['skipped']} skipped" if counts["skipped"] else ""))
    return counts


# ----------------------------------------------------------------------------------------------
# Common Crawl: `chatforge data download cc [--crawl CRAWL] [--files N]`

CC_NAME = "cc"
# Where the data stage streams `crawl-data/...` inputs from: chatforge.data.warc.CC_PREFIX (not imported,
# because chatforge.data pulls in the whole pipeline's dependencies; a test keeps the two equal).
CC_ORIGIN = "https://data.commoncrawl.org/"
# The gpu and 8xh100 presets' crawl: their inputs are the first one and two lines of its warc.paths.gz
# (segment 1715971057216.39, files 00000 and 00001), so `--files 1` / `--files 2` fetch exactly them.
DEFAULT_CRAWL = "CC-MAIN-2024-22"
CC_LICENSE = "Common Crawl terms of use"
CC_DESCRIPTION = (f"Common Crawl WARC files, ~1 GB each, under crawl-data/CRAWL/ (`data download {CC_NAME} "
                  f"--crawl {DEFAULT_CRAWL} --files N`; not part of 'all')")
_CRAWL_RE = re.compile(r"CC-MAIN-\d{4}-\d{2}")  # every main crawl since 2013; also keeps paths in the data dir
PROGRESS_EVERY_S = 30.0  # without a terminal (a log file), one progress line this often
CC_COUNTS = ("downloaded", "already present")


def _check_cc_args(crawl: str | None, files: int | None) -> tuple[str, int]:
    crawl = crawl or DEFAULT_CRAWL
    files = 1 if files is None else files
    if not _CRAWL_RE.fullmatch(crawl):
        raise ChatforgeError(f"--crawl {crawl}: not a Common Crawl crawl name; they look like {DEFAULT_CRAWL} "
                             f"(the list is at https://index.commoncrawl.org/)")
    if files < 1:
        raise ChatforgeError(f"--files {files}: give the number of WARC files to fetch, 1 or more (~1 GB each)")
    return crawl, files


def check_warc_gz(path: Path) -> str:
    """'' when `path` is a complete gzipped WARC file, else what is wrong with it.

    Common Crawl publishes no checksum per WARC, so this is what can be checked: every gzip member
    decompresses to its end with a good CRC (a cut-off file ends mid-member) and the content starts with
    a WARC record. A file cut exactly between two members would pass; at download time its size is also
    checked against the server's Content-Length, which catches that. Reads ~65 MB/s of gzip on one busy
    core here (the docs WARCs of the data dir), so ~15 s for a 1 GB WARC, also when a rerun finds it present.
    """
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(7)
            if head != b"WARC/1.":
                return f"it does not start with a WARC record (first bytes {head!r}, expected b'WARC/1.')"
            while f.read(CHUNK):
                pass
    except EOFError:
        return "the gzip stream ends in the middle of a member (the file is cut short)"
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; so is a CRC mismatch
        return f"it is not intact gzip data ({e})"
    return ""


def _parse_listing(path: Path, crawl: str) -> list[str]:
    """The WARC paths in a crawl's warc.paths.gz, one `crawl-data/<CRAWL>/segments/.../x.warc.gz` a line.
    Each line is checked, so a listing from a mirror cannot make us write outside the crawl's folder."""
    try:
        lines = gzip.decompress(path.read_bytes()).decode("ascii").split()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{path} is not a gzipped list of WARC paths ({e})") from None
    prefix = f"crawl-data/{crawl}/"
    bad = [p for p in lines if not (p.startswith(prefix) and p.endswith(".warc.gz") and ".." not in p.split("/"))]
    if bad or not lines:
        what = f"line {bad[0]!r} is not" if bad else "it holds no lines, expected"
        raise ChatforgeError(f"{path} is not a list of WARC paths of {crawl}: {what} a path like "
                             f"{prefix}segments/.../NAME.warc.gz")
    return lines


@contextmanager
def _progress(desc: str, total: int | None, initial: int) -> Iterator[Callable[[int], None]]:
    """update(n_bytes): a byte progress bar on a terminal; elsewhere a line every PROGRESS_EVERY_S, so a
    log of a long download shows it is alive and how fast it goes."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  file=sys.stderr, leave=False) as bar:
            yield bar.update
        return
    t0 = last = time.monotonic()
    done = initial

    def update(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            of = f" of {_human(total)} ({100 * done / total:.0f}%)" if total else ""
            print(f"{CC_NAME:<18} {desc}  {_human(done)}{of}, {_rate(done - initial, now - t0)}",
                  file=sys.stderr, flush=True)

    yield update


def _rate(n: int, seconds: float) -> str:
    return f"{n / max(seconds, 1e-6) / 1e6:.1f} MB/s"


def _range_start(content_range: str | None) -> int | None:
    """'bytes 100-199/200' -> 100 (RFC 9110 14.4); None when absent or not that form."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (content_range or "").strip())
    return int(m.group(1)) if m else None


def _fetch_resumable(url: str, part: Path, desc: str) -> tuple[int, float]:
    """Stream url into `part`, continuing a partial `part` with an HTTP Range request (a server that
    ignores Range sends the whole file, and we start over). Returns (bytes fetched now, seconds).
    Network errors propagate and `part` keeps what arrived, for the next run to resume from."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after byte `have`: the part is stale (the file changed); restart
            part.unlink()
            return _fetch_resumable(url, part, desc)
        raise
    with resp:
        start = have if getattr(resp, "status", None) == 206 else 0  # file:// has no status: whole file
        if have and not start:
            print(f"{CC_NAME:<18} {desc}  the server sends the whole file (no resume): starting over")
        if start and _range_start(resp.headers.get("Content-Range")) != have:
            part.unlink()  # a range we did not ask for: the next run starts from zero
            raise HTTPException(f"asked for bytes from {have:,}, got Content-Range "
                                f"{resp.headers.get('Content-Range')!r}")
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length else None
        if length and shutil.disk_usage(part.parent).free < int(length):
            raise ChatforgeError(f"{desc}: {_human(int(length))} to download but only "
                                 f"{_human(shutil.disk_usage(part.parent).free)} free in {part.parent}; free "
                                 f"some space or pass --data_dir (or ${DATA_DIR_ENV}) on a bigger disk")
        t0, fetched = time.monotonic(), 0
        with open(part, "ab" if start else "wb") as out, _progress(desc, total, start) as update:
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                fetched += len(chunk)
                update(len(chunk))
            size = out.tell()
            out.flush()
            os.fsync(out.fileno())
    if total is not None and size != total:
        raise HTTPException(f"connection closed after {size:,} of {total:,} bytes")
    return fetched, time.monotonic() - t0


def _network_reason(e: Exception) -> tuple[str, bool]:
    """(reason to show, offline?) for an exception of a fetch."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}", False
    return str(getattr(e, "reason", None) or e), True


# What a fetch raises when the network or the server fails (HTTPError is a URLError).
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException)


def _mkdir_in(folder: Path, root: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ChatforgeError(f"cannot write into the data dir {root}: {e}; pass --data_dir or set "
                             f"${DATA_DIR_ENV} to a writable folder") from None


def _cc_listing(crawl: str, root: Path, base: str, force: bool) -> list[str]:
    """The crawl's WARC paths, from warc.paths.gz in the data dir (kept, so a rerun needs no network)
    or fetched into it."""
    rel = f"crawl-data/{crawl}/warc.paths.gz"
    dest = root / rel
    if dest.exists() and not force:
        try:
            return _parse_listing(dest, crawl)
        except ChatforgeError as e:
            print(f"{CC_NAME:<18} {rel}  present but unreadable ({e}); downloading again")
    url = base + rel
    _mkdir_in(dest.parent, root)
    part = dest.parent / f".{dest.name}.part"
    part.unlink(missing_ok=True)  # a few MB: always fetched whole
    try:
        try:
            _fetch_resumable(url, part, rel)
        except _NETWORK_ERRORS as e:
            reason, offline = _network_reason(e)
            if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                what = (f"No such crawl there: check --crawl (e.g. {DEFAULT_CRAWL}; the list is at "
                        f"https://index.commoncrawl.org/)")
            elif offline:
                what = "You appear to be offline, or the host cannot be reached: run it again when online"
            else:
                what = "The server did not deliver it: run it again later"
            raise ChatforgeError(
                f"could not download the list of WARC files of crawl {crawl} from {url}: {reason}. {what}, "
                f"pass --mirror URL (a server or folder laid out like {CC_ORIGIN}), or copy WARC files into "
                f"{root / 'crawl-data' / crawl}/ and name them in `chatforge data process --inputs`") from None
        paths = _parse_listing(part, crawl)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    print(f"{CC_NAME:<18} {rel}  downloaded ({len(paths):,} WARC files listed)")
    return paths


def _download_warc(rel: str, root: Path, base: str, force: bool) -> str:
    """One WARC of a crawl into root/rel: kept if present and complete, else fetched (resumed from a
    `.NAME.part` left by an interrupted run), checked, renamed into place. Returns the outcome."""
    dest = root / rel
    if dest.exists() and not force:
        problem = check_warc_gz(dest)
        if not problem:
            print(f"{CC_NAME:<18} {rel}  already present ({_human(dest.stat().st_size)}, gzip complete, WARC ok)")
            return "already present"
        print(f"{CC_NAME:<18} {rel}  present but {problem}; downloading again")
    url = base + urllib.parse.quote(rel)
    _mkdir_in(dest.parent, root)
    part = dest.parent / f".{dest.name}.part"
    if force:
        part.unlink(missing_ok=True)
    elif part.exists():
        print(f"{CC_NAME:<18} {rel}  {_human(part.stat().st_size)} left by an earlier run: resuming there")
    try:
        fetched, seconds = _fetch_resumable(url, part, rel)
    except _NETWORK_ERRORS as e:
        reason, offline = _network_reason(e)
        kept = part.stat().st_size if part.exists() else 0
        what = ("You appear to be offline, or the host cannot be reached" if offline
                else "The server did not deliver it")
        resume = (f"; the {_human(kept)} received are kept in {part} and the next run resumes there" if kept
                  else "")
        raise ChatforgeError(
            f"could not download Common Crawl file {rel} from {url}: {reason}. {what}: run the command again"
            f"{resume}, pass --mirror URL (a server or folder laid out like {CC_ORIGIN}), or copy the file to "
            f"{dest}") from None
    except OSError as e:  # local: disk full, permissions
        raise ChatforgeError(f"could not write {part} while downloading {url}: {e}; free some space or pass "
                             f"--data_dir (or ${DATA_DIR_ENV}) on another disk") from None
    problem = check_warc_gz(part)
    if problem:
        part.unlink()
        raise ChatforgeError(
            f"Common Crawl file {rel} downloaded from {url} is not a complete WARC: {problem}; it was not "
            f"kept. Run the command again to download it afresh, or use another --mirror")
    os.replace(part, dest)
    print(f"{CC_NAME:<18} {rel}  downloaded ({_human(dest.stat().st_size)}, {_rate(fetched, seconds)}; "
          f"gzip complete, WARC ok)")
    return "downloaded"


def download_cc(crawl: str, files: int, root: Path, base: str = "", force: bool = False) -> dict[str, int]:
    """The first `files` WARC files of `crawl` (in warc.paths.gz order, so the same ones every time) into
    root/crawl-data/<crawl>/..., the path the presets' `crawl-data/...` inputs name: the data stage reads
    such a local copy instead of streaming it. `base` is a mirror laid out like data.commoncrawl.org."""
    base = base or CC_ORIGIN
    paths = _cc_listing(crawl, root, base, force)
    if files > len(paths):
        print(f"{CC_NAME:<18} {crawl} lists {len(paths):,} WARC files, fewer than --files {files}: fetching all")
    counts = dict.fromkeys(CC_COUNTS, 0)
    for rel in paths[:files]:
        counts[_download_warc(rel, root, base, force)] += 1
    print(f"{sum(counts.values())} Common Crawl WARC files of {crawl} in {root / 'crawl-data' / crawl}: "
          f"{counts['downloaded']} downloaded, {counts['already present']} were there; the data stage reads "
          f"these local copies for `--inputs crawl-data/...` instead of streaming them")
    return counts


def _cc_row(root: Path) -> tuple[str, str, str, str, str, str]:
    """`data list`'s cc row: the WARC files present under crawl-data/ (of any crawl), no hashing."""
    folder = root / "crawl-data"
    have = [p for p in folder.rglob("*.warc.gz") if p.is_file()] if folder.is_dir() else []
    size = _human(sum(p.stat().st_size for p in have)) if have else "~1 GB/file"
    return CC_NAME, str(len(have)), size, "yes" if have else "missing", CC_LICENSE, CC_DESCRIPTION



# ----------------------------------------------------------------------------------------------
# List


def status(ds: Dataset, root: Path) -> tuple[int, int]:
    """(files present, files) -- presence only, no hashing, so `data list` stays instant."""
    return sum((root / f.path).exists() for f in ds.files), len(ds.files)


def print_list(setting: str = "") -> None:
    root = resolve_data_dir(setting)
    rows = [("name", "files", "size", "present", "license", "description")]
    for ds in REGISTRY.values():
        have, n = status(ds, root)
        state = "yes" if have == n else "missing" if have == 0 else f"{have}/{n}"
        rows.append((ds.name, str(n), _human(ds.size), state, ds.license, ds.description))
    rows.append(_cc_row(root))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"data dir: {root}{'' if root.is_dir() else '  (does not exist yet)'}")
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3].ljust(widths[3]),
                 r[4].ljust(widths[4]), r[5]]
        print("  ".join(cells))
    print("fetch with `chatforge data download NAME ...` (or `all`); checksums are verified on download")
