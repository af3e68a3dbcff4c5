"""Which test pins each sentence of docs/resume.md, and the page's sentences: read by
``test_lifecycle.test_every_sentence_of_the_resume_page_is_pinned_by_a_test``."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["PINS", "RESUME_PAGE", "sentences"]

RESUME_PAGE = Path(__file__).resolve().parent.parent / "docs" / "resume.md"

#: Each sentence of docs/resume.md (by its beginning) and the tests that prove it.
PINS: dict[str, list[str]] = {
    "This page says what holds for a run of the app": [
        "test_the_lightning_range_pyproject_claims_is_the_one_installed"],
    "Every sentence on it is pinned by a test": [
        "test_every_sentence_of_the_resume_page_is_pinned_by_a_test"],
    "Launch and relaunch a run with the very same command": [
        "test_resume_from_last_ckpt_continues_the_run",
        "test_killed_mid_epoch_and_relaunched_with_the_same_command_ends_as_if_never_stopped"],
    "`ckpt_path=<run dir>/checkpoints/last.ckpt` does the same": [
        "test_relaunch_of_a_finished_run_leaves_its_results_intact"],
    "`checkpoints/last.ckpt` is rewritten after every epoch's validation": [
        "test_last_ckpt_is_the_last_epoch_even_when_val_acc_drops"],
    "A run killed mid-epoch (SIGKILL or SIGTERM) or in the middle of a projection": [
        "test_killed_mid_epoch_and_relaunched_with_the_same_command_ends_as_if_never_stopped"],
    "The killed epoch is trained again from its start": [
        "test_killed_mid_epoch_and_relaunched_with_the_same_command_ends_as_if_never_stopped"],
    "This is bit-exact with the shipped digits data module": [
        "test_killed_mid_epoch_and_relaunched_with_the_same_command_ends_as_if_never_stopped"],
    "After SIGTERM, Lightning finishes the current batch": [
        "test_killed_mid_epoch_and_relaunched_with_the_same_command_ends_as_if_never_stopped"],
    "Each relaunch keeps the earlier launch's `csv/metrics.csv`": [
        "test_killed_mid_epoch_and_relaunched_with_the_same_command_ends_as_if_never_stopped"],
    "Relaunching a finished run trains nothing": [
        "test_relaunch_of_a_finished_run_leaves_its_results_intact",
        "test_relaunch_after_decomposition_neither_crashes_nor_lies"],
    "If its `results.json` is gone": [
        "test_relaunch_of_a_finished_run_without_results_writes_no_fake_zero",
        "test_relaunch_after_decomposition_neither_crashes_nor_lies"],
    "The shipped `last.ckpt` holds the last epoch's dense model": [
        "test_relaunch_of_a_finished_run_leaves_its_results_intact",
        "test_relaunch_after_decomposition_neither_crashes_nor_lies"],
    "The callback's checkpointed state is filed under its settings": [
        "test_rank_multiple.py::test_state_key_only_changes_with_rounding",
        "test_callback_edges.py::test_a_relaunch_with_other_settings_says_so_and_counts_on"],
    "A relaunch that changes one of them": [
        "test_callback_edges.py::test_a_relaunch_with_other_settings_says_so_and_counts_on"],
    "Layers the checkpoint holds as thin pairs stay thin": [
        "test_callback_edges.py::"
        "test_a_fit_of_a_partly_decomposed_model_reports_against_the_dense_one",
        "test_report.py::test_rank_report_of_a_partly_decomposed_model_counts_from_the_dense_one",
        "test_relaunch_after_decomposition_neither_crashes_nor_lies"],
    "A run into a dir that already holds `results.json` or checkpoints": [
        "test_a_second_run_into_a_used_dir_is_refused_unless_overwrite"],
    "A run dir that cannot take files": [
        "test_an_unwritable_output_dir_fails_before_training"],
    "A run dir that turns read-only at the end of training": [
        "test_a_run_dir_made_read_only_at_fit_end_loses_nothing_and_relaunches"],
    "`status` is `\"finished\"`": [
        "test_every_sentence_of_the_resume_page_is_pinned_by_a_test",
        "test_a_diverging_run_ends_with_status_diverged_and_finite_metrics",
        "test_a_fault_at_fit_end_is_recorded_and_a_relaunch_redoes_the_end"],
    "A non-finite training loss skips its step and stops the fit": [
        "test_a_diverging_run_ends_with_status_diverged_and_finite_metrics",
        "test_a_nan_loss_mid_run_keeps_the_weights_finite"],
    "A step after training that fails": ["test_faults_after_training_are_recorded_not_lost"],
    "If the LRPET callback's own fit-end work fails": [
        "test_a_fault_at_fit_end_is_recorded_and_a_relaunch_redoes_the_end"],
    "When every solver attempt for a layer fails at the last scheduled projection": [
        "test_a_transient_solver_failure_at_the_last_projection_still_ends_exactly_low_rank"],
    "A value that was not measured is `null`": [
        "test_relaunch_of_a_finished_run_without_results_writes_no_fake_zero",
        "test_a_diverging_run_ends_with_status_diverged_and_finite_metrics",
        "test_a_fault_at_fit_end_is_recorded_and_a_relaunch_redoes_the_end"],
    "Lightning's SLURM auto-requeue": [
        "test_preemption.py::test_slurm_requeue_saves_hpc_checkpoint_and_resumes_exactly"],
}


def sentences(markdown: str) -> list[str]:
    """The page's prose, one sentence per item: code blocks and headings left out, each
    bullet (or paragraph) joined onto one line and split after ``.``, ``!`` or ``?``."""
    items: list[list[str]] = []
    fresh = True
    for line in re.sub(r"```.*?```", "", markdown, flags=re.S).splitlines():
        if not line.strip() or line.startswith("#"):
            fresh = True
        elif line.startswith("- ") or fresh:
            items.append([line.removeprefix("- ").strip()])
            fresh = False
        else:
            items[-1].append(line.strip())
    return [s for item in items for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", " ".join(item))]
