"""Training data: sources, preparation, and the Grain input pipeline.

`sources` reads trees, JSONL and Parquet into documents; `filters` and
`dedup` decide which to keep; `prepare` writes them as ArrayRecord shards
(`records`); `fim` rearranges documents for infilling; `pipeline` turns
documents into packed batches of token ids.
"""
