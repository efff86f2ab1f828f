#!/usr/bin/env python3
"""Makes the golden fixtures of tests/golden: tiny random-weight checkpoints written by Hugging Face
transformers, with the float32 logits transformers computes for a fixed token sequence.

Each fixture is a folder <case>/ holding
  model/                    a Hugging Face model folder, nothing else in it:
    config.json             as transformers writes it (or rewritten to the classic spelling, see CASES)
    model.safetensors       the stored weights (BF16 / F16 / F32, or a quantized layout)
    hf_quant_config.json    ModelOpt's legacy quant file, where the case has one
  expected.safetensors      tokens I32 [n], logits F32 [n, vocab]; __metadata__ holds fp64_gap & co.
  dequantized.safetensors   quantized cases only: layer 0's q_proj and down_proj weights dequantized to
                            F32 by this script, a reference for the C++ dequantizers

The expected logits come from one eager-attention forward over the whole sequence, in float32, with
transformers' own modules and the stored weights upcast to float32 (for quantized cases: each quantized
weight replaced by its dequantized value, computed in float32). `fp64_gap` is max |logits_f32 - logits_f64|
where logits_f64 is the same forward in float64 (RMSNorm, softmax and RoPE patched to stay in float64,
since transformers forces those to float32): the size of float32 rounding noise in the reference, which
the golden test scales into its tolerance.

Quantization follows ModelOpt's recipe (see /work/shared/nvfp4-facts.md 1.1-1.3, 2.1, 2.2); the code below
is our own torch code, not ModelOpt's or compressed-tensors'.

Run on a machine with torch and transformers (the device machine: see tests/golden/README.md):
  python3 tests/golden/make_fixtures.py --out-dir DIR [--tar FILE.tar.gz] [--only CASE,...]
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import traceback
import types

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

VOCAB = 512
HIDDEN = 64
N_FF = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
FP4_MAX = 6.0
FP8_MAX = 448.0
NVFP4_BLOCK = 16
MODELOPT_PRODUCER = {"name": "modelopt", "version": "0.29.0"}
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def common(**extra):
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=N_FF, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              attn_implementation="eager")
    kw.update(extra)
    return kw


def rope(theta, **scaling):
    params = {"rope_type": "default", "rope_theta": float(theta)}
    params.update(scaling)
    return params


# base: name of the case whose weights a quantized case reuses; classic: rewrite config.json to the
# rope_theta / rope_scaling / torch_dtype spelling of transformers 4 and published checkpoints.
CASES = {
    "llama_gqa": dict(seed=1, n=40, cls=(LlamaConfig, LlamaForCausalLM), dtype=torch.bfloat16, classic=True,
                      kw=common(rope_parameters=rope(10000.0))),
    # llama3 scaling; original_max_position_embeddings 32 with head_dim 16 and theta 10000 puts one
    # frequency in each of the three llama3 bands (wavelength 6.3 < 32/4; 19.9 between; 62.8.. > 32/1),
    # and the 40 positions run past 32.
    "llama3_rope_tied": dict(seed=2, n=40, cls=(LlamaConfig, LlamaForCausalLM), dtype=torch.bfloat16,
                             classic=False,
                             kw=common(tie_word_embeddings=True, rms_norm_eps=1e-6,
                                       rope_parameters=rope(10000.0, rope_type="llama3", factor=8.0,
                                                            low_freq_factor=1.0, high_freq_factor=4.0,
                                                            original_max_position_embeddings=32))),
    "llama_attn_bias": dict(seed=3, n=40, cls=(LlamaConfig, LlamaForCausalLM), dtype=torch.float16,
                            classic=False,
                            kw=common(attention_bias=True, mlp_bias=True, rope_parameters=rope(500000.0))),
    "mistral": dict(seed=4, n=33, cls=(MistralConfig, MistralForCausalLM), dtype=torch.float32, classic=False,
                    kw=common(sliding_window=4096, rope_parameters=rope(1000000.0))),
    "qwen2_bias": dict(seed=5, n=33, cls=(Qwen2Config, Qwen2ForCausalLM), dtype=torch.bfloat16, classic=False,
                       kw=common(tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False,
                                 rope_parameters=rope(1000000.0))),
    # head_dim 32 != hidden / heads = 16
    "qwen3_qknorm": dict(seed=6, n=40, cls=(Qwen3Config, Qwen3ForCausalLM), dtype=torch.bfloat16,
                         classic=False,
                         kw=common(head_dim=32, rms_norm_eps=1e-6, use_sliding_window=False,
                                   rope_parameters=rope(1000000.0))),
    "qwen3_nvfp4_modelopt": dict(base="qwen3_qknorm", quant="modelopt_nvfp4"),
    "llama_nvfp4_ct": dict(base="llama_gqa", quant="ct_nvfp4"),
    "llama_fp8_modelopt": dict(base="llama_gqa", quant="modelopt_fp8"),
    # MoE: 8 experts of width 32, top-2 renormalised; layer 0 is dense (mlp_only_layers), layer 1 MoE. No
    # head_dim in the config: Qwen3-MoE then takes hidden / heads (Qwen3's default would be 128).
    "qwen3_moe": dict(seed=7, n=40, cls=(Qwen3MoeConfig, Qwen3MoeForCausalLM), dtype=torch.bfloat16,
                      classic=False,
                      kw=common(rms_norm_eps=1e-6, use_sliding_window=False, rope_parameters=rope(1000000.0),
                                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0])),
    # Every linear NVFP4 (experts one by one) except the router mlp.gate and lm_head, as ModelOpt exports.
    "qwen3_moe_nvfp4_modelopt": dict(base="qwen3_moe", quant="modelopt_nvfp4"),
    # Qwen2-MoE in the classic spelling: 4 experts top-2 without renormalisation, a shared expert (width 64)
    # behind its sigmoid gate, q/k/v bias; decoder_sparse_step 2 makes layer 1 MoE and layer 0 dense.
    "qwen2_moe": dict(seed=8, n=33, cls=(Qwen2MoeConfig, Qwen2MoeForCausalLM), dtype=torch.bfloat16,
                      classic=True,
                      kw=common(rms_norm_eps=1e-6, use_sliding_window=False, rope_parameters=rope(1000000.0),
                                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, norm_topk_prob=False,
                                decoder_sparse_step=2)),
}


# Cases with a maker of their own (a different architecture's model and checkpoint layout).
import nemotron_h_fixtures  # noqa: E402  (tests/golden/, next to this script)

CASES["nemotron_h"] = dict(make=nemotron_h_fixtures.make_nemotron_case)
CASES["nemotron_h_nvfp4_modelopt"] = dict(make=nemotron_h_fixtures.make_nemotron_case)


def make_tokens(n, salt):
    """Fixed ids spread over the vocabulary: id 0 and vocab-1 included, one id repeated at two positions."""
    t = [(i * 211 + salt * 37 + 5) % VOCAB for i in range(n)]
    t[1] = 0
    t[n - 1] = VOCAB - 1
    t[n // 2] = t[3]
    return t


# ------------------------------------------------------------------------------------------------
# Random weights
# ------------------------------------------------------------------------------------------------


def randomize(model, seed):
    """Weights that let no bug hide: norms around 1 (not all ones), biases non-zero, q/k large enough that
    attention is far from uniform, embeddings small enough (rms 0.05) that rms_norm_eps shows in layer 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                v = 0.05 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                v = 0.05 * torch.randn(p.shape, generator=gen)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                v = 0.12 * torch.randn(p.shape, generator=gen)
            else:
                v = 0.08 * torch.randn(p.shape, generator=gen)
            p.copy_(v.to(p.dtype))


def build_base(name):
    """The case's model in float32 holding exactly the values stored at the case's dtype."""
    case = CASES[name]
    config_cls, model_cls = case["cls"]
    torch.manual_seed(case["seed"])
    config = config_cls(**case["kw"])
    config.architectures = [model_cls.__name__]
    model = model_cls(config).eval()
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.tie_weights()
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            raise RuntimeError(f"{name}: lm_head is not tied to embed_tokens")
    randomize(model, case["seed"])
    eager_experts(model)
    # Round the parameters only: model.to(dtype) would also round buffers such as RoPE's inv_freq.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(case["dtype"]).to(torch.float32))
    return model


# ------------------------------------------------------------------------------------------------
# Forward passes
# ------------------------------------------------------------------------------------------------


def forward(model, tokens):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens], dtype=torch.long), use_cache=False)
    return out.logits[0]


def llama3_scale(inv_freq, params):
    factor = params["factor"]
    low = params["low_freq_factor"]
    high = params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def inv_freq_f64(params, dim):
    inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rope_type = params.get("rope_type", "default")
    if rope_type == "llama3":
        inv = llama3_scale(inv, params)
    elif rope_type != "default":
        raise ValueError(f"no float64 RoPE for rope_type {rope_type}")
    return inv


def f64_rope_forward(self, x, position_ids, *args, **kwargs):
    freqs = position_ids[..., None].to(torch.float64) * self._golden_inv_freq64  # [b, n, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = float(getattr(self, "attention_scaling", 1.0))
    return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def f64_rmsnorm_forward(self, x):
    eps = getattr(self, "variance_epsilon", None)
    if eps is None:
        eps = self.eps
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward_f64(model, tokens, notes):
    """The same forward in float64. transformers computes RMSNorm, attention softmax and the RoPE table in
    float32 whatever the model's dtype; those are patched here so that nothing rounds to float32."""
    m64 = copy.deepcopy(model)  # the float32 model stays as it is
    params = model.config.rope_parameters
    for mod in m64.modules():
        cls = type(mod).__name__
        if cls.endswith("RotaryEmbedding"):
            inv32 = getattr(mod, "inv_freq", None)
            if inv32 is None:
                notes.append(f"{cls} has no inv_freq: RoPE table left in float32")
                continue
            inv64 = inv_freq_f64(params, 2 * inv32.numel())
            rel = ((inv64 - inv32.double()).abs() / inv64.abs()).max().item()
            if rel > 1e-6:
                notes.append(f"float64 inv_freq differs from transformers' by {rel:.3g}: using transformers'")
                inv64 = inv32.double().clone()
            mod._golden_inv_freq64 = inv64
            mod.forward = types.MethodType(f64_rope_forward, mod)
        elif cls.endswith("RMSNorm"):
            mod.forward = types.MethodType(f64_rmsnorm_forward, mod)
    m64.double()
    original_softmax = F.softmax

    def softmax64(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64:
            dtype = None
        return original_softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    F.softmax = softmax64
    torch.nn.functional.softmax = softmax64
    try:
        return forward(m64, tokens)
    finally:
        F.softmax = original_softmax
        torch.nn.functional.softmax = original_softmax


# ------------------------------------------------------------------------------------------------
# Quantizers (ModelOpt recipe; facts in /work/shared/nvfp4-facts.md)
# ------------------------------------------------------------------------------------------------

E2M1_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)
E2M1_VALUES = torch.cat([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])  # code -> value; code 8 is -0
# Decision boundaries between neighbouring magnitudes; at an exact tie round-to-nearest-even picks the code
# with mantissa bit 0: down at 0.25, 1.25, 2.5, 5 and up at 0.75, 1.75, 3.5.
E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
E2M1_TIE_UP = torch.tensor([False, True, False, True, False, True, False])


def e2m1_codes(y):
    """float32 values already divided by their scales -> 4-bit codes (uint8), RNE, saturating at 6."""
    a = y.abs().unsqueeze(-1)
    code = (a > E2M1_BOUNDS).sum(-1) + ((a == E2M1_BOUNDS) & E2M1_TIE_UP).sum(-1)
    return code.to(torch.uint8) | ((y < 0).to(torch.uint8) << 3)


def pack_nibbles(codes):
    """[N, K] codes -> [N, K/2] bytes, element 2i in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed):
    n, half = packed.shape
    out = torch.empty(n, half * 2, dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def block_scales_e4m3(scale):
    """float32 block scales -> float8_e4m3fn: zero blocks get 1, others are floored at 2^-9 (smallest
    subnormal, so no block scale becomes 0) and capped at 448 before the round-to-nearest cast."""
    s = torch.where(scale == 0, torch.ones_like(scale), scale.clamp(min=2.0 ** -9, max=FP8_MAX))
    return s.to(torch.float8_e4m3fn)


def nvfp4_modelopt(w):
    """w: float32 [N, K]. Returns stored tensors and the float32 dequantized weight."""
    n, k = w.shape
    assert k % NVFP4_BLOCK == 0, (n, k)
    scale_2 = (w.abs().max() / (FP4_MAX * FP8_MAX)).to(torch.float32)  # amax / 2688
    blocks = w.view(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(-1)
    scale8 = block_scales_e4m3(block_amax / (FP4_MAX * scale_2))
    scale = scale8.to(torch.float32)
    codes = e2m1_codes(blocks / (scale.unsqueeze(-1) * scale_2)).view(n, k)
    deq = (E2M1_VALUES[codes.long()].view(n, k // NVFP4_BLOCK, NVFP4_BLOCK) * scale.unsqueeze(-1)) * scale_2
    packed = pack_nibbles(codes)
    assert torch.equal(unpack_nibbles(packed), codes)
    stored = {"weight": packed.contiguous(), "weight_scale": scale8.contiguous(),
              "weight_scale_2": scale_2.reshape(())}
    return stored, deq.view(n, k)


def nvfp4_ct(w):
    """compressed-tensors nvfp4-pack-quantized: the same two-level scheme, global scale stored as its
    reciprocal (2688 / amax, shape [1]); dequant = e2m1 * (block_scale / global_scale)."""
    n, k = w.shape
    assert k % NVFP4_BLOCK == 0, (n, k)
    global_scale = ((FP4_MAX * FP8_MAX) / w.abs().max()).to(torch.float32)
    blocks = w.view(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(-1)
    scale8 = block_scales_e4m3(block_amax / FP4_MAX * global_scale)
    step = scale8.to(torch.float32) / global_scale
    codes = e2m1_codes(blocks / step.unsqueeze(-1)).view(n, k)
    deq = E2M1_VALUES[codes.long()].view(n, k // NVFP4_BLOCK, NVFP4_BLOCK) * step.unsqueeze(-1)
    stored = {"weight_packed": pack_nibbles(codes).contiguous(), "weight_scale": scale8.contiguous(),
              "weight_global_scale": global_scale.reshape(1)}
    return stored, deq.view(n, k)


def fp8_modelopt(w):
    """ModelOpt FP8: per-tensor scale amax / 448, weight = e4m3(w / scale); dequant = e4m3 * scale."""
    scale = (w.abs().max() / FP8_MAX).to(torch.float32)
    w8 = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": w8.contiguous(), "weight_scale": scale.reshape(())}, w8.to(torch.float32) * scale


def input_amax(model, tokens, modules):
    """Calibration: max |input| of each linear over the fixture's own sequence."""
    amax = {}
    hooks = []
    for name in modules:
        mod = model.get_submodule(name)

        def hook(m, args, name=name):
            amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().item())

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        forward(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    return amax


def quantized_modules(model):
    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEAR_SUFFIXES]


# ------------------------------------------------------------------------------------------------
# MoE: transformers 5 holds a layer's experts fused (mlp.experts.gate_up_proj [E, 2I, H] with gate rows first,
# mlp.experts.down_proj [E, H, I]; transposed where the module says experts_are_transposed); checkpoints hold
# them per expert (mlp.experts.{e}.gate_proj.weight [I, H] ...), as published Qwen MoE checkpoints and the
# ModelOpt / llm-compressor exports do. The fixtures store them per expert; transformers' own loading of that
# layout (reload_logits) must reproduce the in-memory model.
# ------------------------------------------------------------------------------------------------


def is_moe(model):
    return "moe" in model.config.model_type


def eager_experts(model):
    """The expert loop (index_add_ per expert, in expert order) rather than batched/grouped kernels."""
    model.config._experts_implementation = "eager"
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            cfg._experts_implementation = "eager"


def fused_experts(model):
    """{prefix 'model.layers.L.mlp.experts.': module} of the fused expert modules."""
    return {name + ".": mod for name, mod in model.named_modules()
            if hasattr(mod, "gate_up_proj") and isinstance(getattr(mod, "gate_up_proj"), torch.nn.Parameter)}


def unfuse(tensors, model):
    """Per-expert tensors from a state dict that holds fused ones (unchanged if it holds none)."""
    out = dict(tensors)
    for prefix, mod in fused_experts(model).items():
        if prefix + "gate_up_proj" not in out:
            continue
        transposed = bool(getattr(mod, "experts_are_transposed", False))
        gate_up = out.pop(prefix + "gate_up_proj")
        down = out.pop(prefix + "down_proj")
        n_e = gate_up.shape[0]
        for e in range(n_e):
            gu = gate_up[e].t() if transposed else gate_up[e]  # [2I, H]
            dn = down[e].t() if transposed else down[e]        # [H, I]
            i = gu.shape[0] // 2
            if dn.shape != (gu.shape[1], i):
                raise RuntimeError(f"{prefix}: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} "
                                   "do not fit the expected fused layout")
            out[f"{prefix}{e}.gate_proj.weight"] = gu[:i].contiguous()
            out[f"{prefix}{e}.up_proj.weight"] = gu[i:].contiguous()
            out[f"{prefix}{e}.down_proj.weight"] = dn.contiguous()
    return out


def model_state(model, weights):
    """The model's state dict filled from per-expert float32 `weights` (fused where the model fuses)."""
    state = model.state_dict()
    fused = fused_experts(model)
    for k in state:
        if k in weights:
            state[k] = weights[k]
            continue
        prefix = k.rsplit(".", 1)[0] + "."
        if prefix not in fused:
            raise RuntimeError(f"{k}: no stored tensor for it")
        transposed = bool(getattr(fused[prefix], "experts_are_transposed", False))
        n_e = state[k].shape[0]
        if k.endswith("gate_up_proj"):
            parts = [torch.cat([weights[f"{prefix}{e}.gate_proj.weight"], weights[f"{prefix}{e}.up_proj.weight"]])
                     for e in range(n_e)]
        elif k.endswith("down_proj"):
            parts = [weights[f"{prefix}{e}.down_proj.weight"] for e in range(n_e)]
        else:
            raise RuntimeError(f"{k}: unknown fused tensor")
        t = torch.stack([p.t() if transposed else p for p in parts])
        if t.shape != state[k].shape:
            raise RuntimeError(f"{k}: rebuilt {tuple(t.shape)} != model's {tuple(state[k].shape)}")
        state[k] = t
    return state


def moe_modules(weights):
    """Linear modules a ModelOpt NVFP4 export quantizes, by stored name: attention, dense MLPs, every expert's
    and the shared expert's projections; not the routers (mlp.gate), shared_expert_gate or lm_head."""
    return sorted(k[:-len(".weight")] for k in weights
                  if k.endswith(".weight") and k.split(".")[-2] in LINEAR_SUFFIXES)


def moe_routing_stats(model, tokens, weights):
    """Input amax of every expert projection (tokens routed to it only), the other linears' input amax, and
    the smallest gap between the k-th and (k+1)-th router probability over all tokens and MoE layers (a top-k
    choice that close could flip between two float32 implementations)."""
    cfg = model.config
    k = cfg.num_experts_per_tok
    captured = {}
    hooks = []
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("SparseMoeBlock"):
            def hook(m, args, name=name):
                captured[name] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        forward(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    amax, margin = {}, float("inf")
    for name, h in captured.items():
        probs = F.softmax(h @ weights[name + ".gate.weight"].t(), dim=-1, dtype=torch.float32)
        top = probs.topk(k + 1, dim=-1)
        margin = min(margin, (top.values[:, k - 1] - top.values[:, k]).min().item())
        for e in range(cfg.num_experts):
            rows = (top.indices[:, :k] == e).any(-1)
            p = f"{name}.experts.{e}."
            if not rows.any():
                for s in ("gate_proj", "up_proj", "down_proj"):
                    amax[p + s] = 0.0
                continue
            x = h[rows]
            amax[p + "gate_proj"] = amax[p + "up_proj"] = x.abs().max().item()
            mid = F.silu(x @ weights[p + "gate_proj.weight"].t()) * (x @ weights[p + "up_proj.weight"].t())
            amax[p + "down_proj"] = mid.abs().max().item()
    return amax, margin


# ------------------------------------------------------------------------------------------------
# Config files
# ------------------------------------------------------------------------------------------------


def to_classic(config):
    """transformers 5 spelling -> the classic one (rope_theta, rope_scaling, torch_dtype)."""
    out = dict(config)
    if "rope_parameters" not in out:
        raise RuntimeError("config.json has no rope_parameters to rewrite")
    params = dict(out.pop("rope_parameters"))
    out["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") == "default" and set(params) <= {"rope_type"}:
        out["rope_scaling"] = None
    else:
        out["rope_scaling"] = params
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    return out


def modelopt_hf_quant_config(algo, exclude=("lm_head",)):
    q = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": list(exclude)}
    if algo == "NVFP4":
        q["group_size"] = NVFP4_BLOCK
    return {"producer": MODELOPT_PRODUCER, "quantization": q}


def modelopt_nvfp4_quantization_config(exclude=("lm_head",)):
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_BLOCK}
    return {"config_groups": {"group_0": {"input_activations": dict(fp4), "weights": dict(fp4),
                                          "targets": ["Linear"]}},
            "ignore": list(exclude), "quant_algo": "NVFP4", "group_size": NVFP4_BLOCK, "kv_cache_scheme": None,
            "producer": MODELOPT_PRODUCER, "quant_method": "modelopt"}


def ct_nvfp4_quantization_config():
    """As llm-compressor serializes its NVFP4 preset scheme (compressed-tensors QuantizationArgs)."""
    def args(dynamic, observer):
        return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": NVFP4_BLOCK,
                "num_bits": 4, "observer": observer, "observer_kwargs": {},
                "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True,
                "type": "float", "zp_dtype": "torch.float8_e4m3fn"}
    return {"config_groups": {"group_0": {"format": "nvfp4-pack-quantized",
                                          "input_activations": args("local", "static_minmax"),
                                          "output_activations": None, "targets": ["Linear"],
                                          "weights": args(False, "memoryless_minmax")}},
            "format": "nvfp4-pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {}, "transform_config": {}, "version": "0.12.2"}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ------------------------------------------------------------------------------------------------
# Fixture writer
# ------------------------------------------------------------------------------------------------


def reload_logits(config, weights, tokens):
    """transformers' own reading of a config.json (without quantization) and float32 weights."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = {k: v for k, v in config.items() if k != "quantization_config"}
        write_json(os.path.join(tmp, "config.json"), plain)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
        eager_experts(model)
        return forward(model.eval(), tokens)


def make_case(name, out_dir):
    case = CASES[name]
    if "make" in case:
        return case["make"](name, out_dir, sys.modules[__name__])
    base_name = case.get("base", name)
    base = CASES[base_name]
    salt = base["seed"] + (100 if "quant" in case else 0)
    n = base["n"]
    tokens = make_tokens(n, salt)
    model = build_base(base_name)
    folder = os.path.join(out_dir, name)
    model_dir = os.path.join(folder, "model")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(model_dir)
    notes = []

    # The plain checkpoint as transformers writes it.
    with tempfile.TemporaryDirectory() as tmp:
        stored_model = build_base(base_name).to(base["dtype"])
        stored_model.config.dtype = base["dtype"]
        stored_model.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
        stored = unfuse(load_file(os.path.join(tmp, "model.safetensors")), model)
        extra = sorted(set(os.listdir(tmp)) - {"config.json", "model.safetensors", "generation_config.json"})
        if extra:
            notes.append(f"save_pretrained also wrote {extra} (not kept)")
    if base["classic"]:
        config = to_classic(config)

    # The float32 weights transformers computes with: stored values upcast (or dequantized).
    weights = {k: v.to(torch.float32) for k, v in stored.items()}
    tensors = dict(stored)
    dequantized = {}
    quant = case.get("quant")
    moe = is_moe(model)
    routing_margin = None
    if quant:
        modules = moe_modules(weights) if moe else quantized_modules(model)
        for mod in modules:
            w = weights[mod + ".weight"]
            if quant == "modelopt_nvfp4":
                q, deq = nvfp4_modelopt(w)
            elif quant == "ct_nvfp4":
                q, deq = nvfp4_ct(w)
            else:
                q, deq = fp8_modelopt(w)
            del tensors[mod + ".weight"]
            for suffix, t in q.items():
                tensors[f"{mod}.{suffix}"] = t
            weights[mod + ".weight"] = deq
            if (mod.startswith("model.layers.0.") and mod.endswith(("q_proj", "down_proj"))) or \
                    mod.endswith("experts.0.down_proj"):
                dequantized[mod + ".weight"] = deq.contiguous()
        if moe:
            model.load_state_dict(model_state(model, weights), strict=True)
            expert_amax, routing_margin = moe_routing_stats(model, tokens, weights)
            amax = input_amax(model, tokens, [m for m in modules if ".experts." not in m])
            amax.update({m: a for m, a in expert_amax.items() if m in modules})
        else:
            state = model.state_dict()
            for k in state:
                if k in weights:
                    state[k] = weights[k]
            model.load_state_dict(state, strict=True)
            amax = input_amax(model, tokens, modules)
        for mod in modules:
            if quant == "modelopt_nvfp4":
                tensors[mod + ".input_scale"] = torch.tensor(amax[mod] / (FP4_MAX * FP8_MAX),
                                                             dtype=torch.float32)
            elif quant == "ct_nvfp4":
                tensors[mod + ".input_global_scale"] = torch.tensor([(FP4_MAX * FP8_MAX) / amax[mod]],
                                                                    dtype=torch.float32)
            else:
                tensors[mod + ".input_scale"] = torch.tensor(amax[mod] / FP8_MAX, dtype=torch.float32)
        # ModelOpt lists every linear it left unquantized (its default config disables *mlp.gate.*, the MoE
        # routers, and *mlp.shared_expert_gate.*).
        exclude = ["lm_head"] + sorted(k[:-len(".weight")] for k in weights
                                       if k.endswith((".mlp.gate.weight", ".mlp.shared_expert_gate.weight")))
        if quant == "modelopt_nvfp4":
            config["quantization_config"] = modelopt_nvfp4_quantization_config(exclude)
            write_json(os.path.join(model_dir, "hf_quant_config.json"), modelopt_hf_quant_config("NVFP4", exclude))
        elif quant == "ct_nvfp4":
            config["quantization_config"] = ct_nvfp4_quantization_config()
        else:
            write_json(os.path.join(model_dir, "hf_quant_config.json"), modelopt_hf_quant_config("FP8"))
        save_file(dequantized, os.path.join(folder, "dequantized.safetensors"), metadata={"format": "pt"})
    else:
        # The in-memory model must hold exactly what was stored.
        expected_state = model_state(model, weights) if moe else weights
        for k, v in model.state_dict().items():
            if k in expected_state and not torch.equal(v, expected_state[k]):
                raise RuntimeError(f"{k}: stored weight differs from the model's")
        if moe:
            _, routing_margin = moe_routing_stats(model, tokens, weights)

    write_json(os.path.join(model_dir, "config.json"), config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(model_dir, "model.safetensors"),
              metadata={"format": "pt"})

    logits = forward(model, tokens).to(torch.float32)
    logits64 = forward_f64(model, tokens, notes)
    gap = (logits.double() - logits64).abs().max().item()
    # transformers reading our config.json must compute the same thing as the model we built.
    reloaded = reload_logits(config, weights, tokens)
    reload_gap = (reloaded - logits).abs().max().item()
    if reload_gap > 1e-6:
        raise RuntimeError(f"transformers reading {name}/config.json gives logits {reload_gap:.3g} away")
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    meta = {"case": name, "fp64_gap": f"{gap:.9g}", "max_abs_logit": f"{logits.abs().max().item():.9g}",
            "min_top2_margin": f"{margin:.9g}", "reload_gap": f"{reload_gap:.9g}",
            "weights_seed": str(base["seed"]), "tokens_salt": str(salt),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "reference": "transformers float32 eager forward, one pass, no KV cache"}
    if routing_margin is not None:
        # A top-k choice this close to a tie could flip between two float32 implementations.
        meta["min_router_topk_margin"] = f"{routing_margin:.9g}"
        if routing_margin < 1e-4:
            raise RuntimeError(f"{name}: router top-k margin {routing_margin:.3g} is too small; change the seed")
    save_file({"tokens": torch.tensor(tokens, dtype=torch.int32), "logits": logits.contiguous()},
              os.path.join(folder, "expected.safetensors"), metadata=meta)
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    if routing_margin is not None:
        print(f"[{name}] min router top-k margin {routing_margin:.3g}")
    print(f"[{name}] n={n} fp64_gap={gap:.3g} max|logit|={logits.abs().max().item():.4g} "
          f"min_top2_margin={margin:.3g} reload_gap={reload_gap:.3g} bytes={size} files={files}")
    for note in notes:
        print(f"[{name}] note: {note}")
    print(f"[{name}] config.json: {json.dumps(config, sort_keys=True)}")
    return size


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", required=True, help="folder that receives one sub-folder per case")
    ap.add_argument("--tar", help="also pack the case folders into this .tar.gz (as fixtures/<case>/...)")
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    print(f"torch {torch.__version__} transformers {transformers.__version__} "
          f"python {sys.version.split()[0]}")
    names = args.only.split(",") if args.only else list(CASES)
    os.makedirs(args.out_dir, exist_ok=True)
    failed, total = [], 0
    for name in names:
        try:
            total += make_case(name, args.out_dir)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    print(f"total bytes {total}; failed: {failed or 'none'}")
    if args.tar:
        with tarfile.open(args.tar, "w:gz") as tar:
            for name in names:
                folder = os.path.join(args.out_dir, name)
                if name not in failed and os.path.isdir(folder):
                    tar.add(folder, arcname=f"fixtures/{name}")
        print(f"wrote {args.tar} ({os.path.getsize(args.tar)} bytes)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
