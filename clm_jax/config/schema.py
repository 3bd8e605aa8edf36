"""Every configuration key of clm_jax, each with what it means.

Other files in configs/ change only what differs. The config is locked, so a
typo'd key raises at once; `clm_jax.config.validate` checks the values.
"""

import ml_collections

DTYPES = ('float32', 'bfloat16', 'float16')
REMAT = ('none', 'full', 'save_dots')
ATTENTION = ('xla', 'cudnn')
# Values `data.source` may take: this interpreter's standard library, a tree of
# source files (both tokenized on the fly), the output of `data prepare`, or dialogs.
SOURCES = ('stdlib', 'files', 'prepared', 'instruct')
LANGUAGES = ('python', 'cpp', 'java', 'javascript', 'go', 'text')
CODE_EVAL_TASKS = ('humaneval', 'mbpp')


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 32000  # Rows of the embedding and columns of the LM head.
  m.d_model = 4096  # Width of the residual stream (D).
  m.num_layers = 32  # Decoder blocks (L), run as one scan over stacked params.
  m.num_heads = 32  # Query heads (N); head_dim = d_model // num_heads.
  m.num_kv_heads = 32  # Key/value heads (K) for grouped-query attention.
  m.mlp_dim = 11008  # Hidden width of the SwiGLU MLP (F).
  m.rope_theta = 10000.0  # Rotary base; CodeLlama uses 1e6.
  m.norm_eps = 1e-5  # RMSNorm epsilon.
  m.max_seq_len = 4096  # Longest sequence the model is meant for (HF max_position_embeddings).
  m.init_std = 0.02  # Std of the normal initialiser of every matrix.
  m.param_dtype = 'float32'  # Dtype of the master weights (and optimizer state).
  m.dtype = 'bfloat16'  # Compute dtype of matmuls; logits and softmax stay float32.
  m.remat = 'full'  # Recompute in backward: 'none' | 'full' | 'save_dots' (keep matmul outputs).
  m.attention = 'xla'  # Attention core: 'xla' (dense document mask) | 'cudnn' (flash, packed).
  m.max_segments = 64  # Documents per packed row (padding one) 'cudnn' is built for; 'xla' ignores.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel size; -1 takes every device left over.
  c.mesh.tensor = 1  # Megatron tensor-parallel size.
  c.mesh.pipeline = 1  # Pipeline stages: the layer stack split over this many devices.
  c.mesh.virtual_stages = 1  # Layer chunks per pipeline device (circular schedule); 1 = GPipe.
  # Micro-batches sent through the pipeline per pass (all their stage inputs
  # are held for backward); passes accumulate. 0 = all of train.microbatches.
  c.mesh.pipeline_microbatches = 0
  c.mesh.fsdp = False  # Also shard params and optimizer state over 'data' (ZeRO-3).

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000  # Optimizer steps to run.
  t.seed = 0  # Seeds parameter init and data order.
  # Start from these params (a run dir, a params-only checkpoint or a Hugging Face
  # Llama dir) when the workdir has no checkpoint yet; '' = random init.
  t.init_from = ''
  t.seq_len = 2048  # Tokens per packed row (T).
  t.global_batch_size = 64  # Rows per optimizer step, over all devices.
  t.microbatches = 1  # Gradient-accumulation splits of the global batch.
  t.loss_chunk_len = 512  # Positions per LM-head + softmax chunk (logits never whole); 0 = T.
  t.log_every = 10  # Steps between metric lines.
  t.eval_every = 0  # Steps between held-out evaluations; 0 = only at the end.
  t.eval_batches = 4  # Held-out batches per evaluation; 0 disables evaluation.
  t.code_eval_every = 0  # Steps between sandboxed greedy pass@1 code evals; 0 = never.
  t.code_eval_tasks = 'humaneval'  # Comma-separated: humaneval, mbpp (3-shot, test split).
  t.code_eval_problems = 0  # The first N problems of each task; 0 = all.
  t.code_eval_max_new_tokens = 384  # Most tokens per completion.
  t.code_eval_allow_weaker_sandbox = False  # Run code evals where a sandbox layer is missing.
  t.max_nonfinite = 10  # Consecutive non-finite steps (skipped) before the run stops.
  t.peak_tflops = 0.0  # Device bf16 peak for MFU; 0 = look up the device kind.

  c.optim = o = ml_collections.ConfigDict()
  o.peak_lr = 3e-4  # Learning rate at the end of warmup.
  o.warmup_steps = 2000  # Linear warmup from 0 to peak_lr.
  o.decay_steps = 0  # Steps of cosine decay after warmup; 0 = until train.steps.
  o.end_lr_ratio = 0.1  # Cosine floor as a fraction of peak_lr.
  o.b1 = 0.9  # Adam beta1.
  o.b2 = 0.95  # Adam beta2.
  o.eps = 1e-6  # Adam epsilon.
  o.weight_decay = 0.1  # Decoupled weight decay; never applied to norm scales.
  o.clip_norm = 1.0  # Global gradient-norm clip; 0 disables.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000  # Steps between checkpoints; the last step is always saved.
  c.checkpoint.keep = 3  # Recent checkpoints kept.
  c.checkpoint.keep_period = 0  # Also keep steps that are multiples of this; 0 = none.

  c.data = d = ml_collections.ConfigDict()
  d.source = 'stdlib'  # One of SOURCES; 'instruct' trains on the answers only.
  # Corpus root ('stdlib', 'files'), prepared directory, or instruction JSONL file or
  # directory (heldout*.jsonl held out); '' = stdlib default.
  d.path = ''
  d.heldout_fraction = 0.02  # Raw sources: fraction of files held out for evaluation.
  d.mixture = ''  # Train weights by language, 'python:0.6,text:0.4'; '' = natural proportions.
  d.fim_rate = 0.0  # Chance a document is drawn for FIM (taken only where it fits its row).
  d.fim_spm_rate = 0.5  # Of those, the fraction in SPM (suffix first) order; the rest PSM.
  d.streams = 16  # Packed streams of different documents; each gives B/S rows of every batch.
  d.workers = 0  # Grain worker processes per host; 0 = in the training process.
  d.read_threads = 1  # Threads per stream reading and tokenizing documents ahead.
  d.prefetch = 2  # Batches made ahead in a background thread; 0 = none.
  d.tokenizer = ''  # sentencepiece .model; '' = the prepared dir's, or one trained on the corpus.
  d.tokenizer_sample_mb = 8  # Raw sources: megabytes of text the default tokenizer learns from.

  # What `python -m launch plan` sizes the run for (flags of the same names override).
  c.plan = p = ml_collections.ConfigDict()
  p.device_type = 'a100-80gb'  # One of clm_jax.plan.DEVICE_TYPES: peak FLOP/s and memory.
  p.devices = 0  # Devices of the run; 0 = the mesh's size (or this machine's devices).
  p.mfu = 0.4  # Model-FLOPs utilisation assumed for step time and duration.
  p.tokens = 0.0  # Training-token budget; 0 = train.steps x tokens per step.
  p.target_days = 0.0  # A wall-clock target; the plan gives the MFU it needs. 0 = none.
  # GPU-hours a source reports for the run, checked against devices x target_days; 0 = none.
  p.claimed_gpu_hours = 0.0
  p.devices_per_node = 8  # GPUs per host: the plan names the mesh axes whose groups span hosts.

  c.lock()
  return c


def flatten(c: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """{'model.d_model': 512, ...} for a nested ConfigDict."""
  out = {}
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def parse_mixture(text: str) -> dict[str, float]:
  """Parses `data.mixture`, e.g. 'python:0.5,cpp:0.3,text:0.2', to weights."""
  weights = {}
  for entry in filter(None, (e.strip() for e in text.split(','))):
    language, sep, weight = entry.partition(':')
    language = language.strip()
    try:
      value = float(weight)
    except ValueError:
      value = float('nan')
    if not sep or not value > 0 or language in weights:
      raise ValueError(
        f'data.mixture={text!r}: bad entry {entry!r}; expected LANGUAGE:WEIGHT with a '
        'positive weight, each language once.'
      )
    if language not in LANGUAGES + ('unknown',):
      raise ValueError(f'data.mixture={text!r}: {language!r} is not one of {LANGUAGES}.')
    weights[language] = value
  return weights
