"""
The released MoCHA algorithms, re-typed plainly: per image, per group, per expert, as the
authors' code loops. mocha.py computes the same thing batched; test_mocha.py checks it matches
these, and bench.py times it against them. Only torch is needed (the released code also uses
torch_scatter and einops; index_add does the same sums here).
"""
import torch
import torch.nn.functional as F


def released_hga(x, group_sizes, k_intra=7, k_inter=3):
    """HGA (Eqs. 7-9) per image, per group, with edge lists and scatter-adds.
    Re-types the released llava/model/hga.py: `build_innovative_graph_v3` (cosine similarities
    scaled by an adaptive temperature, per group the top int(0.7 * 10) = 7 intra-group and 3
    inter-group neighbours, clamped to what exists, one min-max over all of an image's edges,
    every edge added both ways) and `innovative_graph_propagation_v3` (weighted neighbour mean,
    the gate sigmoid(10 (mean |x - a| - 0.2)), LayerNorm). The released caller,
    `prepare_inputs_labels_for_multimodal_interleaved_withsiglipdinoconvnext` in
    llava/model/moec_llava_arch.py, runs both once per image on the appended tokens.
    x: [B, N, D] -> [B, N, D]."""
    outputs = []
    for image_tokens in x:                                                   # [N, D]
        N = image_tokens.shape[0]
        unit = F.normalize(image_tokens, dim=-1)
        temperature = torch.exp(1 / image_tokens.norm(dim=-1).mean())     # cancels in the min-max below
        sim = unit @ unit.T * temperature
        sim = sim.masked_fill(torch.eye(N, dtype=torch.bool), float('-inf'))
        src, dst, vals = [], [], []
        start = 0
        for size in group_sizes:
            own = torch.arange(start, start + size)
            other = torch.cat([torch.arange(0, start), torch.arange(start + size, N)])
            for columns, k in ((own, min(k_intra, size - 1)), (other, min(k_inter, N - size))):
                if k <= 0:
                    continue
                v, i = sim[own][:, columns].topk(k, dim=-1)
                src.append(own[:, None].expand(-1, k).reshape(-1))
                dst.append(columns[i].reshape(-1))
                vals.append(v.reshape(-1))
            start += size
        aggregated = torch.zeros_like(image_tokens)
        if vals:
            vals, src, dst = torch.cat(vals), torch.cat(src), torch.cat(dst)
            w = (vals - vals.min()) / (vals.max() - vals.min() + 1e-8)
            src, dst, w = torch.cat([src, dst]), torch.cat([dst, src]), torch.cat([w, w])
            weighted = torch.zeros_like(image_tokens).index_add(0, src, w[:, None] * image_tokens[dst])
            weight_sum = torch.zeros(N).index_add(0, src, w)
            aggregated = weighted / (weight_sum[:, None] + 1e-8)
        gate = torch.sigmoid(10 * ((image_tokens - aggregated).abs().mean(-1, keepdim=True) - 0.2))
        mixed = (1 - gate) * image_tokens + gate * aggregated
        outputs.append(F.layer_norm(mixed, mixed.shape[-1:], eps=1e-5))
    return torch.stack(outputs)


def released_moec(moec, x):
    """The MoEC output (Eqs. 2-5) per image, per expert, with `moec`'s own weights.
    Re-types the expert loop of `MLPMoE.forward` in the released
    llava/model/multimodal_projector/moec_builder.py: softmax over the router logits in float32,
    top-k, renormalise, then for every image and every expert run the expert on the tokens that
    chose it and add its weighted output in place. (The losses of that function are checked
    against their formulas in test_mocha.py.) x: [B, N, d_in] -> [B, N, d_out]."""
    outputs = []
    for image_tokens in x:                                                   # [N, d_in]
        probs = moec.gate(image_tokens).float().softmax(-1)
        top_p, top_e = probs.topk(moec.top_k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        out = 0
        for e, expert in enumerate(moec.experts):
            weight = (top_p * (top_e == e)).sum(-1, keepdim=True)           # 0 where e not selected
            routed = weight[:, 0] > 0
            out = out + torch.zeros(image_tokens.shape[0], expert[2].out_features).index_put(
                (routed.nonzero()[:, 0],), expert(image_tokens[routed]) * weight[routed])
        outputs.append(out)
    return torch.stack(outputs)


def tokenwise_moec(moec, x):
    """Eqs. 2-5 of the paper token by token, with no released counterpart: y = sum over the
    top-k experts of p_hat_i E_i(x), every expert run densely on every token, then gathered.
    x: [B, N, d_in] -> [B, N, d_out]."""
    probs = moec.gate(x).float().softmax(-1)                                # [B, N, E]
    all_outputs = torch.stack([expert(x) for expert in moec.experts], dim=-2)  # [B, N, E, d_out]
    top_p, top_e = probs.topk(moec.top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    chosen = all_outputs.gather(2, top_e[..., None].expand(-1, -1, -1, all_outputs.shape[-1]))
    return (chosen * top_p[..., None]).sum(2)
