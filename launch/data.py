"""`tokenizer train` and `data prepare`: raw sources to a tokenizer and training shards."""

from absl import flags

from launch import common

_INPUT = flags.DEFINE_list('input', [], 'Directories, JSONL(.gz) or Parquet files.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'content', 'JSONL / Parquet field with the text.')
_LANGUAGE_FIELD = flags.DEFINE_string(
  'language_field', 'language', 'Optional field with the language; else the path field.'
)
_PATH_FIELD = flags.DEFINE_string('path_field', 'path', 'Optional field with a file path.')
_LANGUAGES = flags.DEFINE_list('languages', [], 'Keep only these languages; default all.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 32000, 'tokenizer train: pieces in the model.')
_SAMPLE_MB = flags.DEFINE_float('sample_mb', 1024, 'tokenizer train: MiB of text sampled.')
_TOKENIZER = flags.DEFINE_string(
  'tokenizer', None, "data prepare: tokenizer .model; default the default config's."
)
_WORKERS = flags.DEFINE_integer('workers', 0, 'data prepare: processes; 0 = one per CPU.')
_NEAR_DUP = flags.DEFINE_float(
  'near_dup_threshold', 0.85, 'data prepare: MinHash Jaccard of near duplicates; 0 = off.'
)
_HELDOUT = flags.DEFINE_float('heldout_fraction', 0.005, 'data prepare: documents held out.')
_SHARD_MB = flags.DEFINE_float('shard_mb', 256, 'data prepare: target MiB per output shard.')
_KEEP_WORK = flags.DEFINE_bool('keep_work', False, 'data prepare: keep output/work.')


def _read_options():
  from clm_jax.data import sources

  return sources.ReadOptions(
    text_field=_TEXT_FIELD.value,
    language_field=_LANGUAGE_FIELD.value,
    path_field=_PATH_FIELD.value,
  )


def tokenizer_train():
  from clm_jax.data import tokenizer

  common.need('input', 'output')
  tokenizer.train_on_inputs(
    _INPUT.value,
    common.OUTPUT.value,
    _VOCAB_SIZE.value,
    sample_mb=_SAMPLE_MB.value,
    read_options=_read_options(),
    languages=_LANGUAGES.value,
  )


def data_prepare():
  from clm_jax.data import prepare
  from clm_jax.data import tokenizer

  common.need('input', 'output')
  tokenizer_path = _TOKENIZER.value
  if not tokenizer_path:
    c = flags.FLAGS.config
    tokenizer_path = tokenizer.for_corpus(c.data, c.model.vocab_size).path
    print(f'Tokenizer: {tokenizer_path} (of --config; --tokenizer=MODEL to choose)', flush=True)
  options = prepare.PrepareOptions(
    read=_read_options(),
    languages=tuple(_LANGUAGES.value),
    near_dup_threshold=_NEAR_DUP.value,
    heldout_fraction=_HELDOUT.value,
    shard_mb=_SHARD_MB.value,
  )
  prepare.prepare(
    _INPUT.value,
    common.OUTPUT.value,
    tokenizer_path,
    options,
    workers=_WORKERS.value,
    keep_work=_KEEP_WORK.value,
  )


COMMANDS = {'tokenizer train': tokenizer_train, 'data prepare': data_prepare}
