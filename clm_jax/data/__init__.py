"""Training data: corpus sources and the Grain input pipeline.

`sources` decides which files make a corpus and how they split into train and
held-out sets; `pipeline` turns a split into packed batches of token ids.
"""
