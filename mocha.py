"""
MoCHA in one file: four frozen vision encoders, one Mixture-of-Experts
Connector (MoEC) per encoder, Hierarchical Group Attention (HGA) over the
appended visual tokens, and a Hugging Face causal LM.

References:
1) the paper, "MoCHA: Advanced Vision-Language Reasoning with MoE Connector
   and Hierarchical Group Attention", arXiv 2507.22805 (equation numbers below);
2) the authors' released code (github.com/Pbhgit/MoCHA), where it disagrees with the paper
   (README, "Where we differ from the paper and the released code", says which one we follow and why);
3) LLaVA-1.5, whose connector, data format and image splice MoCHA reuses.

    image ─┬─ SigLIP   ─► MoEC ─┐
           ├─ ConvNeXt ─► MoEC ─┤ append (Eq. 6)   HGA (Eqs. 7-9)   splice at <image>
           ├─ CLIP     ─► MoEC ─┼──────────────► ─────────────► ─────────────────► LLM
           └─ DINOv2   ─► MoEC ─┘
"""
import hashlib
import json
import math
import os
from collections import OrderedDict, namedtuple
from contextlib import contextmanager
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import is_fake

IMAGE_TOKEN_ID = -200  # LLaVA's <image> placeholder inside input_ids: no real token can have it
IGNORE_INDEX = -100    # labels that the LM loss skips

# -----------------------------------------------------------------------------
# The four encoders as one table of facts (the paper's Table 9, the released encoders). Three ways to build each:
#   'pretrained': public weights by id, or a local dir/file holding them;
#   'random':     the full-size architecture with random weights, no network;
#   'tiny':       a small model of the same family (tests, the shapes world).

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

ENCODER_SPECS = {
    'siglip': dict(
        library='transformers', model_class='SiglipVisionModel', config_class='SiglipVisionConfig',
        pretrained='google/siglip-large-patch16-384', mean=SIGLIP_MEAN, std=SIGLIP_STD,
        num_prefix_tokens=0,  # SigLIP has no CLS token
        full=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=384, patch_size=16),
        tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=64, patch_size=16)),
    'convnext': dict(
        library='open_clip', arch='convnext_xxlarge',
        pretrained='laion2b_s34b_b82k_augreg_soup', mean=CLIP_MEAN, std=CLIP_STD,
        stride=32, channel_pool=3,  # 3072 channels avg-pooled in threes -> 1024
        full=None,  # open_clip ships the convnext_xxlarge config
        tiny=dict(embed_dim=32,  # an open_clip model config: timm's smallest ConvNeXt, 320 channels
                  vision_cfg=dict(timm_model_name='convnext_atto', timm_model_pretrained=False,
                                  timm_pool='', timm_proj='linear', image_size=64),
                  text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)),
        tiny_channel_pool=5),  # 320 -> 64 channels, the tiny ViTs' width
    'clip': dict(
        library='transformers', model_class='CLIPVisionModel', config_class='CLIPVisionConfig',
        pretrained='openai/clip-vit-large-patch14-336', mean=CLIP_MEAN, std=CLIP_STD,
        num_prefix_tokens=1,  # drop CLS
        full=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=64, patch_size=16)),
    'dinov2': dict(
        library='transformers', model_class='Dinov2Model', config_class='Dinov2Config',
        pretrained='facebook/dinov2-large', mean=IMAGENET_MEAN, std=IMAGENET_STD,
        num_prefix_tokens=1,  # drop CLS (dinov2-large has no register tokens)
        full=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                  image_size=518, patch_size=14),
        tiny=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                  image_size=64, patch_size=16)),
}
ENCODER_ORDER = ('siglip', 'convnext', 'clip', 'dinov2')  # the append order of Eq. 6

# The LLMs: public id -> architecture, so the full-size model is buildable offline.
LLM_SPECS = {
    'microsoft/phi-2': ('PhiConfig', dict(
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, partial_rotary_factor=0.4,
        bos_token_id=50256, eos_token_id=50256)),
    'lmsys/vicuna-7b-v1.5': ('LlamaConfig', dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)),
}
TINY_LLM = ('LlamaConfig', dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=1024, tie_word_embeddings=False))


@dataclass
class MoCHAConfig:
    encoders: tuple = ENCODER_ORDER        # any subset, appended in ENCODER_ORDER
    encoder_source: str = 'pretrained'     # 'pretrained' | 'random' | 'tiny'
    encoder_paths: dict = field(default_factory=dict)  # name -> HF id / local dir / open_clip tag or file
    encoder_resolution: dict = field(default_factory=lambda: {n: 336 for n in ENCODER_ORDER})
    feature_layer: int = -2                # penultimate layer of the ViTs (ConvNeXt: its last stage)
    image_size: int = 336                  # the one square resolution the data pipeline produces
    train_encoders: bool = False           # the shapes world's knob: its tiny encoders have no pretrained weights
    fusion: str = 'sequence'               # 'sequence' (Eq. 6) | 'channel' (the ablation)
    num_experts: int = 4                   # E; 1 expert + top_k 1 is LLaVA's MLP connector
    top_k: int = 2                         # k, Table 6
    hga: bool = True                       # off = identity (ablation)
    k_intra: int = 7                       # int(0.7 * 10), the released value
    k_inter: int = 3
    llm: str = 'microsoft/phi-2'           # HF id or local dir
    llm_source: str = 'pretrained'         # 'pretrained' | 'random' | 'tiny'
    tokenizer: str = None                  # HF id or dir; defaults to llm
    template: str = 'phi'                  # conversation template (data.py)
    balance_coef: float = 0.1              # Eq. 10
    z_coef: float = 0.01                   # Eq. 10
    # stage 2 on smaller cards: LoRA adapters (peft) on the LLM's linear layers instead of its full fine-tune;
    # 0 = off. LLaVA-1.5's finetune_lora.sh: r 128, alpha 256, dropout 0.05
    lora_rank: int = 0
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    # 'moec': MoCHA's connectors (MoECs, HGA); 'mova': MoVA's MoV-Adapter instead (mova.py), for the comparison:
    # the base encoder's tokens attend to the other encoders' (its experts); released defaults 3 blocks, top-3
    connector: str = 'moec'
    mova_base: str = 'clip'
    mova_blocks: int = 3
    mova_top_k: int = 3
    mova_pool: int = 2                     # the base grid pooled by this on each side: 576 CLIP tokens -> 144
    # smoke tests and bench only: > 0 cuts every randomly built tower to that many layers, widths and
    # token counts unchanged (ConvNeXt: that many blocks per stage); 0 = the real depth
    encoder_layers: int = 0
    llm_layers: int = 0

# -----------------------------------------------------------------------------
# Encoders (Eq. 1): F_g = E_g(I) for each encoder g


def build_backbone(name, source, path=None, num_layers=0):
    """One encoder's backbone, built the same way whatever the source. num_layers > 0 (smoke tests,
    bench; 'random'/'tiny' only) keeps every width and token count but only that many layers
    (ConvNeXt: that many blocks in each of its four stages)."""
    spec = ENCODER_SPECS[name]
    if num_layers and source == 'pretrained':
        raise ValueError(f"num_layers={num_layers} cuts randomly built towers only, not pretrained {name}")
    if spec['library'] == 'transformers':
        import transformers
        model_class = getattr(transformers, spec['model_class'])
        if source == 'pretrained':
            return model_class.from_pretrained(path or spec['pretrained'], dtype=torch.float32)  # as build_llm
        config_class = getattr(transformers, spec['config_class'])
        config_kwargs = spec['full' if source == 'random' else 'tiny']
        if num_layers:
            config_kwargs = dict(config_kwargs, num_hidden_layers=num_layers)
        return model_class(config_class(**config_kwargs))
    import open_clip
    if source == 'pretrained':
        path = path or spec['pretrained']
        if os.path.isdir(path):  # open_clip_config.json + weights
            return open_clip.create_model('local-dir:' + path).visual.trunk
        return open_clip.create_model(spec['arch'], pretrained=path).visual.trunk  # a tag or a checkpoint file
    model_cfg = open_clip.get_model_config(spec['arch']) if source == 'random' else spec['tiny']
    if num_layers:  # open_clip does not pass depths on to timm: build its trunk as it does, with timm's argument
        import timm
        return timm.create_model(model_cfg['vision_cfg']['timm_model_name'], depths=(num_layers,) * 4,
                                 num_classes=0, global_pool='')
    return open_clip.CLIP(**model_cfg).visual.trunk  # only the timm trunk is kept


def build_llm(name, source, vocab_size=None, num_layers=0):
    """num_layers > 0 ('random'/'tiny' only): the same widths and vocabulary, that many decoder layers."""
    import transformers
    if num_layers and source == 'pretrained':
        raise ValueError(f"num_layers={num_layers} cuts randomly built LLMs only, not pretrained {name}")
    if source == 'pretrained':
        # float32 master weights whatever the checkpoint holds: transformers 5 would otherwise load Phi-2 and
        # Vicuna in their stored float16, and AdamW would update float16 weights (bf16 is autocast's job)
        return transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    if source == 'random':
        if os.path.isdir(name):  # a local HF folder (the shapes world's LM): its architecture, random weights
            config = transformers.AutoConfig.from_pretrained(name)
            config.num_hidden_layers = num_layers or config.num_hidden_layers
            return transformers.AutoModelForCausalLM.from_config(config)
        if name not in LLM_SPECS:
            raise ValueError(f"no offline architecture for {name!r}; known: {list(LLM_SPECS)}")
        config_name, config_kwargs = LLM_SPECS[name]
    elif source == 'tiny':
        config_name, config_kwargs = TINY_LLM
        config_kwargs = dict(config_kwargs, vocab_size=vocab_size)
    else:
        raise ValueError(f"llm source must be 'pretrained', 'random' or 'tiny', got {source!r}")
    if num_layers:
        config_kwargs = dict(config_kwargs, num_hidden_layers=num_layers)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**config_kwargs))


def add_lora(llm, rank, alpha, dropout):
    """LLaVA's LoRA path (peft): every linear layer of the LLM but its output head computes W x + (alpha / r) B A x,
    B zero-initialised, so the LLM starts as it was. Injected in place: the module paths stay the LLM's (`q_proj`
    becomes a peft layer holding `base_layer`, `lora_A`, `lora_B`), and only the adapters require gradients."""
    from peft import LoraConfig, inject_adapter_in_model
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                              target_modules='all-linear'), llm)


class Encoder(nn.Module):
    """One vision encoder: own resize + normalisation, features of one layer, [B, N_g, d_enc] out."""

    def __init__(self, name, source, resolution, feature_layer=-2, path=None, num_layers=0):
        super().__init__()
        spec = ENCODER_SPECS[name]
        self.name, self.resolution, self.feature_layer = name, resolution, feature_layer
        self.backbone = build_backbone(name, source, path, num_layers)
        self.register_buffer('mean', torch.tensor(spec['mean']).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(spec['std']).view(1, 3, 1, 1), persistent=False)
        self.is_convnet = spec['library'] == 'open_clip'  # a feature map, not a ViT's token sequence
        if self.is_convnet:
            # by the trunk's width, not the source: a tiny tower loaded from a folder pools as a random tiny one
            pools = {3072: spec['channel_pool'], 320: spec['tiny_channel_pool']}
            if self.backbone.num_features not in pools:
                raise ValueError(f"{name}: a trunk of {self.backbone.num_features} channels; the channel pooling is "
                                 f"known for {sorted(pools)} (convnext_xxlarge, convnext_atto)")
            self.channel_pool = pools[self.backbone.num_features]
            self.num_tokens = (resolution // spec['stride']) ** 2
            self.dim = self.backbone.num_features // self.channel_pool
        else:
            config = self.backbone.config
            self.num_prefix_tokens = spec['num_prefix_tokens']
            self.num_tokens = (resolution // config.patch_size) ** 2
            self.dim = config.hidden_size
            # SigLIP/CLIP embed positions for their native size; other sizes need interpolation
            # (DINOv2 always interpolates and takes no such flag)
            self.interpolate = name != 'dinov2' and resolution != config.image_size

    def forward(self, images):  # images: [B, 3, S, S] float in [0, 1]
        pixels = F.interpolate(images, size=(self.resolution, self.resolution), mode='bicubic',
                               align_corners=False, antialias=True) if images.shape[-1] != self.resolution else images
        pixels = (pixels - self.mean) / self.std
        if self.is_convnet:  # its last stage (the released ConvNeXt encoder's select_layer = -1)
            feature_map = self.backbone.forward_features(pixels)                  # [B, C, h, w]
            tokens = feature_map.flatten(2).transpose(1, 2)                      # [B, h*w, C]
            return F.avg_pool1d(tokens, self.channel_pool, self.channel_pool)    # [B, h*w, C/pool]
        kwargs = {'interpolate_pos_encoding': True} if self.interpolate else {}
        outputs = self.backbone(pixel_values=pixels, output_hidden_states=True, **kwargs)
        return outputs.hidden_states[self.feature_layer][:, self.num_prefix_tokens:]  # [B, N_g, d_enc]


class Encoders(nn.Module):
    """Any subset of the four encoders, in ENCODER_ORDER. Frozen unless `trainable`."""

    def __init__(self, names, source='pretrained', resolution=None, feature_layer=-2, paths=None,
                 trainable=False, num_layers=0):
        super().__init__()
        unknown = [n for n in names if n not in ENCODER_SPECS]
        if unknown or not names:
            raise ValueError(f"unknown encoder(s) {unknown or names}; choose from {list(ENCODER_SPECS)}")
        if source not in ('pretrained', 'random', 'tiny'):
            raise ValueError(f"encoder source must be 'pretrained', 'random' or 'tiny', got {source!r}")
        resolution, paths = resolution or {}, paths or {}
        names = [n for n in ENCODER_ORDER if n in names]
        self.encoders = nn.ModuleDict({n: Encoder(n, source, resolution.get(n, 336), feature_layer,
                                                  paths.get(n), num_layers) for n in names})
        self.trainable = trainable
        self.requires_grad_(trainable)
        self.train(False)
        self.cached = {}  # name -> (row of each image digest, tokens [M, N_g, d_enc]): use_cached_tokens
        self.batches_cached = self.batches_computed = 0  # with a cache: the batches it served, and those it missed

    def train(self, mode=True):
        return super().train(mode and self.trainable)  # frozen encoders stay in eval mode

    @property
    def group_sizes(self):
        return [e.num_tokens for e in self.encoders.values()]

    @property
    def dims(self):
        return [e.dim for e in self.encoders.values()]

    def fingerprints(self):
        """Per encoder, a digest of what its tokens depend on besides the image: its weights, input size and
        feature layer. Tokens cached under a fingerprint are valid for that tower only."""
        prints = {}
        for name, encoder in self.encoders.items():
            digest = hashlib.sha1(f'{encoder.resolution} {encoder.feature_layer}'.encode())
            for key, value in sorted(encoder.state_dict().items()):
                digest.update(key.encode() + value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            prints[name] = digest.hexdigest()[:16]
        return prints

    def use_cached_tokens(self, cached):
        """cached: name -> (digests, tokens [M, N_g, d_enc]), the tokens of M images (image_digests) computed once
        for many runs (train.py's tower_tokens). A frozen tower gives an image the same tokens in every run, so
        a batch whose images are all cached skips the towers; any other batch runs them."""
        if self.trainable:
            raise ValueError("cached tower tokens need frozen encoders (train_encoders=False)")
        if set(cached) != set(self.encoders):
            raise ValueError(f"cached tokens of {sorted(cached)}, for encoders {sorted(self.encoders)}")
        self.cached = {name: ({d: row for row, d in enumerate(digests)}, tokens) for name, (digests, tokens) in cached.items()}

    def forward(self, images, skip=()):  # [B, 3, S, S] uint8, or float in [0, 1]
        """Each encoder's tokens [B, N_g, d_enc], in order; an encoder named in `skip` is not run and gives zeros
        (MoVA: an expert no image of the batch uses)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point() and images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        if self.cached and images.dtype == torch.uint8 and len(images):
            digests = image_digests(images)
            rows = {name: [self.cached[name][0].get(d, -1) for d in digests] for name in self.encoders}
            if all(-1 not in r for r in rows.values()):  # every image cached for every tower: no tower runs
                self.batches_cached += 1
                return [torch.zeros(len(images), e.num_tokens, e.dim, device=images.device) if name in skip
                        else self.cached[name][1][rows[name]].to(images.device) for name, e in self.encoders.items()]
            self.batches_computed += 1
        copy_of = None
        if len(images) > 1 and not torch.is_grad_enabled():
            # answering: a benchmark asks several questions of each image, so a batch in question order holds some
            # images more than once. Each distinct image goes through the towers once (the shapes benchmarks: 28 %
            # less time, the same answers) and its tokens are copied back to every question that holds it. (One
            # image has nothing to share; bench.py counts an answer's FLOPs on one fake image, which unique cannot
            # sort: its output's size depends on values that fake tensors do not have.)
            distinct, copy_of = torch.unique(images.flatten(1), dim=0, return_inverse=True)  # [B_distinct, 3HW], [B]
            images = distinct.view(-1, *images.shape[1:])                                 # [B_distinct, 3, H, W]
        if images.dtype == torch.uint8:
            images = images.float() / 255
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            tokens = [images.new_zeros(len(images), encoder.num_tokens, encoder.dim) if name in skip
                      else encoder(images) for name, encoder in self.encoders.items()]  # each [B_distinct, N_g, d_enc]
        return tokens if copy_of is None else [t[copy_of] for t in tokens]           # each [B, N_g, d_enc]

def image_digests(images):  # [B, 3, S, S] uint8 -> B hex digests, the keys of cached tower tokens
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images.cpu()]

# -----------------------------------------------------------------------------
# MoEC: mixture-of-experts connector (Eqs. 2-5), one per encoder


class MoEC(nn.Module):
    """Top-k routed experts, each the dense MLP block of Eq. 2 (LLaVA's mlp2x_gelu: Linear -> GELU ->
    Linear). State-dict layout as released (moec_builder.py, MLPMoE): gate.weight, experts.{i}.0.*, experts.{i}.2.*"""

    def __init__(self, d_in, d_out, num_experts=4, top_k=2):
        super().__init__()
        assert 1 <= top_k <= num_experts, f"top_k={top_k} must be in [1, num_experts={num_experts}]"
        self.top_k = top_k
        self.gate = nn.Linear(d_in, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out)) for _ in range(num_experts))

    def forward(self, x, stats=None):  # x: [B, N, d_in]; stats: None, or a dict to fill (below)
        B, N, _ = x.shape
        E, k = len(self.experts), self.top_k
        # Eq. 3: p = softmax(W_g x), in float32 so routing is the same under bf16 autocast
        router_logits = self.gate(x).float()                                  # [B, N, E]
        probs = router_logits.softmax(dim=-1)
        # Eq. 4: keep the k largest p per token and renormalise them to sum to 1
        top_probs, top_experts = probs.topk(k, dim=-1)                        # [B, N, k]
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        # Eq. 5: y = sum over the selected experts of p_hat_i * E_i(x). Each expert runs once,
        # on exactly the tokens routed to it (the loop is over E experts, not over images/tokens).
        tokens = x.reshape(B * N, -1)                                         # [T, d_in]
        flat_experts, flat_probs = top_experts.reshape(B * N, k), top_probs.reshape(B * N, k)
        y = None
        for e, expert in enumerate(self.experts):
            token_idx, slot = (flat_experts == e).nonzero(as_tuple=True)     # tokens routed to e
            expert_out = expert(tokens[token_idx]) * flat_probs[token_idx, slot, None]
            if y is None:
                y = expert_out.new_zeros(B * N, expert_out.shape[-1])
            y.index_add_(0, token_idx, expert_out.to(y.dtype))
        # the auxiliary losses of Eq. 10, as the released MLPMoE.forward (moec_builder.py) computes them:
        # load balance E^2 * mean_{b,e}(P_be * f_be), per image b, with P = mean routing probability and
        # f = fraction of tokens whose top-1 expert is e (the release counts only the first of the k choices)
        mean_prob = probs.mean(dim=1)                                          # [B, E]
        top1_fraction = F.one_hot(top_experts[..., 0], E).float().mean(dim=1)  # [B, E]
        balance_loss = E * E * (mean_prob * top1_fraction).mean()
        # router z-loss keeps the logits small: mean(logsumexp(logits)^2)
        z_loss = router_logits.logsumexp(dim=-1).pow(2).mean()
        if stats is not None:  # what train.py logs and eval.py draws: tensors, no graph, no host sync
            with torch.no_grad():
                stats.update(
                    # share of the B*N*k top-k assignments each expert got: [E], sums to 1
                    usage=torch.bincount(top_experts.flatten(), minlength=E).float() / top_experts.numel(),
                    # mean over tokens of the router softmax's entropy (log E = uniform, 0 = one expert)
                    entropy=-(probs * router_logits.log_softmax(dim=-1)).sum(-1).mean(),
                    balance_loss=balance_loss.detach(), z_loss=z_loss.detach(),
                    top1=top_experts[..., 0])                                  # [B, N]
        return y.view(B, N, -1), balance_loss, z_loss

    @torch.no_grad()
    def upcycle_from(self, mlp_state_dict):
        """Table 4: every expert starts as a copy of a trained MLP connector. Takes LLaVA's
        mm_projector layout ('0.weight', '2.bias', ...) or a 1-expert MoEC's ('experts.0.0.weight', ...)."""
        mlp = {k.removeprefix('experts.0.'): v for k, v in mlp_state_dict.items() if k != 'gate.weight'}
        if any(k.startswith('experts.') for k in mlp):
            raise ValueError("upcycling needs a connector with one expert (an MLP); this one has several")
        expected = {k: tuple(v.shape) for k, v in self.experts[0].state_dict().items()}
        given = {k: tuple(v.shape) for k, v in mlp.items()}
        if given != expected:  # another encoder's or another LLM's projector (Vicuna's 4096 wide into Phi-2's 2560)
            raise ValueError(f"the MLP's tensors {given} do not fit this connector's {expected} "
                             f"(encoder width -> LLM width)")
        for expert in self.experts:
            expert.load_state_dict(mlp)
        return self

# -----------------------------------------------------------------------------
# HGA: hierarchical group attention (Eqs. 7-9), parameter-free


Edges = namedtuple('Edges', 'similarity target kept')  # HGA's kept edges per token


class HGA(nn.Module):
    """Each token attends to its k_intra most similar tokens of its own encoder group and its
    k_inter most similar tokens of the other groups; a gate mixes the result back in.
    The whole batch at once: the released per-image, per-group loops (llava/model/hga.py) become masked
    top-k. The defaults are the released call's k=10 split with cross_weight=0.7: int(0.7 * 10) = 7 intra,
    3 inter. With channel fusion there is one group, so every edge is intra-group and none is inter."""

    def __init__(self, k_intra=7, k_inter=3, enabled=True):
        super().__init__()
        self.k_intra, self.k_inter, self.enabled = k_intra, k_inter, enabled

    def forward(self, x, group_sizes, stats=None):  # x: [B, N, D]; group_sizes sum to N; stats: a dict to fill
        B, N, D = x.shape
        if sum(group_sizes) != N:
            raise ValueError(f"group sizes {list(group_sizes)} sum to {sum(group_sizes)}, but x has {N} tokens")
        if not self.enabled:
            return x
        with torch.autocast(device_type=x.device.type, enabled=False):  # top-k and min-max want float32
            return self.attend(x.float(), group_sizes, stats).to(x.dtype)

    def attend(self, x, group_sizes, stats=None):
        B, N, D = x.shape
        sizes = torch.tensor(group_sizes, device=x.device)
        group_of = torch.repeat_interleave(torch.arange(len(group_sizes), device=x.device), sizes)  # [N]
        same_group = group_of[:, None] == group_of[None, :]                                        # [N, N]
        # s_ij = cos(x_i, x_j), no self-edges
        unit = F.normalize(x, dim=-1)
        sim = unit @ unit.transpose(1, 2)                                                          # [B, N, N]
        sim = sim.masked_fill(torch.eye(N, dtype=torch.bool, device=x.device), float('-inf'))
        # Eq. 7 (intra) and Eq. 8 (inter): per-token top-k, clamped to what exists for its group
        token_size = sizes[group_of]                                                               # [N]
        intra = self.top_edges(sim.masked_fill(~same_group, float('-inf')),
                               (token_size - 1).clamp(max=self.k_intra))
        inter = self.top_edges(sim.masked_fill(same_group, float('-inf')),
                               (N - token_size).clamp(max=self.k_inter))
        edge_sim = torch.cat([intra.similarity, inter.similarity], dim=-1)                         # [B, N, K]
        edge_dst = torch.cat([intra.target, inter.target], dim=-1)
        edge_kept = torch.cat([intra.kept, inter.kept], dim=-1)
        # min-max normalise all kept edges of an image together: w = (s - min) / (max - min + 1e-8).
        # As released, each image's weakest kept edge thus gets weight 0 and adds nothing.
        lowest = edge_sim.masked_fill(~edge_kept, float('inf')).amin(dim=(1, 2), keepdim=True)
        highest = edge_sim.masked_fill(~edge_kept, float('-inf')).amax(dim=(1, 2), keepdim=True)
        weights = torch.where(edge_kept, (edge_sim - lowest) / (highest - lowest + 1e-8), 0.0)
        # symmetric graph: edge i->j also adds j->i with the same weight (both count if both kept)
        adjacency = x.new_zeros(B, N, N).scatter_add(2, edge_dst, weights)  # [B, N, N]; unkept add 0
        adjacency = adjacency + adjacency.transpose(1, 2)
        # a_i = sum_j w_ij x_j / (sum_j w_ij + 1e-8)
        aggregated = adjacency @ x / (adjacency.sum(-1, keepdim=True) + 1e-8)                    # [B, N, D]
        # Eq. 9: g_i = sigmoid(10 (mean_d |x_i - a_i| - 0.2)), z_i = (1 - g_i) x_i + g_i a_i; the paper
        # gives no numbers, 10 and 0.2 are the released innovative_graph_propagation_v3's
        gate = torch.sigmoid(10 * ((x - aggregated).abs().mean(-1, keepdim=True) - 0.2))
        mixed = (1 - gate) * x + gate * aggregated
        if stats is not None:  # what train.py logs and eval.py draws: tensors, no graph, no host sync
            with torch.no_grad():
                k_intra = intra.similarity.shape[-1]
                mean_kept = lambda w, kept: (w * kept).sum() / kept.sum().clamp(min=1)
                stats.update(gate=gate.mean(), gate_per_token=gate[..., 0].detach(),         # [B, N]
                             intra_weight=mean_kept(weights[..., :k_intra], edge_kept[..., :k_intra]),
                             inter_weight=mean_kept(weights[..., k_intra:], edge_kept[..., k_intra:]),
                             inter_edge_weights=weights[..., k_intra:].detach(),              # [B, N, k_inter]
                             inter_edge_targets=edge_dst[..., k_intra:])                      # 0 where not kept
        return F.layer_norm(mixed, (D,), eps=1e-5)

    @staticmethod
    def top_edges(masked_sim, k_per_token):
        """Top-k similarities per token with a per-token k: Edges(similarity, target, kept), each
        [B, N, max(k)], kept masking the ranks past a token's own k."""
        k_max = max(int(k_per_token.max()), 1) if k_per_token.numel() else 1
        k_max = min(k_max, masked_sim.shape[-1])
        values, indices = masked_sim.topk(k_max, dim=-1)                                         # [B, N, k_max]
        kept = torch.arange(k_max, device=values.device) < k_per_token[:, None]                  # [N, k_max]
        kept = kept.expand_as(values)
        return Edges(values.masked_fill(~kept, 0.0), indices, kept)

# -----------------------------------------------------------------------------
# MoCHA: encoders -> MoECs -> append -> HGA -> splice into the LLM


def resize_to_grid(tokens, side):
    """[B, h*w, C] tokens of a square grid, bilinearly resized to side x side: [B, side*side, C]."""
    B, n, C = tokens.shape
    h = math.isqrt(n)
    grid = tokens.transpose(1, 2).reshape(B, C, h, h)
    if h != side:
        grid = F.interpolate(grid, size=(side, side), mode='bilinear', align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def resample_grid_and_concat(encoder_tokens, num_tokens):
    """Channel-concatenation ablation: each encoder's grid resized to a common square grid, the channels
    concatenated: [B, num_tokens, sum C]."""
    side = math.isqrt(num_tokens)
    return torch.cat([resize_to_grid(tokens, side) for tokens in encoder_tokens], dim=-1)


def check_vocab_extends(llm_vocab, vocab, tokenizer_name, llm_name):
    """A tokenizer may add words after the LLM's own, never move one: another id would look up the wrong
    embedding without an error (a shipped shapes LM against a changed shapes world, for one)."""
    moved = [word for word, i in llm_vocab.items() if vocab.get(word) != i]
    inserted = [word for word, i in vocab.items() if word not in llm_vocab and i < len(llm_vocab)]
    if moved or inserted:
        raise ValueError(f"tokenizer {tokenizer_name} does not keep the ids of the vocabulary the llm {llm_name} "
                         f"was trained with ({len(moved)} words moved, e.g. {moved[:3]}; {len(inserted)} inserted "
                         f"among them): use the llm's own tokenizer, one that only appends words, or retrain the llm "
                         f"on this one (the shapes world: python train.py config/shapes_lm.py)")


class MoCHA(nn.Module):
    """The whole model (the paper's Figure 1): Encoders -> one MoEC per encoder -> append along the sequence
    (Eq. 6) -> HGA (Eqs. 7-9) -> the visual tokens replace the <image> placeholder in the LLM's input
    embeddings. forward returns the Eq. 10 loss and its parts; generate answers greedily with HF's
    generate. Built from a MoCHAConfig; save_pretrained / from_pretrained keep only what cannot be
    rebuilt from the config (trained or randomly initialised parts, and the tokenizer).
    The image placeholder stays one token in the data and is expanded here (splice), as LLaVA does, so the
    data pipeline never needs the model's visual-token count (expanding it in the dataset, as nanoVLM
    does, would shorten splice to one masked assignment; not measured here)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tokenizer = None
        if config.tokenizer or config.llm_source == 'pretrained':
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.llm)
            llm_tokenizer = os.path.join(config.llm, 'tokenizer.json')  # a local LLM folder saved with its own
            if config.tokenizer and config.llm_source == 'pretrained' and os.path.isfile(llm_tokenizer):
                check_vocab_extends(AutoTokenizer.from_pretrained(config.llm).get_vocab(), self.tokenizer.get_vocab(),
                                    config.tokenizer, config.llm)
        if config.llm_source == 'tiny' and self.tokenizer is None:
            raise ValueError("a tiny LLM takes its vocabulary from a tokenizer: set config.tokenizer")
        self.llm = build_llm(config.llm, config.llm_source, self.tokenizer and len(self.tokenizer),
                             config.llm_layers)
        if self.tokenizer is not None and len(self.tokenizer) > self.llm.get_input_embeddings().num_embeddings:
            # words the LLM never saw (the lab world's), appended after its own: new rows drawn around the mean
            # of the old ones (HF's mean_resizing), in the input embedding and the LM head
            self.llm.resize_token_embeddings(len(self.tokenizer), mean_resizing=True)
        if config.lora_rank:
            add_lora(self.llm, config.lora_rank, config.lora_alpha, config.lora_dropout)
        self.encoders = Encoders(config.encoders, config.encoder_source, config.encoder_resolution,
                                 config.feature_layer, config.encoder_paths, config.train_encoders,
                                 config.encoder_layers)
        d_llm = self.llm.config.hidden_size
        if config.connector == 'mova':
            self.moecs, self.mova = nn.ModuleDict(), self.build_mova(d_llm)
        elif config.connector != 'moec':
            raise ValueError(f"connector must be 'moec' or 'mova', got {config.connector!r}")
        elif config.fusion == 'sequence':
            self.moecs = nn.ModuleDict({name: MoEC(dim, d_llm, config.num_experts, config.top_k)
                                        for name, dim in zip(self.encoders.encoders, self.encoders.dims)})
        elif config.fusion == 'channel':  # ablation: one connector over the concatenated channels
            self.moecs = nn.ModuleDict({'channel': MoEC(sum(self.encoders.dims), d_llm,
                                                        config.num_experts, config.top_k)})
        else:
            raise ValueError(f"fusion must be 'sequence' or 'channel', got {config.fusion!r}")
        self.hga = HGA(config.k_intra, config.k_inter, enabled=config.hga and config.connector == 'moec')

    def build_mova(self, d_llm):
        from mova import MoVAdapter
        if self.config.mova_base not in self.encoders.encoders or len(self.encoders.encoders) < 2:
            raise ValueError(f"connector='mova' needs its base encoder {self.config.mova_base!r} and at least one "
                             f"expert among the encoders, got {list(self.encoders.encoders)}")
        dims = dict(zip(self.encoders.encoders, self.encoders.dims))
        return MoVAdapter(dims.pop(self.config.mova_base), list(dims.values()), d_llm, d_llm, self.config.mova_blocks,
                          self.config.mova_top_k, self.config.mova_pool)

    @property
    def connectors(self):
        """The modules between the encoders and the LLM: the MoECs and HGA (parameter-free), or MoVA's adapter."""
        return [self.moecs, self.hga] + ([self.mova] if self.config.connector == 'mova' else [])

    @property
    def mova_experts(self):
        """MoVA: the experts, in its adapter's order (every encoder but the base); [] for MoCHA."""
        if self.config.connector != 'mova':
            return []
        return [name for name in self.encoders.encoders if name != self.config.mova_base]

    @property
    def group_sizes(self):
        if self.config.connector == 'mova':  # one group: the pooled base grid
            return [self.encoders.encoders[self.config.mova_base].num_tokens // self.config.mova_pool ** 2]
        if self.config.fusion == 'channel':
            return [self.encoders.group_sizes[0]]  # every grid resampled to the first encoder's
        return self.encoders.group_sizes

    @property
    def num_visual_tokens(self):
        return sum(self.group_sizes)

    def encode_images(self, images, stats=None, prompt_embeds=None, expert_mask=None):
        """[B, 3, S, S] -> visual embeddings [B, N_vis, d_llm], with the summed router losses.
        stats: None, or a dict that gets one dict per MoEC (by encoder name) and 'hga' (MoEC.forward, HGA.attend).
        connector='mova' only: prompt_embeds [B, d_llm], what its gate reads of the question (zeros if None), and
        expert_mask [B, E] bool, the experts the routing chose (None: every one)."""
        if self.config.connector == 'mova':
            # an expert that no image of the batch uses (none in the routing pass) is not run: the gate weighs its
            # zeros by exactly 0, so the output is the same, and a two-pass answer runs the experts once
            unused = [] if expert_mask is None else [n for n, used in zip(self.mova_experts, expert_mask.any(0))
                                                     if not used]
            tokens = dict(zip(self.encoders.encoders, self.encoders(images, skip=unused)))
            base = tokens.pop(self.config.mova_base)
            if prompt_embeds is None:
                prompt_embeds = base.new_zeros(len(images), self.llm.config.hidden_size)
            return self.mova(base, list(tokens.values()), prompt_embeds, expert_mask), 0.0, 0.0
        encoder_tokens = self.encoders(images)                              # Eq. 1: each [B, N_g, d_enc]
        if self.config.fusion == 'channel':
            encoder_tokens = [resample_grid_and_concat(encoder_tokens, self.group_sizes[0])]
        projected, balance_loss, z_loss = [], 0.0, 0.0
        for (name, moec), tokens in zip(self.moecs.items(), encoder_tokens):
            visual, balance, z = moec(tokens, None if stats is None else stats.setdefault(name, {}))  # Eqs. 2-5
            projected.append(visual)
            balance_loss, z_loss = balance_loss + balance, z_loss + z
        visual_tokens = torch.cat(projected, dim=1)                        # Eq. 6: [B, N_vis, d_llm]
        hga_stats = None if stats is None or not self.hga.enabled else stats.setdefault('hga', {})
        return self.hga(visual_tokens, self.group_sizes, hga_stats), balance_loss, z_loss  # Eqs. 7-9

    def splice(self, input_ids, attention_mask, labels, images, left_padded=False, stats=None, expert_mask=None):
        """Replace each sample's single <image> placeholder by its N_vis visual embeddings.
        Returns inputs_embeds [B, L', D], attention_mask [B, L'], labels [B, L'] (or None) and the
        router losses; L' = L + N_vis - 1 when the batch holds an image. Padding stays on its side:
        with left padding, text-only samples are shifted right by N_vis - 1 to line up their ends."""
        B, L = input_ids.shape
        is_placeholder = input_ids == IMAGE_TOKEN_ID
        placeholders_per_sample = is_placeholder.sum(dim=1)
        if (placeholders_per_sample > 1).any():
            bad = placeholders_per_sample.gt(1).nonzero().flatten().tolist()
            raise ValueError(f"samples {bad} of the batch hold more than one <image> placeholder")
        has_image = placeholders_per_sample == 1
        num_images = 0 if images is None else images.shape[0]
        if num_images != int(has_image.sum()):
            raise ValueError(f"{int(has_image.sum())} samples hold an <image> placeholder but {num_images} images were given")
        text_embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_placeholder, 0))  # [B, L, D]
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        if num_images == 0:
            return text_embeds, attention_mask, labels, 0.0, 0.0
        prompt_embeds = None
        if self.config.connector == 'mova':  # what MoVA's gate reads of the question: the prompt's mean embedding
            prompt = (attention_mask.bool() & ~is_placeholder & (labels == IGNORE_INDEX))[has_image]   # [n_img, L]
            prompt_embeds = ((text_embeds[has_image] * prompt[..., None]).sum(1)
                             / prompt.sum(1, keepdim=True).clamp(min=1))                                # [n_img, D]
        visual_embeds, balance_loss, z_loss = self.encode_images(images, stats, prompt_embeds, expert_mask)
        N = visual_embeds.shape[1]
        # one visual row block per sample (zeros for text-only ones), placed after the text: [B, L + N, D]
        per_sample_visual = text_embeds.new_zeros(B, N, text_embeds.shape[-1])
        per_sample_visual[has_image] = visual_embeds.to(text_embeds.dtype)
        all_embeds = torch.cat([text_embeds, per_sample_visual], dim=1)
        all_mask = torch.cat([attention_mask, has_image[:, None].expand(B, N).to(attention_mask.dtype)], dim=1)
        all_labels = torch.cat([labels, labels.new_full((B, N), IGNORE_INDEX)], dim=1)
        # for output position t: text before the placeholder at p, visual rows for p <= t < p + N,
        # then the text after the placeholder
        t = torch.arange(L + N - 1, device=input_ids.device)[None]         # [1, L']
        p = torch.where(has_image, is_placeholder.float().argmax(dim=1), L + N)[:, None]  # [B, 1]
        shift = (N - 1) * (left_padded & ~has_image).long()[:, None]       # text-only under left padding
        source = torch.where(t < p, t - shift, torch.where(t < p + N, L + t - p, t - N + 1))
        is_pad = (source < 0) | ((t >= p + N) & (source >= L))             # ran off the text: padding
        source = source.clamp(0, L + N - 1).masked_fill(is_pad, 0)
        inputs_embeds = all_embeds.gather(1, source[..., None].expand(-1, -1, all_embeds.shape[-1]))
        new_mask = all_mask.gather(1, source).masked_fill(is_pad, 0)
        new_labels = all_labels.gather(1, source).masked_fill(is_pad, IGNORE_INDEX)
        return inputs_embeds, new_mask, new_labels, balance_loss, z_loss

    def forward(self, input_ids, attention_mask, labels=None, images=None, num_target_tokens=None, with_stats=False,
                expert_mask=None):
        """Eq. 10 loss and its parts. The LM loss is a mean over this batch's learned tokens, or,
        given `num_target_tokens`, their sum over that count (train.py passes the global batch's
        mean per micro-batch, so every learned token weighs the same whatever the GPU or micro-step).
        with_stats: also out['stats'], the routing and HGA statistics of this batch's images (see
        encode_images; empty for a batch without images), computed without a graph. expert_mask: MoVA's routing."""
        stats = {} if with_stats else None
        inputs_embeds, attention_mask, labels, balance_loss, z_loss = self.splice(
            input_ids, attention_mask, labels, images, stats=stats, expert_mask=expert_mask)
        # (fake tensors, as train.py and bench.py count FLOPs on, hold no values to check)
        if not is_fake(attention_mask) and (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError("forward takes right-padded batches (data.collate's): a row has padding before a token")
        # right padding: causal attention alone keeps every real token from the padding after it, so the LLM
        # needs no padding mask, and its attention runs the causal kernel without one (the padding's own outputs
        # are never learned from)
        logits = self.llm(inputs_embeds=inputs_embeds).logits  # [B, L', V]
        # next-token cross-entropy over the learned positions (labels shifted by one)
        targets = labels[:, 1:].flatten()
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets,
                                  ignore_index=IGNORE_INDEX, reduction='sum')
        lm_loss = lm_loss / (num_target_tokens or (targets != IGNORE_INDEX).sum().clamp(min=1))
        # Eq. 10: L = L_lm + 0.1 sum_g L_balance + 0.01 sum_g L_z
        loss = lm_loss + self.config.balance_coef * balance_loss + self.config.z_coef * z_loss
        no_image = images is None or len(images) == 0
        if self.training and torch.is_grad_enabled() and no_image and any(  # is any of the image path trained?
                p.requires_grad for part in (*self.connectors, self.encoders) for p in part.parameters()):
            # no image: the connectors (and trained encoders) would be out of the graph. FSDP reduce-scatters
            # the gradients each process holds, so every process must hold the same ones (or the run dies on
            # a size mismatch): the image path runs on one blank image, weighted 0 (zero gradients, same loss)
            blank = torch.zeros(1, 3, self.config.image_size, self.config.image_size, device=logits.device)
            visual, balance, z = self.encode_images(blank)
            loss = loss + 0.0 * (visual.float().sum() + balance + z)
        as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32, device=logits.device)
        out = dict(loss=loss, lm_loss=lm_loss.detach(), balance_loss=as_tensor(balance_loss).detach(),
                   z_loss=as_tensor(z_loss).detach(), logits=logits)
        if with_stats:
            out['stats'] = stats
        return out

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, images=None, max_new_tokens=32, stats=None, expert_mask=None):
        """Greedy decoding from left-padded prompts; returns the new tokens [B, T_new].
        stats: None, or a dict that gets the images' routing and HGA statistics (encode_images)."""
        inputs_embeds, attention_mask, _, _, _ = self.splice(input_ids, attention_mask, None, images,
                                                             left_padded=True, stats=stats, expert_mask=expert_mask)
        tokenizer = self.tokenizer
        eos_id = tokenizer.eos_token_id if tokenizer else self.llm.config.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer and tokenizer.pad_token_id is not None else eos_id
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=eos_id, pad_token_id=pad_id)

    # -- what trains, and checkpoints: only what cannot be rebuilt from config (trained or randomly initialised parts)

    def set_trainable(self, stage, train_connectors=True, train_encoders=False):
        """Stage 1 trains the MoECs; stage 2 the MoECs and the LLM: all of it, or with LoRA only its adapters (the
        MoECs still train in full, as on LLaVA's LoRA path). train_connectors=False: the LLM alone (text)."""
        self.requires_grad_(False)
        for connector in self.connectors:
            connector.requires_grad_(train_connectors)
        self.encoders.requires_grad_(train_encoders)
        for name, param in self.llm.named_parameters():
            param.requires_grad_(stage == 2 and (not self.config.lora_rank or 'lora_' in name))

    def saved_parts(self):
        parts = {'moecs': self.moecs, **({'mova': self.mova} if self.config.connector == 'mova' else {})}
        if self.config.llm_source != 'pretrained' or any(p.requires_grad for p in self.llm.parameters()):
            parts['llm'] = self.llm
        if self.config.encoder_source != 'pretrained' or self.config.train_encoders:
            parts['encoders'] = self.encoders
        return parts

    def part_state_dict(self, prefix, module):
        """One part's tensors by name. A tensor shared by two names (the LM head of an LLM with tie_word_embeddings,
        which is its input embedding) is kept once, under its first name: safetensors refuses to write shared
        tensors, and loading the one name fills both. A pretrained LLM under LoRA: its adapters alone."""
        adapters_only = prefix == 'llm' and self.config.lora_rank and self.config.llm_source == 'pretrained'
        state, seen = {}, set()
        for k, v in module.state_dict().items():
            if (v.numel() and v.data_ptr() in seen) or (adapters_only and 'lora_' not in k):
                continue
            seen.add(v.data_ptr())
            state[f'{prefix}.{k}'] = v
        return state

    def trainable_state_dict(self):
        """What a checkpoint holds: the saved parts' tensors by name."""
        return {k: v for prefix, module in self.saved_parts().items()
                for k, v in self.part_state_dict(prefix, module).items()}

    def save_pretrained(self, out_dir, state_dict=None):
        """Writes config.json + model.safetensors, each via a temporary file and an atomic rename.
        `state_dict`: the full model state when this copy holds only a shard of it (FSDP)."""
        os.makedirs(out_dir, exist_ok=True)
        keep = self.trainable_state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or keep).items() if k in keep}
        save_file(state, os.path.join(out_dir, 'model.safetensors.tmp'))
        os.replace(os.path.join(out_dir, 'model.safetensors.tmp'), os.path.join(out_dir, 'model.safetensors'))
        with open(os.path.join(out_dir, 'config.json.tmp'), 'w') as f:
            json.dump(asdict(self.config), f, indent=2)
        os.replace(os.path.join(out_dir, 'config.json.tmp'), os.path.join(out_dir, 'config.json'))
        if self.tokenizer is not None:  # the tokenizer travels with the weights, as the template does (config)
            self.tokenizer.save_pretrained(os.path.join(out_dir, 'tokenizer'))
            if getattr(self.tokenizer, 'legacy', None) is not None:
                # transformers 5 leaves a Llama tokenizer's `legacy` out of the config it saves and rebuilds it
                # as non-legacy on loading: keep the setting, or the word after </s> tokenises differently
                tokenizer_config = os.path.join(out_dir, 'tokenizer', 'tokenizer_config.json')
                with open(tokenizer_config) as f:
                    saved = json.load(f)
                with open(tokenizer_config, 'w') as f:
                    json.dump(dict(saved, legacy=self.tokenizer.legacy), f, indent=2)

    @classmethod
    def from_pretrained(cls, ckpt_dir, **overrides):
        with open(os.path.join(ckpt_dir, 'config.json')) as f:
            config = MoCHAConfig(**dict(json.load(f), **overrides))
        config.encoders = tuple(config.encoders)
        if os.path.isdir(os.path.join(ckpt_dir, 'tokenizer')):
            config.tokenizer = os.path.join(ckpt_dir, 'tokenizer')
        model = cls(config)
        model.load_trainable(load_file(os.path.join(ckpt_dir, 'model.safetensors')), ckpt_dir)
        return model

    def load_trainable(self, state, source='state dict'):
        """A checkpoint's tensors into this model. It must hold the MoECs, whatever the config cannot rebuild (a
        'tiny' or 'random' part), and each part it holds whole: a stage-1 checkpoint of a pretrained LLM holds no LLM
        (it is reloaded by name; LoRA adapters added since start fresh), a stage-2 one all of it, a LoRA one its
        adapters."""
        unexpected = sorted(set(state) - set(self.state_dict()))
        parts = dict(moecs=self.moecs, llm=self.llm, encoders=self.encoders)
        if self.config.connector == 'mova':
            parts['mova'] = self.mova
        needed = dict(moecs=True, mova=True, llm=self.config.llm_source != 'pretrained',
                      encoders=self.config.encoder_source != 'pretrained' or self.config.train_encoders)
        held = {prefix for prefix in parts if any(k.startswith(prefix + '.') for k in state)}
        missing = sorted(k for prefix, module in parts.items() if needed[prefix] or prefix in held
                         for k in self.part_state_dict(prefix, module) if k not in state)
        if unexpected or missing:
            hint = (" (LoRA adapters: build the model with the checkpoint's lora_rank, or merge them first)"
                    if any('lora_' in k for k in unexpected + missing) else '')
            raise KeyError(f"{source}: keys not in this model {unexpected[:5]}, keys missing {missing[:5]}{hint}")
        self.load_state_dict(state, strict=False)

    def merge_lora(self):
        """Folds each LoRA adapter into its layer, W <- W + (alpha / r) B A (peft's merge), and drops the adapters:
        a plain MoCHA whose LLM is saved whole, which eval.py loads like any stage-2 checkpoint. Returns self."""
        from peft.tuners.lora import LoraLayer
        adapted = [(name, module) for name, module in self.llm.named_modules() if isinstance(module, LoraLayer)]
        for name, module in adapted:
            module.merge()
            self.llm.set_submodule(name, module.get_base_layer())
        self.config.lora_rank = 0
        self.llm.requires_grad_(True)  # no longer the pretrained weights: saved_parts keeps the LLM whole
        return self


# -----------------------------------------------------------------------------
# Looking inside a run: the one FLOP count (train.py's FLOP/s and MFU, bench.py's table) and expert collapse


def register_cpu_attention_flops():
    """FlopCounterMode knows the CUDA attention kernels; on CPU, SDPA runs its own flash kernel:
    count it with the same formulas (full L x L attention, causal or not, as for CUDA)."""
    from torch.utils import flop_counter
    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop)):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)  # formula: already takes shapes


@contextmanager
def fake_tensors(num_experts, device):
    """torch's FakeTensorMode, for counting or tracing a training step at full size without memory: tensors made
    inside have shapes and dtypes, no storage, and no arithmetic runs. What depends on values is settled as on a GPU:
    - integer tensors made inside from Python lists (token ids, masks) stay real constants, so the splice finds
      each <image> placeholder;
    - which tokens a MoEC expert gets depends on the router's values: each expert gets T*k/E (token, slot) pairs,
      perfect balance, the same FLOPs in all as any routing (MoEC.forward's nonzero)."""
    from unittest import mock
    from torch._subclasses import fake_tensor
    real_nonzero = torch.Tensor.nonzero

    def balanced_nonzero(mask, *args, **kwargs):
        try:
            return real_nonzero(mask, *args, **kwargs)
        except fake_tensor.DynamicOutputShapeException:
            if not kwargs.get('as_tuple') or mask.ndim != 2:
                raise
            tokens = torch.arange(mask.numel() // num_experts, device=mask.device) % mask.shape[0]
            return tokens, torch.zeros_like(tokens)
    with fake_tensor.FakeTensorMode(allow_non_fake_inputs=True), torch.device(device), \
            mock.patch.object(fake_tensor, 'CONSTANT_NUMEL_LIMIT', 2 ** 20), \
            mock.patch.object(torch.Tensor, 'nonzero', balanced_nonzero):
        yield


def fake_batch(batch):
    """MoCHA.forward's arguments made inside fake_tensors: integer tensors as constants, images by shape only."""
    def fake(value):
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point() or value.dtype == torch.uint8:  # images: only their shape matters
            return torch.empty(value.shape, dtype=value.dtype)
        return torch.tensor(value.tolist(), dtype=value.dtype)
    return {name: fake(value) for name, value in batch.items()}


def count_flops(model, batch, backward=True):
    """FLOPs of one training forward + backward of `batch` (MoCHA.forward's arguments by name) through `model`
    (a MoCHA, not wrapped by DDP/FSDP), counted by torch's FlopCounterMode (matmuls, convolutions, attention)
    on fake tensors: the same modules run on stand-ins of their weights that have shapes but no storage, so the
    count holds no activations and leaves `model`'s weights and gradients alone. (Counting a real step would
    not: FlopCounterMode's module tracker hooks the outputs of every module that gradient checkpointing
    recomputes during backward; each hook holds the recomputed graph, which holds the hook, a cycle through
    autograd's C++ nodes that Python's garbage collector cannot see, so every recomputed layer's activations
    live until the counter exits: 14.6 GiB more at the traced peak of Phi-2 stage 2.)
    Run it under the step's autocast. Returns 'hardware' (all that ran: with gradient checkpointing, the decoder
    layers' forward twice), 'model' (each once: what MFU counts) and 'by_module' ({module name: {op: FLOPs}}).
    backward=False: the forward alone, in eval mode (a prompt's prefill, say)."""
    import copy
    from torch.utils.checkpoint import set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode
    register_cpu_attention_flops()
    checkpointed = any(getattr(module, 'gradient_checkpointing', False) for module in model.llm.modules())  # HF's flag
    device = next(model.parameters()).device
    device = torch.device('cpu') if device.type == 'meta' else device  # a model built on the meta device: shapes only
    counter = FlopCounterMode(display=False)
    with fake_tensors(model.config.num_experts, device):
        # a copy of the model with fake stand-ins for its tensors: deepcopy takes what its memo holds instead of
        # copying it, so no weight is copied, and tied weights stay tied (the tokenizer is not needed)
        memo = {id(model.tokenizer): None, id(model.encoders.cached): {}}  # cached tokens: the towers' FLOPs count
        for t in [*model.parameters(), *model.buffers()]:
            stand_in = torch.empty(t.shape, dtype=t.dtype)
            memo[id(t)] = nn.Parameter(stand_in, t.requires_grad) if isinstance(t, nn.Parameter) else stand_in
        stand_in_model = copy.deepcopy(model, memo).train(backward)
        inputs = dict(fake_batch(batch), with_stats=False)  # statistics are not the step's FLOPs
        # the recompute reruns each checkpointed layer's whole forward (torch otherwise stops it as soon as the
        # saved tensors are back), so that it is exactly the layers' forward FLOPs, counted before the backward
        with set_checkpoint_early_stop(False), counter, torch.set_grad_enabled(backward):
            loss = stand_in_model(**inputs)['loss']
            recompute = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                            if checkpointed and backward and re.search(r'\.llm\.model\.layers\.\d+$', name))
            if backward:
                loss.backward()
    hardware = counter.get_total_flops()
    return dict(hardware=hardware, model=hardware - recompute, by_module=counter.get_flop_counts())


def lean_memory_tracker(tracker, model):
    """Readies torch's MemTracker or FSDPMemTracker `tracker` for a MoCHA: it would hook every parameter's gradient
    and fails on the frozen ones, so those are marked as hooked already; and it keeps only the global peak
    (MemTracker also updates every module's own peak after each op: minutes at full size)."""
    def global_peak(peak_state):
        for dev, snap in tracker._curr_mem_snap.items():
            if tracker._peak_mem.get(dev, 0) < snap['Total']:
                tracker._peak_mem[dev], tracker._peak_mem_snap[dev] = snap['Total'], dict(snap)
    tracker._update_peak_stats = global_peak
    no_hook = torch.utils.hooks.RemovableHandle(OrderedDict())
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (no_hook, no_hook)
    return tracker


def collapsed_experts(usage, collapse_fraction):
    """The experts of one MoEC whose mean share of the top-k assignments over a window of log steps
    (usage: [steps, E], each row MoEC.forward's stats['usage']) is below collapse_fraction of the fair share 1/E."""
    mean_usage = torch.stack([torch.as_tensor(row, dtype=torch.float32) for row in usage]).mean(dim=0)  # [E]
    return (mean_usage < collapse_fraction / mean_usage.numel()).nonzero().flatten().tolist()
