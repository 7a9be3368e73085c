"""Defaults live in GRPOConfig only, and every entry point turns its options into a GRPOConfig the same way.

Generic over GRPOConfig's fields: a field added to GRPOConfig is covered without touching this file.
- every public function or class of grpo_kernels whose signature names a GRPOConfig field gives it
  GRPOConfig's default (inspect.signature);
- the keyword-wide functions take every field, keyword-only, and hand the options unchanged to
  ``_validate.resolve_config``;
- every entry point rejects a config that is not a GRPOConfig, a bad option value, an unknown option and
  config= together with options, with the same errors.
"""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import _validate, vocab_parallel
from grpo_kernels.config import GRPOConfig

DEFAULTS = {f.name: f.default for f in fields(GRPOConfig)}

# (module whose resolve_config the function calls, the function)
KEYWORD_WIDE = [gk.grpo_loss, gk.fused_linear_grpo_loss, vocab_parallel.grpo_loss]


def _public_callables():
    """Every public function and class (its __init__ and forward) of grpo_kernels and vocab_parallel."""
    seen = {}
    for mod in (gk, vocab_parallel):
        for name in getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]:
            obj = getattr(mod, name)
            if inspect.isclass(obj):
                for meth in ("__init__", "forward"):
                    if meth in vars(obj):
                        seen[f"{obj.__qualname__}.{meth}"] = getattr(obj, meth)
            elif inspect.isfunction(obj) and obj.__module__.startswith("grpo_kernels"):
                seen[obj.__qualname__ if mod is gk else f"vocab_parallel.{name}"] = obj
    return seen


PUBLIC = _public_callables()


def test_the_public_surface_was_found():
    assert {"grpo_loss", "token_logprobs", "GRPOLoss.__init__", "fused_linear_grpo_loss",
            "FusedLinearGRPOLoss.__init__", "vocab_parallel.grpo_loss", "vocab_parallel.token_logprobs"} <= set(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_no_signature_states_another_default(name):
    for pname, p in inspect.signature(PUBLIC[name]).parameters.items():
        if pname in DEFAULTS and p.default is not inspect.Parameter.empty:
            assert p.default == DEFAULTS[pname] and type(p.default) is type(DEFAULTS[pname]), (
                f"{name}({pname}={p.default!r}) but GRPOConfig.{pname} = {DEFAULTS[pname]!r}")


@pytest.mark.parametrize("fn", KEYWORD_WIDE, ids=lambda f: f.__module__ + "." + f.__qualname__)
def test_keyword_wide_functions_take_every_option_with_its_default(fn):
    params = inspect.signature(fn).parameters
    for name, default in DEFAULTS.items():
        assert name in params, f"{fn.__qualname__} lacks the option {name}"
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == default


@pytest.mark.parametrize("fn", KEYWORD_WIDE, ids=lambda f: f.__module__ + "." + f.__qualname__)
def test_keyword_wide_functions_forward_every_option(fn, monkeypatch):
    """The options reach resolve_config unchanged (a distinct object per field), and nothing else does."""
    seen = {}

    class Stop(Exception):
        pass

    def spy(config, options, where):
        seen.update(config=config, options=dict(options), where=where)
        raise Stop

    monkeypatch.setattr(_validate, "resolve_config", spy)
    sent = {name: object() for name in DEFAULTS}
    tensors = (torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long))
    if fn is gk.fused_linear_grpo_loss:
        tensors = (torch.zeros(1, 1, 2), torch.zeros(3, 2), tensors[1])
    with pytest.raises(Stop):
        fn(*tensors, **sent)
    assert seen["config"] is None and seen["options"] == sent


# ---- one validation for every entry point ---------------------------------------------------------
def _inputs():
    torch.manual_seed(0)
    return dict(logits=torch.randn(2, 3, 5), ids=torch.randint(0, 5, (2, 3)), adv=torch.randn(2))


def _with_config(entry, config):
    x = _inputs()
    if entry == "grpo_loss_with_config":
        return gk.grpo_loss_with_config(x["logits"], x["ids"], config, advantages=x["adv"])
    if entry == "fused_linear_grpo_loss_with_config":
        return gk.fused_linear_grpo_loss_with_config(torch.randn(2, 3, 4), torch.randn(5, 4), x["ids"], config,
                                                     advantages=x["adv"])
    if entry == "vocab_parallel.grpo_loss_with_config":
        return vocab_parallel.grpo_loss_with_config(x["logits"], x["ids"], config, advantages=x["adv"])
    if entry == "GRPOLoss":
        return gk.GRPOLoss(config)
    if entry == "FusedLinearGRPOLoss":
        return gk.FusedLinearGRPOLoss(weight=torch.randn(5, 4), config=config)
    raise AssertionError(entry)


def _with_options(entry, **options):
    x = _inputs()
    if entry == "grpo_loss":
        return gk.grpo_loss(x["logits"], x["ids"], advantages=x["adv"], **options)
    if entry == "fused_linear_grpo_loss":
        return gk.fused_linear_grpo_loss(torch.randn(2, 3, 4), torch.randn(5, 4), x["ids"], advantages=x["adv"],
                                         **options)
    if entry == "vocab_parallel.grpo_loss":
        return vocab_parallel.grpo_loss(x["logits"], x["ids"], advantages=x["adv"], **options)
    if entry == "GRPOLoss":
        return gk.GRPOLoss(**options)
    if entry == "FusedLinearGRPOLoss":
        return gk.FusedLinearGRPOLoss(weight=torch.randn(5, 4), **options)
    raise AssertionError(entry)


@pytest.mark.parametrize("entry", ["grpo_loss_with_config", "fused_linear_grpo_loss_with_config",
                                   "vocab_parallel.grpo_loss_with_config", "GRPOLoss", "FusedLinearGRPOLoss"])
def test_a_config_that_is_not_a_grpoconfig_is_rejected_first(entry):
    with pytest.raises(TypeError, match=r"config must be a \S*GRPOConfig.*, got dict"):
        _with_config(entry, {"beta": 0.1})


@pytest.mark.parametrize("entry", ["grpo_loss", "fused_linear_grpo_loss", "vocab_parallel.grpo_loss", "GRPOLoss",
                                   "FusedLinearGRPOLoss"])
def test_options_are_validated_by_grpoconfig(entry):
    with pytest.raises(TypeError, match="beta must be a real number"):
        _with_options(entry, beta="0.1")
    with pytest.raises(ValueError, match="epsilon_low must be >= 0"):
        _with_options(entry, epsilon_low=-0.1)
    with pytest.raises(TypeError, match=r"unknown \S+ options \['not_an_option'\]"):
        _with_options(entry, not_an_option=1.0)


@pytest.mark.parametrize("entry", ["GRPOLoss", "FusedLinearGRPOLoss"])
def test_config_and_options_together_are_rejected(entry):
    with pytest.raises(ValueError, match="either config= or keyword options"):
        _with_options(entry, config=GRPOConfig(), beta=0.1)


def test_keyword_options_equal_the_config():
    """The same loss from options and from the equal GRPOConfig (the torch backend, exactly)."""
    x = _inputs()
    opts = dict(beta=0.04, loss_type="grpo", epsilon_high=0.28, temperature=0.7)
    ref = torch.randn(2, 3)
    a = gk.grpo_loss(x["logits"], x["ids"], advantages=x["adv"], ref_logps=ref, backend="torch", **opts)
    b = gk.grpo_loss_with_config(x["logits"], x["ids"], GRPOConfig(**opts), advantages=x["adv"], ref_logps=ref,
                                 backend="torch")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logps, b.logps)
