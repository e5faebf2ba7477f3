"""A tiny Llama in Flax NNX, written the way tunix writes its models.

Weights are called ``w`` (``Einsum``), ``kernel`` (``nnx.Linear``) and
``input_embedding`` (``Embedder``), carry ``out_sharding`` names, the embedding is
tied to the logits (``decode``: ``x @ table.T``), the RMSNorm scale is used
elementwise, and layers live in an ``nnx.List`` or, with ``scan=True``, are
created by ``nnx.vmap`` and run by ``nnx.scan``. Nothing here knows about adapters.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 64
  dim: int = 32
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 8
  hidden: int = 64
  layers: int = 2
  scan: bool = False


def _param(rngs, shape, names, scale=0.05):
  return nnx.Param(scale * jax.random.normal(rngs.params(), shape), out_sharding=names)


class Einsum(nnx.Module):
  def __init__(self, eqn, shape, names, *, rngs):
    self.eqn = eqn
    self.w = _param(rngs, shape, names)

  def __call__(self, x):
    return jnp.einsum(self.eqn, x, self.w[...])


class RMSNorm(nnx.Module):
  def __init__(self, dim, *, rngs):
    self.w = nnx.Param(jnp.ones((dim,)))

  def __call__(self, x):
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-6) * self.w[...]


class Embedder(nnx.Module):
  def __init__(self, cfg, *, rngs):
    self.input_embedding = _param(rngs, (cfg.vocab, cfg.dim), ("tensor", "fsdp"), 1.0)

  def encode(self, ids):
    return self.input_embedding[...][(ids,)]

  def decode(self, x):
    return jnp.dot(x, self.input_embedding[...].T)


class Attention(nnx.Module):
  def __init__(self, cfg, *, rngs):
    self.cfg = cfg
    d, n, k, h = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
    self.q_proj = Einsum("BTD,DNH->BTNH", (d, n, h), ("fsdp", "tensor", None), rngs=rngs)
    self.k_proj = Einsum("BSD,DKH->BSKH", (d, k, h), ("fsdp", "tensor", None), rngs=rngs)
    self.v_proj = Einsum("BSD,DKH->BSKH", (d, k, h), ("fsdp", "tensor", None), rngs=rngs)
    self.o_proj = Einsum("BTNH,NHD->BTD", (n, h, d), ("tensor", None, "fsdp"), rngs=rngs)

  def __call__(self, x):
    cfg = self.cfg
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    rep = cfg.heads // cfg.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(cfg.head_dim)
    t = x.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
    return self.o_proj(jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v))


class MLP(nnx.Module):
  def __init__(self, cfg, *, rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor"))
    init_down = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("tensor", "fsdp"))
    self.gate_proj = nnx.Linear(cfg.dim, cfg.hidden, use_bias=False, kernel_init=init, rngs=rngs)
    self.up_proj = nnx.Linear(cfg.dim, cfg.hidden, use_bias=False, kernel_init=init, rngs=rngs)
    self.down_proj = nnx.Linear(cfg.hidden, cfg.dim, use_bias=False, kernel_init=init_down,
                                rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg, *, rngs):
    self.input_layernorm = RMSNorm(cfg.dim, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.dim, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = Embedder(cfg, rngs=rngs)
    if cfg.scan:
      @nnx.split_rngs(splits=cfg.layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return DecoderLayer(cfg, rngs=rngs)

      self.layers = make(rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.final_norm = RMSNorm(cfg.dim, rngs=rngs)

  def __call__(self, ids):
    x = self.embedder.encode(ids)
    if self.cfg.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(x, layer):
        return layer(x)

      x = run(x, self.layers)
    else:
      for layer in self.layers:
        x = layer(x)
    return self.embedder.decode(self.final_norm(x))


# The PEFT names of the matching Hugging Face LlamaForCausalLM modules.
HF_NAMES = {
    "attn/q_proj/w": "self_attn.q_proj", "attn/k_proj/w": "self_attn.k_proj",
    "attn/v_proj/w": "self_attn.v_proj", "attn/o_proj/w": "self_attn.o_proj",
    "mlp/gate_proj/kernel": "mlp.gate_proj", "mlp/up_proj/kernel": "mlp.up_proj",
    "mlp/down_proj/kernel": "mlp.down_proj",
}
