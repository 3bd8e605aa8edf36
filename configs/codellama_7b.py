"""CodeLlama-7B-style pre-training: the 34B recipe on the 7B shape, with infilling.

32 layers, d_model 4096, 32 query heads = 32 kv heads (no GQA at 7B),
SwiGLU 11008, RoPE theta 1e6. CodeLlama-7B and 13B were trained with the
fill-in-the-middle objective on 90% of documents (half PSM, half SPM); the
data, schedule, batch and sequence length are codellama_34b.py's.
"""

from configs import codellama_34b


def get_config():
  c = codellama_34b.get_config()
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.mlp_dim = 11008
  c.mesh.data = 16
  c.mesh.tensor = 8
  c.mesh.pipeline = 1
  c.data.fim_rate = 0.9
  c.data.fim_spm_rate = 0.5
  return c
