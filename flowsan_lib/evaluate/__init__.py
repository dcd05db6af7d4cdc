"""Evaluation against unseen models: metrics with bootstrap CIs, pair sampling, the classifier and
matcher suites, the attacks, and the 05_evaluate stage (`stage.run_evaluate_stage`; see
docs/EVALUATION.md). Only the light modules are imported here."""
from flowsan_lib.evaluate.metrics import eer, roc_auc, tmr_at_fmr
from flowsan_lib.evaluate.pairs import Pairs, different_image_pairs, lfw_pairs, same_image_pairs

__all__ = ["Pairs", "different_image_pairs", "eer", "lfw_pairs", "roc_auc", "same_image_pairs", "tmr_at_fmr"]
