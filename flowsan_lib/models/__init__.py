"""Models: pretrained gender classifiers and face matchers (interfaces + ports), weight fetching."""
from flowsan_lib.models.interfaces import (
           GENDER_CLASSIFIERS,
           MATCHERS,
           FaceMatcher,
           GenderClassifier,
           load_gender_classifier,
           load_matcher,
)

__all__ = ["GENDER_CLASSIFIERS", "MATCHERS", "FaceMatcher", "GenderClassifier", "load_gender_classifier",
           "load_matcher"]
