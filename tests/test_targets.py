"""Target rules and kernel layouts."""

import math

import jax
import jax.numpy as jnp
import pytest

from sdslora_jax import targets
from sdslora_jax.targets import Rule, infer_layout, rule, select_targets


def _params():
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return {
      "embed": {"embedding": s(50, 16)},
      "attn": {
          "query": {"kernel": s(16, 4, 4), "bias": s(4, 4)},
          "out": {"kernel": s(4, 4, 16), "bias": s(16)},
      },
      "mlp": {"kernel": s(16, 64), "bias": s(64)},
      "head": {"kernel": s(64, 3)},
      "weird": {"kernel": s(3, 5, 7)},
      "step": jax.ShapeDtypeStruct((), jnp.int32),
  }


def test_layout_defaults():
  assert infer_layout("a/kernel", (8, 3)).in_axes == (0,)
  assert infer_layout("a/kernel", (16, 4, 4)).in_axes == (0,)
  assert infer_layout("a/kernel", (4, 4, 16)).in_axes == (0, 1)
  lay = infer_layout("a/kernel", (3, 3, 2, 8), kind="conv")
  assert (lay.in_axes, lay.d_in, lay.d_out) == ((0, 1, 2), 18, 8)
  emb = infer_layout("e/embedding", (50, 16))
  assert (emb.kind, emb.in_axes) == ("embed", (0,))
  over = infer_layout("a/kernel", (3, 5, 7), in_axes=(-2,))
  assert (over.in_axes, over.out_axes, over.d_in, over.d_out) == ((1,), (0, 2), 5, 21)


def test_layout_errors():
  with pytest.raises(ValueError, match=r"a/kernel: cannot tell the input axes of kernel shape \(3, 5, 7\)"):
    infer_layout("a/kernel", (3, 5, 7))
  with pytest.raises(ValueError, match="at least one and not all"):
    infer_layout("a/kernel", (3, 5, 7), in_axes=(0, 1, 2))
  with pytest.raises(ValueError, match="out of range"):
    infer_layout("a/kernel", (3, 5), in_axes=(2,))
  with pytest.raises(ValueError, match="at least 2 axes"):
    infer_layout("a/kernel", (3,))


def test_first_match_wins_and_settings():
  ts = select_targets(
      _params(),
      [
          rule(r"attn/.*/kernel", rank=2, alpha=4.0, method="lora"),
          rule(r".*kernel", rank=3, alpha=6.0, rslora=True, in_axes=None),
          ("embed/embedding", {"rank": 1}),
      ],
      layouts={"weird/kernel": targets.KernelLayout((3, 5, 7), (0, 1))},
  )
  by = {t.path: t for t in ts}
  assert set(by) == {"embed/embedding", "attn/query/kernel", "attn/out/kernel", "mlp/kernel",
                     "head/kernel", "weird/kernel"}
  assert by["attn/query/kernel"].rule.rank == 2 and by["attn/query/kernel"].rule.scale == 2.0
  assert by["mlp/kernel"].rule.scale == pytest.approx(6.0 / math.sqrt(3))
  assert by["attn/out/kernel"].layout.in_axes == (0, 1)
  assert by["weird/kernel"].layout.in_axes == (0, 1)
  assert by["embed/embedding"].layout.kind == "embed"
  assert by["head/kernel"].keys == ("head", "kernel")


def test_predicate_rule():
  ts = select_targets(_params(), [Rule(match=lambda p, x: x.shape == (16, 64), rank=4)])
  assert [t.path for t in ts] == ["mlp/kernel"]


def test_rule_matching_nothing_lists_nearby_paths():
  with pytest.raises(ValueError, match=r"rule 'mlp/kernal' matches no parameter; nearby paths: 'mlp/kernel'"):
    select_targets(_params(), [rule("mlp/kernal")])
  with pytest.raises(ValueError, match=r"rule <predicate never> matches no parameter"):
    def never(p, x):
      return False
    select_targets(_params(), [rule(never)])


def test_rule_matching_non_kernel():
  with pytest.raises(ValueError, match=r"rule 'mlp/.\*' matches 'mlp/bias' .* not a supported kernel.*nearby kernels: 'mlp/kernel'"):
    select_targets(_params(), [rule("mlp/.*")])
  with pytest.raises(ValueError, match=r"matches 'step'"):
    select_targets(_params(), [rule("step")])


def test_shadowed_rule():
  with pytest.raises(ValueError, match=r"rule 'head/kernel' only matches parameters that earlier rules"):
    select_targets(_params(), [rule("(mlp|head)/kernel", rank=2), rule("head/kernel")])


def test_rank_too_large_raises_before_tracing():
  with pytest.raises(ValueError, match=r"rank 4 exceeds min\(d_in, d_out\) = 3 for 'head/kernel' \(kernel shape \(64, 3\)"):
    select_targets(_params(), [rule("head/kernel", rank=4)])
  with pytest.raises(ValueError, match=r"rank 17 exceeds .* 'attn/query/kernel' .*d_in=16, d_out=16"):
    select_targets(_params(), [rule("attn/query/kernel", rank=17)])


def test_heuristic_failure_names_path():
  with pytest.raises(ValueError, match=r"weird/kernel: cannot tell the input axes"):
    select_targets(_params(), [rule("weird/kernel")])


def test_in_axes_disagreeing_with_module():
  lay = {"attn/out/kernel": targets.KernelLayout((4, 4, 16), (0, 1))}
  with pytest.raises(ValueError, match=r"in_axes \(0,\) for 'attn/out/kernel' disagree with the module"):
    select_targets(_params(), [rule("attn/out/kernel", in_axes=(0,))], layouts=lay)


def test_rule_validation():
  with pytest.raises(ValueError, match="unknown method 'dora'"):
    rule("x", method="dora")
  with pytest.raises(ValueError, match="rank must be a positive int"):
    rule("x", rank=0)
  with pytest.raises(ValueError, match="not a valid regular expression"):
    rule("(")
  with pytest.raises(ValueError, match="no target rules"):
    select_targets(_params(), [])


def test_einsum_in_axes():
  assert targets.einsum_in_axes("btd,dhk->bthk", 3) == (0,)
  assert targets.einsum_in_axes("bthk,hkd->btd", 3) == (0, 1)
  assert targets.einsum_in_axes("btnh,nhk->btnk", 3) is None  # n is shared
  with pytest.raises(ValueError, match="kernel spec 'dh' is not 3-D"):
    targets.einsum_in_axes("btd,dh->bth", 3)


def test_known_layout_shape_must_match_parameter():
  # Stacked by nn.scan / nnx.vmap: the module sees (16, 64) per call; one adapter per layer.
  params = {"layers": {"mlp": {"kernel": jax.ShapeDtypeStruct((3, 16, 64), jnp.float32)}}}
  lay = {"layers/mlp/kernel": targets.KernelLayout((16, 64), (0,))}
  (t,) = select_targets(params, [rule("layers/mlp/kernel", rank=2)], layouts=lay)
  assert t.layout == targets.KernelLayout((3, 16, 64), (1,), "dense", (0,))
  assert (t.layout.d_in, t.layout.d_out, t.layout.layer_shape) == (16, 64, (3,))
  # A per-call shape that is not a trailing part of the parameter's is an error.
  bad = {"layers/mlp/kernel": targets.KernelLayout((64, 16), (0,))}
  with pytest.raises(ValueError, match=r"a parameter of shape \(3, 16, 64\), but its module uses a "
                     r"kernel of shape \(64, 16\) per call, which is not a trailing part of it"):
    select_targets(params, [rule("layers/mlp/kernel", rank=2)], layouts=bad)
  with pytest.raises(ValueError, match=r"layer_axes \(0, 1\) .* disagree with the module"):
    select_targets(params, [rule("layers/mlp/kernel", rank=2, layer_axes=(0, 1))], layouts=lay)
  with pytest.raises(ValueError, match="must be the leading kernel axes"):
    rule("x", layer_axes=(1,))


@pytest.mark.parametrize("kind", targets.CONV_KINDS)
def test_conv_kinds_share_the_conv_layout(kind):
  lay = infer_layout("a/kernel", (3, 12, 8), kind=kind)
  assert (lay.kind, lay.in_axes, lay.d_in, lay.d_out) == (kind, (0, 1), 36, 8)
  with pytest.raises(ValueError, match=r"unknown kernel kind 'conv_2d'"):
    infer_layout("a/kernel", (3, 12, 8), kind="conv_2d")
