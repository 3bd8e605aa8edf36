"""The LLaMA-2 decoder: layers, attention, loss, FLOPs; logical axis names only.

Axis alphabet, used in einsum strings and as suffixes on activations
(`q_BTNH`, `logits_BTV`) everywhere in clm_jax:
  B batch, T query length (sequence), S key length, D d_model, N query heads,
  K kv heads, G query heads per kv head (N = K * G), H head_dim, F mlp hidden,
  V vocab, L layers, X tokens (B * T flattened, or a chunk's rows), M documents
  per packed row (`model.max_segments`), C chunks and c positions per chunk (loss),
  P pipeline stages, R virtual stages, I schedule iterations.
Lower-case letters are per-device sizes where a module says so.

Modules name logical axes only (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `norm`, `layers`, `stage`, `batch`, `seq`); `clm_jax.parallel.sharding`
maps them onto the mesh.
"""
