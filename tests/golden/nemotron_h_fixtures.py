"""NemotronH golden fixtures (make_fixtures.py registers them in CASES): a tiny hybrid model whose pattern
"M-M*EM" has every layer kind (Mamba2, relu^2 MLP, attention without RoPE, MoE with a shared expert), and
its ModelOpt NVFP4 export.

Sizes: hidden 64, vocab 512, Mamba 4 heads x head_dim 16, state 16, 2 groups, conv kernel 4, chunk_size 16
(so transformers' chunked SSD runs over 3 chunks of the 40 tokens); attention 4 heads / 2 KV heads x 16;
MLP 128; 4 routed experts (top 2, n_group 2 / topk_group 1, routed_scaling_factor 2.5, sigmoid router with
a non-zero e_score_correction_bias) of 32, one shared expert of 48.

The reference is transformers' NemotronHForCausalLM on the CPU with use_mamba_kernels=False, i.e. the
torch_forward path (chunked SSD in torch), float32, no cache. That path clamps dt below at time_step_min
while the mamba_ssm kernels (and we) clamp to time_step_limit; dt_bias is drawn so that every dt of the
fixture is above time_step_min (checked), where both agree.

Checkpoints are written with the published naming (backbone.*, one tensor per expert:
backbone.layers.{i}.mixer.experts.{e}.up_proj.weight), which transformers' loader maps back; the reload
check proves it. The BF16 case keeps transformers 5's config.json spelling (layers_block_type list,
{"__float__": "Infinity"}); the NVFP4 case rewrites it to the published spelling (hybrid_override_pattern,
torch_dtype) and quantizes as ModelOpt exports Nemotron-H: Mamba in/out projections, MLP, routed and
shared experts in NVFP4; BF16 for the Mamba layer before the attention layer, attention, conv1d,
embeddings, lm_head; the router F32.
"""

import copy
import json
import os
import shutil
import tempfile
import types

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

PATTERN = "M-M*EM"
N_TOKENS = 40
SEED = 11


def nemotron_config():
    from transformers import NemotronHConfig
    return NemotronHConfig(
        vocab_size=512, hidden_size=64, hybrid_override_pattern=PATTERN, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
        use_conv_bias=True, mamba_hidden_act="silu", n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_shared_experts=1, n_group=2,
        topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, mlp_hidden_act="relu2",
        layer_norm_epsilon=1e-5, use_mamba_kernels=False, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, attn_implementation="eager")


def build_model():
    from transformers import NemotronHForCausalLM
    torch.manual_seed(SEED)
    config = nemotron_config()
    config.architectures = ["NemotronHForCausalLM"]
    model = NemotronHForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = p.shape
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif "embeddings" in name:
                v = 0.05 * torch.randn(shape, generator=gen)
            elif name.endswith("A_log"):
                v = torch.log(0.5 + 3.5 * torch.rand(shape, generator=gen))
            elif name.endswith(".D"):
                v = 0.5 + torch.rand(shape, generator=gen)
            elif name.endswith("dt_bias"):
                dt = 0.05 + 0.45 * torch.rand(shape, generator=gen)
                v = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
            elif name.endswith("conv1d.weight"):
                v = 0.3 * torch.randn(shape, generator=gen)
            elif name.endswith(".bias"):
                v = 0.05 * torch.randn(shape, generator=gen)
            elif name.endswith("gate.weight"):
                v = 0.3 * torch.randn(shape, generator=gen)  # decisive routing
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                v = 0.12 * torch.randn(shape, generator=gen)
            else:
                v = 0.08 * torch.randn(shape, generator=gen)
            p.copy_(v.to(torch.bfloat16).to(torch.float32))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))  # kept float32 (as checkpoints store it)
    return model


def published_name(name):
    return "backbone." + name[len("model."):] if name.startswith("model.") else name


def published_tensors(model, dtype=torch.bfloat16):
    """state_dict -> {published name: tensor}: backbone.* and one tensor per expert."""
    out = {}
    for k, v in model.state_dict().items():
        k = published_name(k)
        if k.endswith(("mixer.experts.up_proj", "mixer.experts.down_proj")):
            proj = k.rsplit(".", 1)[1]
            base = k[: -len("experts." + proj)]
            for e in range(v.shape[0]):
                out[f"{base}experts.{e}.{proj}.weight"] = v[e].to(dtype).contiguous()
        elif k.endswith("e_score_correction_bias"):
            out[k] = v.to(torch.float32).contiguous()
        else:
            out[k] = v.to(dtype).contiguous()
    return out


def forward(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens], dtype=torch.long), use_cache=False).logits[0]


def forward_f64(model, tokens):
    """float64 forward: RMSNorms, the gated norm, softmax and .float() casts kept in float64 (the router may
    still round its input to float32, which only makes the gap an underestimate there)."""
    m64 = copy.deepcopy(model)

    def rms64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gated64(self, x, gate=None):
        if gate is not None:
            x = x * F.silu(gate)
        *pre, last = x.shape
        g = x.view(*pre, last // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * g.view(*pre, last)

    def experts64(self, hidden_states, top_k_index, top_k_weights):
        # transformers' grouped_mm experts path refuses float64: the same sum, one token and expert at a time.
        out = torch.zeros_like(hidden_states)
        act = getattr(self, "act_fn", None) or (lambda v: F.relu(v) ** 2)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                h = act(F.linear(hidden_states[t], self.up_proj[e]))
                out[t] += F.linear(h, self.down_proj[e]) * top_k_weights[t, j].to(out.dtype)
        return out

    for mod in m64.modules():
        cls = type(mod).__name__
        if cls.endswith("Experts"):
            mod.forward = types.MethodType(experts64, mod)
        elif cls.endswith("RMSNormGated"):
            mod.forward = types.MethodType(gated64, mod)
        elif cls.endswith("RMSNorm"):
            mod.forward = types.MethodType(rms64, mod)
    m64.double()
    orig_float, orig_softmax = torch.Tensor.float, F.softmax

    def keep64(self, *a, **k):
        return self if self.dtype == torch.float64 else orig_float(self, *a, **k)

    def softmax64(input, dim=None, _stacklevel=3, dtype=None):
        return orig_softmax(input, dim=dim, _stacklevel=_stacklevel,
                            dtype=None if input.dtype == torch.float64 else dtype)

    torch.Tensor.float = keep64
    F.softmax = softmax64
    try:
        return forward(m64, tokens)
    finally:
        torch.Tensor.float = orig_float
        F.softmax = orig_softmax


def checks(model, tokens):
    """Smallest dt (must exceed time_step_min) and smallest routing margin (k-th vs (k+1)-th eligible choice
    score, and the kept vs dropped group score) over the fixture's sequence."""
    cfg = model.config
    out = {"min_dt": float("inf"), "min_route_margin": float("inf")}
    hooks = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith("Mamba2Mixer"):
            def hook(m, args, res, mixer=mod):
                dt = F.softplus(res[..., -mixer.num_heads:] + mixer.dt_bias)
                out["min_dt"] = min(out["min_dt"], dt.min().item())
            hooks.append(mod.in_proj.register_forward_hook(hook))
        elif cls.endswith("TopkRouter"):
            def rhook(m, args, res):
                # transformers 5.17's router (DeepseekV3TopkRouter) returns (logits, weights, indices).
                logits = res[0] if isinstance(res, tuple) else res
                try:
                    route_margin(m, logits)
                except Exception as e:  # a statistic only: never fail the fixture on it
                    out["route_margin_error"] = repr(e)

            def route_margin(m, logits):
                s = logits.float().view(-1, cfg.n_routed_experts).sigmoid() + m.e_score_correction_bias
                g = s.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
                gs = g.topk(2, dim=-1)[0].sum(-1).sort(dim=-1, descending=True)[0]
                if cfg.n_group > cfg.topk_group:
                    out["min_route_margin"] = min(out["min_route_margin"],
                                                  (gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group]).min().item())
                best = gs[:, : cfg.topk_group]
                keep = torch.zeros_like(s, dtype=torch.bool)
                gidx = g.topk(2, dim=-1)[0].sum(-1).topk(cfg.topk_group, dim=-1)[1]
                for t in range(s.shape[0]):
                    for gi in gidx[t].tolist():
                        per = cfg.n_routed_experts // cfg.n_group
                        keep[t, gi * per:(gi + 1) * per] = True
                masked = s.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=True)[0]
                k = cfg.num_experts_per_tok
                if masked.shape[1] > k and torch.isfinite(masked[:, k]).all():
                    out["min_route_margin"] = min(out["min_route_margin"],
                                                  (masked[:, k - 1] - masked[:, k]).min().item())
                del best
            hooks.append(mod.register_forward_hook(rhook))
    try:
        forward(model, tokens)
    finally:
        for h in hooks:
            h.remove()
    if not out["min_dt"] > cfg.time_step_min:
        raise RuntimeError(f"dt {out['min_dt']} reaches time_step_min {cfg.time_step_min}: torch path would clamp")
    return out


def reload_logits(config, tensors, tokens, notes):
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        plain = {k: v for k, v in config.items() if k != "quantization_config"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(plain, f)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                                     use_mamba_kernels=False)
        return forward(model.eval(), tokens)


def to_published_config(config):
    out = dict(config)
    kinds = out.pop("layers_block_type", None) or out.pop("layer_types", None)
    out.pop("layer_types", None)
    m = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-", "moe": "E"}
    out["hybrid_override_pattern"] = "".join(m[k] for k in kinds) if kinds else PATTERN
    out["num_hidden_layers"] = len(out["hybrid_override_pattern"])
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    return out


def quantized_modules(tensors, n_layers_before_attention):
    """Published module names ModelOpt quantizes: every 2-D linear weight except the excluded layers."""
    mods = []
    for k, v in tensors.items():
        if not k.endswith(".weight") or v.dim() != 2 or not k.startswith("backbone.layers."):
            continue
        mod = k[: -len(".weight")]
        layer = int(mod.split(".")[2])
        if layer in n_layers_before_attention or mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj", ".gate")):
            continue
        mods.append(mod)
    return sorted(mods)


def make_nemotron_case(name, out_dir, mk):
    """mk: the make_fixtures module (quantizer, json writer, token maker)."""
    quant = name.endswith("_nvfp4_modelopt")
    salt = SEED + (100 if quant else 0)
    tokens = mk.make_tokens(N_TOKENS, salt)
    model = build_model()
    folder = os.path.join(out_dir, name)
    model_dir = os.path.join(folder, "model")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(model_dir)
    notes = []

    with tempfile.TemporaryDirectory() as tmp:
        stored = build_model().to(torch.bfloat16)
        stored.config.dtype = torch.bfloat16
        stored.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
    tensors = published_tensors(model)
    weights32 = {k: v.to(torch.float32) for k, v in tensors.items()}  # what the reference computes with

    attn_layers = [i for i, ch in enumerate(PATTERN) if ch == "*"]
    before_attn = {i - 1 for i in attn_layers if i > 0 and PATTERN[i - 1] == "M"} | set(attn_layers)
    dequantized = {}
    if quant:
        config = to_published_config(config)
        mods = quantized_modules(tensors, before_attn)
        # Calibration amax of each module's input (hooks on the native modules; experts share their MoE input).
        amax = {}
        hooks = []
        for nname, mod in model.named_modules():
            pub = published_name(nname)
            if isinstance(mod, torch.nn.Linear) and pub in mods:
                def pre(m, args, pub=pub):
                    amax[pub] = max(amax.get(pub, 0.0), args[0].detach().abs().max().item())
                hooks.append(mod.register_forward_pre_hook(pre))
            elif type(mod).__name__.endswith("Experts"):
                def pre_e(m, args, pub=pub):
                    amax[pub] = max(amax.get(pub, 0.0), args[0].detach().abs().max().item())
                hooks.append(mod.register_forward_pre_hook(pre_e))
        forward(model, tokens)
        for h in hooks:
            h.remove()
        for mod in mods:
            w = weights32[mod + ".weight"]
            q, deq = mk.nvfp4_modelopt(w)
            del tensors[mod + ".weight"]
            for suffix, t in q.items():
                tensors[f"{mod}.{suffix}"] = t
            key = mod if mod in amax else mod.rsplit(".", 2)[0]  # experts.{e}.up_proj -> experts
            a = amax.get(mod, amax.get(key, 1.0))
            tensors[mod + ".input_scale"] = torch.tensor(a / (mk.FP4_MAX * mk.FP8_MAX), dtype=torch.float32)
            weights32[mod + ".weight"] = deq
            if mod in ("backbone.layers.0.mixer.in_proj", "backbone.layers.4.mixer.experts.1.up_proj"):
                dequantized[mod + ".weight"] = deq.contiguous()
        for k in list(tensors):
            if k.endswith("mixer.gate.weight"):
                tensors[k] = tensors[k].to(torch.float32)  # router F32, as the ModelOpt export keeps it
        # The float32 model computes with the dequantized weights.
        state = model.state_dict()
        for k in state:
            pub = published_name(k)
            if pub.endswith(("mixer.experts.up_proj", "mixer.experts.down_proj")):
                proj = pub.rsplit(".", 1)[1]
                base = pub[: -len("experts." + proj)]
                for e in range(state[k].shape[0]):
                    state[k][e] = weights32[f"{base}experts.{e}.{proj}.weight"]
            elif pub in weights32:
                state[k] = weights32[pub]
        model.load_state_dict(state, strict=True)
        excl = ["lm_head"] + [f"backbone.layers.{i}.mixer*" for i in sorted(before_attn)]
        q = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": mk.NVFP4_BLOCK,
             "exclude_modules": excl}
        mk.write_json(os.path.join(model_dir, "hf_quant_config.json"), {"producer": mk.MODELOPT_PRODUCER,
                                                                       "quantization": q})
        qc = mk.modelopt_nvfp4_quantization_config()
        qc["ignore"] = excl
        config["quantization_config"] = qc
        save_file(dequantized, os.path.join(folder, "dequantized.safetensors"), metadata={"format": "pt"})

    stats = checks(model, tokens)
    mk.write_json(os.path.join(model_dir, "config.json"), config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(model_dir, "model.safetensors"),
              metadata={"format": "pt"})

    logits = forward(model, tokens).to(torch.float32)
    try:
        logits64 = forward_f64(model, tokens)
        gap = (logits.double() - logits64).abs().max().item()
    except Exception as e:  # the golden test then falls back on its relative floor (1e-5 x max|logit|)
        notes.append(f"float64 forward failed ({e!r}): fp64_gap written as 0")
        gap = 0.0
    reloaded = reload_logits(config, weights32, tokens, notes)
    reload_gap = (reloaded - logits).abs().max().item()
    if reload_gap > 1e-6:
        raise RuntimeError(f"transformers reading {name} (published naming) gives logits {reload_gap:.3g} away")
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    meta = {"case": name, "fp64_gap": f"{gap:.9g}", "max_abs_logit": f"{logits.abs().max().item():.9g}",
            "min_top2_margin": f"{margin:.9g}", "reload_gap": f"{reload_gap:.9g}",
            "min_dt": f"{stats['min_dt']:.9g}", "min_route_margin": f"{stats['min_route_margin']:.9g}",
            "weights_seed": str(SEED), "tokens_salt": str(salt),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "reference": "transformers float32 forward (torch_forward Mamba path, eager attention), one pass, no cache"}
    save_file({"tokens": torch.tensor(tokens, dtype=torch.int32), "logits": logits.contiguous()},
              os.path.join(folder, "expected.safetensors"), metadata=meta)
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    print(f"[{name}] n={N_TOKENS} fp64_gap={gap:.3g} max|logit|={logits.abs().max().item():.4g} "
          f"min_top2_margin={margin:.3g} reload_gap={reload_gap:.3g} min_dt={stats['min_dt']:.4g} "
          f"min_route_margin={stats['min_route_margin']:.4g} bytes={size} files={files}")
    if "route_margin_error" in stats:
        notes.append(f"routing margin not computed: {stats['route_margin_error']}")
    for note in notes:
        print(f"[{name}] note: {note}")
    print(f"[{name}] config.json: {json.dumps(config, sort_keys=True)}")
    return size
