"""The output folder of a run: one run per folder (a different run is refused unless
--overwrite), a checkpoint that lets an interrupted run resume, and the files a finished
run leaves: model/ (plain from_pretrained), each edit saved forward-only, results.json,
report.md, report.html and summary.csv, every one written atomically, then the leak check.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from obliviate.edits.embedding import EmbeddingPatch, check_revertible_path
from obliviate.edits.leak_check import UNTIED_WARNING, check_outputs
from obliviate.edits.protocol import parts_of
from obliviate.errors import ObliviateError
from obliviate.evaluation.results import RunResults
from obliviate.io import read_json, write_json, write_text
from obliviate.models.loading import LoadedModel
from obliviate.reports.html import ReportRun, write_report as write_html_report
from obliviate.reports.markdown import markdown_report
from obliviate.reports.model_card import card_folder, push_to_hub, write_model_card

CHECKPOINT = ".checkpoint.json"


def prepare_out_dir(out: Path, fingerprint: str, overwrite: bool) -> dict:
    """Refuse to mix runs in one folder; return the resumable checkpoint if it is ours."""
    checkpoint = out / CHECKPOINT
    results = out / "results.json"
    if out.exists() and any(out.iterdir()):
        owner = None
        if checkpoint.exists():
            owner = read_json(checkpoint).get("fingerprint")
        elif results.exists():
            owner = read_json(results).get("config_fingerprint")
        if owner != fingerprint:
            if not overwrite:
                raise ObliviateError(
                    f"Output folder {out} already holds a different run. Choose another --out, or pass "
                    "--overwrite to replace it."
                )
            shutil.rmtree(out)
        elif checkpoint.exists() and not overwrite:
            return read_json(checkpoint)
    return {"fingerprint": fingerprint, "sweeps": {}}


def mark_out_dir(out: Path, state: dict) -> None:
    """Create the folder with our checkpoint as its first file: a run killed before its first
    result then resumes instead of finding a folder that looks like someone else's."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CHECKPOINT, state)


def finish(out: Path, results: dict) -> None:
    """The final results.json; the checkpoint goes (the run is complete)."""
    write_json(out / "results.json", results)
    (out / CHECKPOINT).unlink(missing_ok=True)


def publish(out: Path, results: dict) -> None:
    """Upload the finished run's model card folder to the Hub repository the config names."""
    repo = results["config"].get("push_to_hub")
    if repo:
        results["pushed_to"] = push_to_hub(card_folder(out), repo, private=results["config"].get("private", False))
        write_json(out / "results.json", results)


def changes_no_weight(edit, model) -> bool:
    """True for an edit that changes no weight (an inference hook such as ECO's): its model/
    would be a copy of the original, so it is not written."""
    parts = parts_of(edit)
    return bool(parts) and not any(part.expected_changes(model) for part in parts)


def save_model(out: Path, lm: LoadedModel) -> None:
    """model/ as a plain from_pretrained folder, written beside and renamed into place."""
    model_dir, staging = out / "model", out / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    lm.model.save_pretrained(staging)
    lm.tokenizer.save_pretrained(staging)
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)


def save_outputs(out: Path, lm: LoadedModel, edit, results: dict) -> None:
    """model/, every part of the edit (forward-only), report.md and the HTML report. Then the
    leak check: no saved file may hold an edited token's original row (the reference's
    untied output layer is expected to, and warned of)."""
    revertible = results["config"].get("revertible_patch") or None
    if revertible:
        revertible = check_revertible_path(revertible, out)  # before writing anything
    shutil.rmtree(out / "model.partial", ignore_errors=True)
    hook_only = changes_no_weight(edit, lm.model)
    if results["config"]["save_model"] and not hook_only:
        save_model(out, lm)
    saves_model = results["config"]["save_model"] and not hook_only
    # an edit whose files beside model/ would give the original back (a LoRA adapter) is the
    # record only when model/ is not written
    parts = [part for part in parts_of(edit) if not (saves_model and part.reveals_original_beside_model)]
    results["saved"] = {"model": saves_model,
                        "edits": [str(path.relative_to(out)) for part in parts for path in part.save_to(out)]}
    patches = [part for part in parts_of(edit) if isinstance(part, EmbeddingPatch)]
    if revertible:
        for patch in patches:
            patch.save(revertible, revertible=True)
    results["leak_check"] = check_outputs(out, patches)
    leaks_by_design = results["output_rows"] == "original"  # --untie-embeddings: the reference, warned of
    if leaks_by_design:
        results["leak_warning"] = UNTIED_WARNING
    typed = RunResults.from_dict(results)
    write_text(out / "report.md", markdown_report(typed))
    write_html_report([ReportRun(out.name, typed)], out)  # report.html and summary.csv
    write_model_card(out, typed, repo_id=results["config"].get("push_to_hub"))
    if not results["leak_check"]["passed"] and not leaks_by_design:
        write_json(out / "results.json", results)  # the record of the failure, then fail loudly
        leak = results["leak_check"]["leaks"][0]
        raise ObliviateError(
            f"Leak check failed: {results['leak_check']['leak_count']} saved row(s) still equal an edited token's "
            f"original row (first: token {leak['token_id']} in {leak['tensor']} row {leak['row']}, cosine "
            f"{leak['cosine']:.4f}). Whoever holds {out} could restore the original; do not share it. See "
            "results.json leak_check."
        )
