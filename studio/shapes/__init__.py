"""The embedded "shapes" world: its renderer, the model built for it, the judge (an examiner only), pretraining,
control conditions and the shipped weights."""
