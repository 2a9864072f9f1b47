"""The output folder as a Hugging Face model repository: README.md as a model card, and
``push_to_hub``.

The card is written from a run's results.json: YAML metadata (base_model, library_name,
tags), the erased concept(s), the method and its settings, the TEST numbers with their 95%
intervals, the attacks that were run and what they got back, what was edited, and the
commands that check all of it. Every section reads only what the results hold, so an
erase run, a trained method's adapter or weight delta, and an attack-annotated run all get
a card.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from obliviate.errors import ObliviateError
from obliviate.evaluation.metrics import Interval
from obliviate.evaluation.results import RunResults, chance_text, nothing_applied
from obliviate.io import write_text

# What `--model embedded` is on the hub: Gemma 3 270M (shipped as a Q4_K_M GGUF on PyPI,
# dequantized to float32 by obliviate.models.loading).
EMBEDDED_BASE = "google/gemma-3-270m"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SETS = (("qa", "concept questions (lower = more erased)"), ("simdom", "similar-domain questions (should stay)"),
        ("general", "general knowledge (should stay)"))
SCORES = (("efficacy", "1 - share of the above-chance concept knowledge left"),
          ("specificity", "share of unrelated knowledge kept"),
          ("coherence", "generations on general prompts, relative to the original"),
          ("concept_fluency", "fluency on text that reuses the concept's words (diagnostic)"),
          ("harmonic", "harmonic mean of efficacy and specificity"))
ATTACKS = {"relearn": "relearning (fine-tuning on concept paragraphs)", "relearn-strong": "relearning, stronger",
           "in-context": "concept paragraphs in the prompt", "adversarial": "worst adversarial prefix",
           "tied-restore": "restore tied output rows", "embedding-repair": "embedding repair",
           "repair-relearn": "repair, then relearning", "weights-only": "the weights without inference hooks",
           "gcg": "best GCG suffix, held-out questions",
           "probe": "linear probe on hidden states (chance 0.5)"}
PUSH_IGNORE = [".checkpoint.json", "checkpoints/*", "*.partial/*", "model/*"]  # model/ is pushed on its own


def base_model_id(results: RunResults) -> str | None:
    """The base model as a hub id for the metadata (None for a local folder: the Hub
    rejects a base_model that is not a model id)."""
    base = results.parts.get("base") or (results.model or None)
    if base in (None, "", "embedded"):
        return EMBEDDED_BASE
    base = str(base)
    return base if HUB_ID.match(base) and not Path(base).expanduser().exists() else None


def concepts_of(results: RunResults) -> list[str]:
    """Every concept the run erased: a several-concept erase keeps each one's results under
    its name ("concepts"), a single one names it in ``concept``."""
    listed = results.parts.get("concepts")
    if isinstance(listed, (Mapping, list, tuple)) and listed:
        return [str(c) for c in listed]  # a mapping's names, in the order erased
    return [results.concept] if (results.concept or None) else []


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("'", "")).strip("-")


def _iv(entry: Any) -> str:
    """0.62 [0.48, 0.74] from an interval or its {value, low, high}; a bare number as it is; '–' when absent."""
    if isinstance(entry, Interval):
        entry = entry.as_dict()
    if isinstance(entry, Mapping) and isinstance(entry.get("value"), (int, float)):
        text = f"{entry['value']:.2f}"
        if isinstance(entry.get("low"), (int, float)) and isinstance(entry.get("high"), (int, float)):
            text += f" [{entry['low']:.2f}, {entry['high']:.2f}]"
        return text
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return f"{entry:.2f}"
    return "–"


def _metadata(results: RunResults) -> str:
    method = str((results.method or None) or "unknown")
    base = base_model_id(results)
    saved = results.parts.get("saved") or {}
    adapter_only = not saved.get("model", True) and any("adapter" in str(p) for p in saved.get("edits", []))
    tags = ["obliviate", "concept-erasure", "unlearning", *[m for m in re.split(r"[+]", method) if m]]
    tags += [f"erased-{_slug(c)}" for c in concepts_of(results)]
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter_only else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(tags))
    # JSON scalars are valid YAML: no YAML library needed, and concept names need no escaping.
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---"])


def _settings(results: RunResults) -> list[str]:
    config = results.parts.get("config") or {}
    evaluation = config.get("evaluation") or {}
    rows = [("method", (results.method or None)), ("seed", (results.seed or None)),
            ("EMBER delta", results.parts.get("delta")), ("method parameters", results.parts.get("params") or None),
            ("tokens edited", results.parts.get("edited_token_count")),
            ("output embedding rows", results.parts.get("output_rows")),
            ("multiple-choice scoring", results.parts.get("scoring") or evaluation.get("scoring")),
            ("general knowledge from", results.parts.get("general_knowledge_source")),
            ("coherence prompts from", results.parts.get("coherence_prompt_source")),
            ("choice rule", (results.parts.get("selection") or {}).get("choice") if isinstance(results.parts.get("selection"), dict)
             else None),
            ("config fingerprint", results.parts.get("config_fingerprint"))]
    return [f"| {name} | {_plain(value)} |" for name, value in rows if value not in (None, "", {}, [])]


def _plain(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def _test_table(results: RunResults) -> list[str]:
    measured = results.test.question_sets() if results.test is not None else {}
    rows = [f"| {label} | {_iv(measured[name]['base'])} | {_iv(measured[name]['edited'])} |"
            for name, label in SETS if name in measured]
    scores = [f"| {name} ({label}) | {_iv(results.metric(name))} |" for name, label in SCORES
              if results.metric(name) is not None]
    if not rows and not scores:
        return ["No test questions were evaluated for this run."]
    lines = []
    if rows:
        lines += ["| accuracy on TEST questions | original | erased |", "| --- | --- | --- |", *rows, ""]
    if scores:
        lines += ["| score | value [95% interval] |", "| --- | --- |", *scores, ""]
    lines.append(f"Intervals are 95% bootstrap intervals over questions; chance accuracy is "
                 f"{chance_text(results.chance_levels())}. The delta or "
                 "grid was chosen on TRAIN questions; these numbers were measured once on TEST questions.")
    flagged = [name for name, near in results.near_chance.items() if near]
    if flagged:
        lines.append(f"Near chance on the original model (not informative): {', '.join(flagged)}.")
    return lines


def _lm_eval_rows(results: RunResults) -> list[str]:
    """results["lm_eval"] (evaluation.harness.run_harness): tasks side by side, harness stderrs."""
    table = (results.parts.get("lm_eval") or {}).get("results") or {}
    rows = [f"| {task} | {key.removesuffix(',none')} | {_iv(entry.get('original'))} | {_iv(entry.get('erased'))} | "
            f"{_iv(entry.get('difference'))} |" for task, metrics in table.items() for key, entry in metrics.items()]
    if not rows:
        return []
    return ["## lm-evaluation-harness", "", "| task | metric | original | erased | erased − original |",
            "| --- | --- | --- | --- | --- |", *rows, "",
            "Intervals: value ± 1.96 × the harness's standard error (the difference: paired, same documents).", ""]


def _attack_rows(results: RunResults, attacks: Mapping[str, Any] | None) -> list[str]:
    found = {name: entry for name, entry in {**(results.parts.get("attacks") or {}), **(attacks or {})}.items()}
    found.update({name: results.parts[name] for name in ATTACKS if isinstance(results.parts.get(name), Mapping)})
    found = {n: e for n, e in found.items() if isinstance(e, Mapping)}
    if not found:
        return ["No attacks were run on this model. Run them with `obliviate attack --model THIS_FOLDER "
                "--concept ...` (relearning, in-context, adversarial prefixes, probes) before relying on the erasure."]
    lines = ["| attack | original, attacked | erased, before | erased, attacked | share of knowledge recovered |",
             "| --- | --- | --- | --- | --- |"]
    for name, entry in found.items():
        original, erased = entry.get("original") or {}, entry.get("erased") or {}
        lines.append(f"| {ATTACKS.get(name, name)} | {_iv(original.get('after'))} | {_iv(erased.get('before'))} | "
                     f"{_iv(erased.get('after'))} | {_iv(entry.get('recovered_frac'))} |")
    lines += ["", "Accuracies on TEST questions with 95% intervals. An erasure that relearning brings back quickly hid "
              "the knowledge rather than removing it."]
    return lines


NOTHING_APPLIED = ("**No edit was applied**: no candidate passed the selection gates (or the concept's questions are at "
                   "chance on the base model), so this model equals its base.")


def _edited_rows(results: RunResults) -> list[str]:
    if nothing_applied(results.parts):
        return [f"- {NOTHING_APPLIED}"]
    lines = []
    count = results.parts.get("edited_token_count")
    if count:
        lines.append(f"- Token embeddings: {count} rows of the embedding matrix were moved "
                     f"(output rows: {results.parts.get('output_rows', 'unknown')}).")
        tokens = ((results.parts.get("details") or {}).get("ember") or {}).get("edited_tokens") or []
        if tokens:
            lines.append("- Most-changed tokens: " + ", ".join(f"`{t!r}`" for t in tokens[:30]))  # spaces kept
    features = results.parts.get("features") or []
    if features:
        lines.append(f"- {len(features)} concept feature(s) of the sparse factorization were removed; their top tokens:")
        lines += [f"  - feature {f.get('index')}: " + ", ".join(f"`{t!r}`" for t in f.get("top_tokens", [])[:10])
                  for f in features[:8]]
    saved = results.parts.get("saved") or {}
    if saved:
        files = (["model/ (full weights, loadable with from_pretrained)"] if saved.get("model") else []) + list(
            saved.get("edits", []))
        lines.append("- Files: " + ", ".join(f"`{f}`" for f in files) + " (edits are forward-only: they do not hold "
                     "the original values).")
    check = results.parts.get("leak_check")
    if isinstance(check, Mapping):
        lines.append(f"- Leak check: {'passed' if check.get('passed') else 'FAILED'} "
                     f"({check.get('tensors_checked', '?')} tensors checked; a failure means a saved row still equals "
                     "an edited token's original row).")
    if results.parts.get("leak_warning"):
        lines.append(f"- **Warning:** {results.parts['leak_warning']}")
    return lines or ["- The results do not record which parameters changed."]


def _verify(results: RunResults, concepts: list[str], here: str) -> list[str]:
    model = str(results.parts.get("base") or (results.model or None) or "BASE_MODEL")
    concept_flags = " ".join(f"--concept {json.dumps(c)}" for c in concepts) or "--concept CONCEPT"
    tasks = ",".join(f"ember_qa_{_slug(c).replace('-', '_')}" for c in concepts) or "ember_qa"
    if model == "embedded":  # the dequantized Q4_K_M, not the hub's full-precision weights
        load_base = ["from obliviate.models.loading import load_model",
                     "base = load_model('embedded').model.state_dict()  # the base exactly as erased"]
    else:
        load_base = [f"base = AutoModelForCausalLM.from_pretrained({json.dumps(model)}).state_dict()"]
    expected = None if nothing_applied(results.parts) else results.parts.get("edited_token_count")
    return [
        "The same test questions, original against this model (the numbers above, within their intervals), with "
        "obliviate installed and the EMBER benchmark folder at hand:", "",
        "```bash",
        f"obliviate eval --model {here} --base {model} {concept_flags} --data ember-benchmark --out verify",
        "```", "",
        "With lm-evaluation-harness (its `acc_norm` is the accuracy above):", "",
        "```bash", "obliviate lm-eval-tasks --data ember-benchmark --out ember-tasks",
        f"lm_eval --model hf --model_args pretrained={here} --include_path ember-tasks --tasks {tasks}",
        "```", "",
        "What changed, parameter by parameter:", "",
        "```python", "from transformers import AutoModelForCausalLM", *load_base,
        f"erased = AutoModelForCausalLM.from_pretrained({json.dumps(here)}).state_dict()",
        "for name, tensor in erased.items():",
        "    changed = (tensor != base[name]).reshape(tensor.shape[0], -1).any(dim=1) if tensor.dim() else tensor != base[name]",
        "    if changed.any():",
        "        print(name, int(changed.sum()), 'rows changed')",
        "```",
    ] + (["", f"Expected: {expected} embedding rows changed, nothing else."] if expected else [])


def _examples(results: RunResults, limit: int = 2) -> list[str]:
    examples = results.parts.get("examples") or {}
    lines = []
    for kind, rows in examples.items():
        for row in (rows or [])[:limit]:
            lines += [f"- *{kind}* prompt: {_quote(row.get('prompt'))}",
                      f"  - original: {_quote(row.get('original'))}", f"  - erased: {_quote(row.get('edited'))}"]
    return lines


def _quote(text: Any) -> str:
    return json.dumps(" ".join(str(text or "").split())[:240], ensure_ascii=False)


def model_card(results: RunResults, attacks: Mapping[str, Any] | None = None,
               repo_id: str | None = None) -> str:
    """README.md for the output folder: YAML metadata, then what was erased, how, how well
    (test numbers with 95% intervals, attacks) and how to check it. ``attacks`` adds an
    attack run's results ({"relearn": {...}, ...}, as in its results.json); ``repo_id``
    names the Hub repository in the commands (else THIS_FOLDER)."""
    concepts = concepts_of(results)
    named = " and ".join(f"“{c}”" for c in concepts) or "a concept"
    base = results.parts.get("base") or (results.model or None) or "the base model"
    about = f"`{base}`"
    if base == "embedded":
        base, about = "Gemma 3 270M", (f"`{EMBEDDED_BASE}` as obliviate embeds it (its Q4_K_M GGUF, dequantized to "
                                      "float32)")
    method = (results.method or None) or "unknown"
    lines = [
        _metadata(results), "",
        f"# {base} with {named} erased ({method})", "",
        f"This model is {about} with the concept{'s' if len(concepts) > 1 else ''} {named} erased by "
        f"obliviate using `{method}`"
        + (" (EMBER: concept features removed from the token embeddings)" if results.parts.get("delta") else "") + ".",
        "It should answer questions about the concept at chance while keeping similar-domain and general knowledge "
        "and fluent generations. Check the intervals and the attacks below before relying on it.", "",
        *([NOTHING_APPLIED, ""] if nothing_applied(results.parts) else []),
        "## Settings", "", "| setting | value |", "| --- | --- |", *_settings(results), "",
        "## Test results", "", *_test_table(results), "",
        *_lm_eval_rows(results),
        "## Attacks", "", *_attack_rows(results, attacks), "",
        "## What was edited", "", *_edited_rows(results), "",
    ]
    examples = _examples(results)
    if examples:
        lines += ["## Generations, original vs erased", "", *examples, ""]
    lines += ["## How to verify", "", *_verify(results, concepts, repo_id or "THIS_FOLDER"), "",
              "## Limitations", "",
              "Erasure is measured with multiple-choice questions (50 a split in the EMBER benchmark, about ±0.14 at "
              "95%), generations and the attacks listed; knowledge a test does not probe may remain. Tell users what "
              "was removed and how it was checked.", ""]
    return "\n".join(lines)


def card_folder(out: str | Path) -> Path:
    """Where the card goes: model/ when the run saved full weights, else the run folder (whose
    edit files, a patch, an adapter or a weight delta, are then the repository)."""
    out = Path(out)
    return out / "model" if (out / "model").is_dir() else out


def write_model_card(out: str | Path, results: RunResults, attacks: Mapping[str, Any] | None = None,
                     repo_id: str | None = None) -> Path:
    """Write README.md into ``card_folder(out)``; returns its path."""
    path = card_folder(out) / "README.md"
    write_text(path, model_card(results, attacks, repo_id))
    return path


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload ``folder`` (a model/ folder or a run folder with its card) to the Hub model
    repository ``repo_id`` (created when missing). Returns the repository URL. Refuses a
    folder without README.md, and one whose results.json records a failed leak check."""
    folder = Path(folder)
    if not HUB_ID.match(repo_id or ""):
        raise ObliviateError(f"--push-to-hub {repo_id!r} is not a repository id: use OWNER/NAME.")
    if not (folder / "README.md").is_file():
        raise ObliviateError(f"{folder} has no README.md: write the model card first (write_model_card).")
    for results_path in (folder / "results.json", folder.parent / "results.json"):
        if results_path.is_file():
            check = json.loads(results_path.read_text(encoding="utf-8")).get("leak_check") or {}
            if check and not check.get("passed", True):
                raise ObliviateError(f"{results_path} records a failed leak check: the saved files can restore the "
                                     "original model. Not pushing.")
            break
    try:
        from huggingface_hub import HfApi
    except ImportError as err:
        raise ObliviateError(f"Pushing needs huggingface_hub ({err}).") from err
    api = HfApi(token=token)
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message=commit_message or "obliviate: erased model and model card",
                      ignore_patterns=PUSH_IGNORE if folder.name != "model" else [".checkpoint.json"])
    return str(url)
