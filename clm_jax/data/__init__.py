"""Training data: sources, preparation, tokenizer, chat template, the Grain input.

`sources` reads trees, JSONL and Parquet into documents; `filters` and
`dedup` decide which to keep; `prepare` writes them as ArrayRecord shards
(`records`); `tokenizer` and `chat` turn text and dialogs into ids; `fim`
rearranges documents for infilling; `loader` turns documents into packed
batches of token ids. Nothing here imports the model, the mesh or training.
"""
