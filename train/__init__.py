"""The two training phases (`train.concept`, `train.condition`) and their small shared helpers.
Nothing imports train/."""
