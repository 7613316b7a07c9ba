"""
The lab's tiny towers, each pretrained with its own family's objective, and the probe matrix that tells them apart.

The paper's four encoders differ because their objectives do: CLIP and SigLIP match images to captions (softmax
and sigmoid losses), DINOv2 matches augmented views of an image to each other (self-distillation, no text), and
the ConvNeXt is an open_clip CLIP model trained at a higher resolution. Random tiny towers carry the same
information as one another; these carry what their objective asked for, and what their resolution lets them see.
All train on the lab world (shapes.sample_lab_scene: up to 8 objects anywhere, each with a fine texture whose
period, 3 px at ConvNeXt's 96 px, is 1.5 px at the ViTs' 48, where the resize blurs it away), half of the scenes
close-ups of one object. The image-text towers see each scene beside its twin (lab_twin: one fact changed), so their
captions can only be matched by every fact the tower can see.

ConvNeXt, the one tower whose pixels hold the texture, needs three things more to learn it from captions, each a
departure from open_clip's recipe made because this tower is tiny (docs/log.md has the runs):
- its text tower stays at its random init. Trained jointly, neither tower gets a gradient towards the texture
  until the other already tells textures apart (a saddle: 3 600 steps at chance); held fixed, the four texture
  words keep four directions for the images to move to;
- its trunk is drawn at 1/sqrt(fan-in) with LayerScale 1 (fan_in_init);
- a curriculum (tower_phases): close-ups with texture twins first, where a texture spans a dozen periods (it
  leaves chance after about 1 300 steps), then the ViTs' mix, then crowded scenes with texture twins, which carry
  it to small objects.

    python towers.py                       # pretrain all four into weights/towers/<name>/
    python towers.py --tower=clip          # one of them
    python towers.py --probe=True          # held-out linear-probe accuracy, pretrained and random towers,
                                           # printed and written to weights/towers/probe.json
    python towers.py --probe_ckpt=out/shapes/ckpt   # the same probes of a trained MoCHA's tokens, each tower's
                                           # after its MoEC and after HGA: where facts are lost on the way

Measured on 2 cores (pretrain.json in each folder): on 2026-12-04, the ViTs one after another beside the first
ConvNeXt, 40-80 s to render the scenes and twins, then siglip 183 s, clip 158 s, dinov2 154 s; on 2026-12-05, idle,
convnext 1 238 s on 2 threads after 73 s rendering its three sets. The probe matrix: about 30 s. The shipped towers
and their matrix: docs/lab.md.

Each folder loads as a real checkpoint does: mocha.Encoders(names, 'pretrained', paths={name: folder}) (HF
save_pretrained folders of the vision model for siglip, clip, dinov2; an open_clip 'local-dir:' folder, the whole
CLIP model in float16, for convnext, of which Encoder keeps the trunk). The ViTs' text towers, projections and
heads are dropped.
"""
import copy
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import shapes
from mocha import CLIP_MEAN, CLIP_STD, ENCODER_ORDER, ENCODER_SPECS, Encoders, MoCHA, build_backbone

# -----------------------------------------------------------------------------
# default config (python towers.py --key=value overrides)
tower = 'all'                  # 'all' or one of siglip, convnext, clip, dinov2
probe = False                  # True: print the probe matrix instead of pretraining
probe_ckpt = ''                # a trained MoCHA checkpoint: the probe matrix of its tokens after the MoECs and HGA
out_dir = 'weights/towers'
seed = 0
image_px = 128                 # the lab world's renders; the ViTs see them at 48 px, ConvNeXt at 96
encoder_resolution = (48, 96, 48, 48)  # siglip, convnext, clip, dinov2: ConvNeXt's 96 px shows the textures the ViTs'
                               # 48 px blur, on the same 3 x 3 token grid (stride 32), as config/shapes.py reads them
num_scenes = 4000              # pretraining scenes per phase (phases with the same scenes share one render)
FACTS = ('color', 'shape', 'texture')
tower_phases = {  # each tower's pretraining, one phase after another: (steps, peak lr, closeup_fraction, facts a twin
                  # may change). Without gradient clipping ConvNeXt collapsed to loss log B near step 250 (lr 1e-3
                  # and 2e-3), and so did CLIP's ViT at 2e-3. DINOv2 reads the scenes and twins alike, as images.
    'siglip': ((1500, 1e-3, 0.5, FACTS),),
    'convnext': ((2000, 2e-3, 1.0, ('texture',)),  # close-ups, every twin a texture twin: the texture, where it is large
                 (1000, 1e-3, 0.5, FACTS),         # the ViTs' scenes and twins
                 (2000, 1e-3, 0.0, ('texture',))),  # crowded scenes, texture twins: small objects' texture
    'clip': ((1500, 1e-3, 0.5, FACTS),),
    'dinov2': ((1000, 1e-3, 0.5, FACTS),),
}
tower_batch_size = (64, 32, 64, 64)  # in ENCODER_ORDER: a ConvNeXt step at 96 px costs ~6x a ViT's
weight_decay = 0.05
max_grad_norm = 1.0            # the image-text towers' gradient clipping (open_clip's --grad-clip-norm); 0 = off
embed_dim = 64                 # the contrastive towers' joint image-text space (the ConvNeXt: open_clip's tiny 32)
dino_prototypes = 256          # K, the DINO head's output dimension
num_probe_scenes = 2000        # probe set: 3/4 train, 1/4 held out, its own scenes
threads = 0                    # torch threads; 0 = torch's default

CONTEXT_LENGTH = 56            # 8 objects x 6 words (size colour shape texture, 1-2 position words) + 7 commas + <eos>

# -----------------------------------------------------------------------------
# data: lab scenes as one uint8 tensor, their captions as word ids


def render_lab(seed, count, image_px, twins=False, closeup_fraction=0.0, twin_facts=FACTS):
    """count lab scenes, deterministic by seed: images uint8 [count, 3, S, S] and the scene dicts. closeup_fraction
    of them are close-ups (sample_closeup). twins=True also renders each scene's twin (lab_twin, changing one of
    twin_facts, on the same background): images [2, count, 3, S, S], scenes (originals, twins)."""
    rng = random.Random(seed)
    scenes = [sample_closeup(rng, image_px) if rng.random() < closeup_fraction else shapes.sample_lab_scene(rng, image_px)
              for _ in range(count)]
    backgrounds = [rng.randint(20, 60) for _ in scenes]
    twin_scenes = [lab_twin(s, rng, twin_facts) for s in scenes] if twins else []

    def draw(some):
        return np.stack([np.asarray(shapes.draw_lab_scene(s, image_px, background=b)) for s, b in zip(some, backgrounds)])
    images = torch.from_numpy(draw(scenes)).permute(0, 3, 1, 2).contiguous()
    if not twins:
        return images, scenes
    return torch.stack([images, torch.from_numpy(draw(twin_scenes)).permute(0, 3, 1, 2)]), (scenes, twin_scenes)


def sample_closeup(rng, image_px):
    """One large object, 0.2-0.35 of the image in radius, anywhere: a close-up, as web images often are, where a
    texture spans a dozen periods instead of two or three."""
    obj = shapes.sample_lab_scene(rng, image_px, max_objects=1)[0]
    radius = image_px * rng.uniform(0.2, 0.35)
    x, y = rng.uniform(radius, image_px - radius), rng.uniform(radius, image_px - radius)
    return [dict(obj, size='large', radius=radius, x=x, y=y,
                 row=min(int(3 * y / image_px), 2), col=min(int(3 * x / image_px), 2))]


def lab_twin(scene, rng, facts=FACTS):
    """The scene with one object's colour, shape or texture (one of `facts`) changed: a hard negative for the
    image-text losses (NegCLIP's idea). In a batch of unrelated scenes a caption is matched by its coarsest facts;
    next to its twin, only by the one changed fact, so each tower learns every fact it can see (the ViTs cannot see
    texture at 48 px, and their loss keeps those twins apart by chance)."""
    twin = [dict(o) for o in scene]
    obj = rng.choice(twin)
    factor = rng.choice(facts)
    values = {'color': list(shapes.COLORS), 'shape': shapes.SHAPES, 'texture': shapes.TEXTURES}[factor]
    obj[factor] = rng.choice([v for v in values if v != obj[factor]])
    return twin


def caption_vocab():
    """Every word a lab caption can hold, with <pad> = 0 and <eos> last: the highest id, where open_clip's text
    tower pools (argmax of the ids) and CLIPTextModel finds it by eos_token_id."""
    words = [*shapes.SIZES, *shapes.COLORS, *shapes.SHAPES, *shapes.TEXTURES, ',',
             *' '.join(p for row in shapes.POSITIONS for p in row).split()]
    return ['<pad>'] + sorted(set(words)) + ['<eos>']


def tower_caption(scene):
    """The towers' caption: shapes.lab_caption's facts without its filler words, which only lengthen the text tower's
    sequence (and its cost): 'large red circle dot top left , small blue square stripes center'."""
    return ' , '.join(f"{o['size']} {o['color']} {o['shape']} {o['texture']} {shapes.position(o)}"
                      for o in sorted(scene, key=lambda o: (o['row'], o['col'], o['x'])))


def render_pairs(seed, count, image_px, closeup_fraction, twin_facts, vocab):
    """(images uint8 [2, count, 3, S, S], caption ids [2, count, L]): count lab scenes and their twins."""
    images, (scenes, twin_scenes) = render_lab(seed, count, image_px, twins=True, closeup_fraction=closeup_fraction,
                                               twin_facts=twin_facts)
    return images, torch.stack([tokenize([tower_caption(s) for s in some], vocab) for some in (scenes, twin_scenes)])


def tokenize(captions, vocab, context_length=CONTEXT_LENGTH):
    """captions -> [N, context_length] word ids: the words, <eos>, then <pad>."""
    index = {w: i for i, w in enumerate(vocab)}
    tokens = torch.zeros(len(captions), context_length, dtype=torch.long)
    for i, text in enumerate(captions):
        ids = [index[w] for w in text.split()] + [len(vocab) - 1]
        assert len(ids) <= context_length, f"caption of {len(ids)} tokens > context_length {context_length}: {text!r}"
        tokens[i, :len(ids)] = torch.tensor(ids)
    return tokens


def tower_pixels(images, name, resolution):
    """uint8 [B, 3, S, S] -> the tower's input [B, 3, R, R], resized and normalised as mocha.Encoder.forward does."""
    spec = ENCODER_SPECS[name]
    pixels = images.float() / 255
    if pixels.shape[-1] != resolution:
        pixels = F.interpolate(pixels, size=(resolution, resolution), mode='bicubic', align_corners=False, antialias=True)
    return (pixels - torch.tensor(spec['mean']).view(1, 3, 1, 1)) / torch.tensor(spec['std']).view(1, 3, 1, 1)

# -----------------------------------------------------------------------------
# the objectives, on unit embeddings u (images) and v (texts), [B, D] each; pair i is the match


def clip_loss(u, v, log_scale):
    """CLIP's InfoNCE, both ways: logits_ij = exp(t) u_i . v_j, L = (CE(logits, i) + CE(logits^T, i)) / 2,
    the temperature exp(-t) learnt (t starts at log(1/0.07), capped at log 100 as in CLIP)."""
    logits = log_scale.clamp(max=math.log(100)).exp() * u @ v.T          # [B, B]
    labels = torch.arange(len(u))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(u, v, log_scale, bias):
    """SigLIP's pairwise sigmoid loss: every pair is its own binary question, z_ij = +1 on the diagonal, -1 off it,
    L = -(1/B) sum_ij log sigmoid(z_ij (exp(t') u_i . v_j + b)), t' and b learnt (start: log 10, -10)."""
    logits = log_scale.exp() * u @ v.T + bias                            # [B, B]
    signs = 2 * torch.eye(len(u)) - 1
    return -F.logsigmoid(signs * logits).sum() / len(u)


def sinkhorn_knopp(teacher_logits, teacher_temp=0.04, iterations=3):
    """DINOv2's centring of the teacher: the sharpened scores Q = exp(g_t / tau_t), [n, K], rescaled in turn so that
    each prototype gets 1/K of the batch and each sample a distribution summing to 1 (Sinkhorn-Knopp). A teacher
    whose outputs all agree then still gives the batch spread targets (DINO's running-mean centre let this tiny
    pair collapse to the uniform distribution within 100 steps)."""
    n, K = teacher_logits.shape
    Q = ((teacher_logits - teacher_logits.max()) / teacher_temp).exp()      # [n, K]
    Q = Q / Q.sum()
    for _ in range(iterations):
        Q = Q / (Q.sum(0, keepdim=True) * K)   # each prototype's column sums to 1/K
        Q = Q / (Q.sum(1, keepdim=True) * n)   # each sample's row sums to 1/n
    return Q * n                                                             # rows are distributions


def dino_loss(student_logits, teacher_probs, student_temp=0.1):
    """DINO's self-distillation: the teacher's centred, sharpened distribution p_t (sinkhorn_knopp) is the target
    of the student's log softmax(g_s / tau_s) on every other view, L = mean over pairs (t, s), s != t of
    -sum_k p_t[k] log p_s[k]. student_logits [V_s, B, K] (the first V_t views are the teacher's), teacher_probs
    [V_t, B, K]."""
    student_logp = (student_logits / student_temp).log_softmax(-1)           # [V_s, B, K]
    cross = -torch.einsum('tbk,sbk->tsb', teacher_probs, student_logp).mean(-1)  # [V_t, V_s]
    not_same_view = ~torch.eye(*cross.shape, dtype=torch.bool)
    return cross[not_same_view].mean()

# -----------------------------------------------------------------------------
# the towers to train


def convnext_config(vocab_size, resolution):
    """The tiny open_clip CLIP of ENCODER_SPECS, its trunk at `resolution` and a text tower for the lab captions."""
    tiny = ENCODER_SPECS['convnext']['tiny']
    return dict(tiny, vision_cfg=dict(tiny['vision_cfg'], image_size=resolution),
                text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=vocab_size, width=64, heads=4, layers=2))


def build_contrastive(name, vocab_size, resolution):
    """(model holding every trained parameter, encode_image(pixels) -> [B, D], encode_text(tokens) -> [B, D]).
    ConvNeXt: open_clip's own CLIP model, trunk + its head, and its text tower, as open_clip trains it.
    SigLIP / CLIP: the tiny HF vision model, its pooled output (SigLIP's attention-pool head, CLIP's CLS) through a
    linear projection, and a tiny CLIPTextModelWithProjection reading the same captions."""
    if name == 'convnext':
        import open_clip
        model = open_clip.CLIP(**convnext_config(vocab_size, resolution))
        fan_in_init(model.visual.trunk)
        model.lock_text_tower()  # its random init stays: the saddle of the module docstring
        return model, model.encode_image, model.encode_text
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    vision = build_backbone(name, 'tiny')
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CONTEXT_LENGTH, projection_dim=embed_dim, pad_token_id=0, bos_token_id=None,
        eos_token_id=vocab_size - 1))
    model = nn.ModuleDict(dict(vision=vision, image_projection=nn.Linear(vision.config.hidden_size, embed_dim), text=text))
    interpolate = resolution != vision.config.image_size  # the tiny configs say 64 px; 48 px interpolates, as Encoder does

    def encode_image(pixels):
        pooled = vision(pixel_values=pixels, interpolate_pos_encoding=interpolate).pooler_output  # [B, d]
        return model['image_projection'](pooled)

    return model, encode_image, lambda tokens: text(input_ids=tokens).text_embeds


@torch.no_grad()
def fan_in_init(trunk):
    """ConvNeXt's weights at N(0, 1/fan_in) and its LayerScale at 1, in place of timm's std 0.02 and 1e-6. At this
    tiny width timm's draw leaves every GELU nearly linear and every block nearly the identity, and a nearly linear
    trunk cannot tell the four textures apart: they share one mean colour (docs/log.md: the same trunk learns them
    from labels only once so drawn)."""
    for name, weight in trunk.named_parameters():
        if name.endswith('gamma'):
            weight.fill_(1.0)
        elif weight.ndim >= 2:
            weight.normal_(0, 1 / math.sqrt(weight[0].numel()))


def lr_at(step, total, lr):
    """Linear warm-up over the first 10 % of steps, then cosine to 0."""
    warmup = max(1, total // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_contrastive(name, images, tokens, vocab_size, resolution, steps, batch_size, lr, seed, model=None,
                         log_every=50):
    """CLIP, SigLIP or ConvNeXt on (image, caption) pairs: images uint8 [2, N, 3, S, S] and tokens [2, N, L], the
    scenes and their twins; each batch is B/2 scenes and their B/2 twins. model: the ConvNeXt CLIP of an earlier
    phase to go on from (fresh optimizer and schedule, its learnt temperature kept). Returns (the model whose vision
    tower is kept, losses, the share of twins told apart over the last 100 steps)."""
    torch.manual_seed(seed)
    flat = images.flatten(0, 1)
    pixels = torch.cat([tower_pixels(flat[i:i + 500], name, resolution) for i in range(0, len(flat), 500)])  # once
    pixels, tokens = pixels.view(*images.shape[:2], *pixels.shape[1:]), tokens.view(*images.shape[:2], -1)
    if model is None:
        model, encode_image, encode_text = build_contrastive(name, vocab_size, resolution)
        log_scale = nn.Parameter(torch.tensor(math.log(10.0) if name == 'siglip' else math.log(1 / 0.07)))
    else:
        assert name == 'convnext', f"only ConvNeXt's pretraining has phases, not {name}'s"
        encode_image, encode_text = model.encode_image, model.encode_text
        log_scale = nn.Parameter(model.logit_scale.detach().clone())
    bias = nn.Parameter(torch.tensor(-10.0))
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2] + [log_scale] + ([bias] if name == 'siglip' else [])
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                   {'params': no_decay, 'weight_decay': 0.0}], lr=lr)
    batches = torch.Generator().manual_seed(seed)
    model.train()
    losses, told_apart = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group['lr'] = lr_at(step, steps, lr)
        idx = torch.randint(images.shape[1], (batch_size // 2,), generator=batches)
        image_embeds = F.normalize(encode_image(pixels[:, idx].flatten(0, 1)), dim=-1)               # [B, D]
        text_embeds = F.normalize(encode_text(tokens[:, idx].flatten(0, 1)), dim=-1)                  # [B, D]
        loss = (siglip_loss(image_embeds, text_embeds, log_scale, bias) if name == 'siglip'
                else clip_loss(image_embeds, text_embeds, log_scale))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]['params'] + optimizer.param_groups[1]['params'],
                                           max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        with torch.no_grad():  # is each image nearer its own caption than its twin's? (rolling by B/2 swaps the pairs)
            own = (image_embeds * text_embeds).sum(-1)                                                  # [B]
            twins = (image_embeds * text_embeds.roll(batch_size // 2, 0)).sum(-1)                      # [B]
            told_apart.append((own > twins).float().mean().item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"{name} step {step}: loss {loss.item():.4f}, temperature {math.exp(-log_scale.item()):.4f}, "
                  f"twins told apart {sum(told_apart[-log_every:]) / len(told_apart[-log_every:]):.2f}", flush=True)
    if name == 'convnext':
        model.logit_scale.data.copy_(log_scale.detach())  # the saved CLIP model holds the temperature it learnt
    return model.eval(), losses, sum(told_apart[-100:]) / len(told_apart[-100:])


def dino_views(images, generator, count, out_px, scale):
    """`count` augmented views of each image, [count, B, 3, out_px, out_px], ImageNet-normalised: a random square
    crop of `scale` of the area (an affine grid per image, no loop), a horizontal flip half the time, and the colour
    taken away so the views agree only on geometry: grayscale half the time, else the RGB channels shuffled and
    scaled per image."""
    B = len(images)
    small = F.interpolate(images.float() / 255, size=(2 * out_px,) * 2, mode='bicubic', antialias=True).clamp(0, 1)
    views = []
    for _ in range(count):
        side = torch.empty(B).uniform_(*scale, generator=generator).sqrt()            # crop side / image side
        shift = (torch.rand(B, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]  # crop centre, in [-1, 1]
        flip = torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(B, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = side * flip, side, shift
        grid = F.affine_grid(theta, (B, 3, out_px, out_px), align_corners=False)
        view = F.grid_sample(small, grid, mode='bilinear', padding_mode='border', align_corners=False)  # [B, 3, o, o]
        channel_order = torch.rand(B, 3, generator=generator).argsort(dim=1)
        gains = torch.empty(B, 3, 1, 1).uniform_(0.6, 1.4, generator=generator)
        shuffled = (view.gather(1, channel_order[:, :, None, None].expand_as(view)) * gains).clamp(0, 1)
        gray = (view * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(view)
        view = torch.where(torch.rand(B, 1, 1, 1, generator=generator) < 0.5, gray, shuffled)
        views.append((view - torch.tensor(ENCODER_SPECS['dinov2']['mean']).view(1, 3, 1, 1))
                     / torch.tensor(ENCODER_SPECS['dinov2']['std']).view(1, 3, 1, 1))
    return torch.stack(views)


def koleo_loss(features):
    """DINOv2's KoLeo regulariser on the student's [B, d] features: L = -(1/B) sum_i log min_{j != i} ||x_i - x_j||,
    x = normalise(features). It spreads the batch over the sphere, so the views cannot all agree by being one point."""
    x = F.normalize(features, dim=-1)
    distances = torch.cdist(x, x) + torch.eye(len(x)) * 1e9                      # [B, B], self excluded
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


def dino_head(width, prototypes):
    """DINO's projection head: an MLP to a bottleneck, then (in dino_logits) cosine logits against K prototypes.
    With DINO's batch norms (its use_bn option): a random tiny ViT's CLS outputs differ little from image to image,
    and without them the Sinkhorn-Knopp targets started near uniform (entropy 5.48 of log K = 5.55) and stayed so."""
    return nn.ModuleDict(dict(mlp=nn.Sequential(nn.Linear(width, 256), nn.BatchNorm1d(256), nn.GELU(),
                                                nn.Linear(256, 256), nn.BatchNorm1d(256), nn.GELU(),
                                                nn.Linear(256, 64)),
                              prototypes=nn.Linear(64, prototypes, bias=False)))


def dino_logits(backbone, head, views):
    """views [V, B, 3, s, s] -> ([V, B, K], CLS [V, B, d]): the CLS output, the MLP, then g = normalise(h) .
    normalise(w_k) (the weight-normalised last layer of DINO, its norm fixed at 1)."""
    V, B = views.shape[:2]
    cls = backbone(pixel_values=views.flatten(0, 1)).pooler_output                # [V*B, d]
    bottleneck = F.normalize(head['mlp'](cls), dim=-1)                           # [V*B, 64]
    logits = bottleneck @ F.normalize(head['prototypes'].weight, dim=-1).T         # [V*B, K]
    return logits.view(V, B, -1), cls.view(V, B, -1)


def pretrain_dino(images, resolution, steps, batch_size, lr, seed, prototypes=256, koleo_weight=0.1, log_every=50):
    """DINOv2's self-distillation without text: a student on 2 global views (48 px from 35-100 % of the image) and
    4 local ones (32 px from 10-35 %), an EMA teacher on the global views; the teacher's output is centred
    (Sinkhorn-Knopp, as DINOv2) and sharpened (tau_t 0.04 < tau_s 0.1); DINOv2's KoLeo term (weight 0.1) spreads
    the student's CLS features. With DINO's running-mean centre and no batch norm in the head, this tiny pair
    collapsed to uniform targets within 100 steps (loss = log K); as here, its targets keep an entropy of about 5.0
    of log K = 5.55 over 600 steps (KoLeo made no visible difference in a 200-step try) and its loss falls 6.4 -> 5.3.
    Returns (the teacher backbone, the one kept, as DINO keeps it; losses)."""
    torch.manual_seed(seed)
    student = build_backbone('dinov2', 'tiny')
    student_head = dino_head(student.config.hidden_size, prototypes)
    teacher, teacher_head = copy.deepcopy(student).requires_grad_(False), copy.deepcopy(student_head).requires_grad_(False)
    params = list(student.parameters()) + list(student_head.parameters())
    optimizer = torch.optim.AdamW([{'params': [p for p in params if p.ndim >= 2], 'weight_decay': weight_decay},
                                   {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}], lr=lr)
    batches = torch.Generator().manual_seed(seed)
    local_px = resolution * 2 // 3  # 32 px: 2 x 2 patches of 16
    student.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group['lr'] = lr_at(step, steps, lr)
        batch = images[torch.randint(len(images), (batch_size,), generator=batches)]
        global_views = dino_views(batch, batches, 2, resolution, (0.35, 1.0))     # [2, B, 3, 48, 48]
        local_views = dino_views(batch, batches, 4, local_px, (0.1, 0.35))        # [4, B, 3, 32, 32]
        with torch.no_grad():
            teacher_logits = dino_logits(teacher, teacher_head, global_views)[0]  # [2, B, K]
            teacher_probs = sinkhorn_knopp(teacher_logits.flatten(0, 1)).view_as(teacher_logits)
        student_global, student_cls = dino_logits(student, student_head, global_views)  # [2, B, K], [2, B, d]
        student_logits = torch.cat([student_global, dino_logits(student, student_head, local_views)[0]])  # [6, B, K]
        loss = dino_loss(student_logits, teacher_probs) + koleo_weight * koleo_loss(student_cls[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            # teacher <- m teacher + (1 - m) student, m rising from 0.99 to 1 on a cosine (DINO's schedule)
            momentum = 1 - 0.01 * (1 + math.cos(math.pi * step / steps)) / 2
            for t, s in zip(list(teacher.parameters()) + list(teacher_head.parameters()), params):
                t.lerp_(s, 1 - momentum)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            entropy = -(teacher_probs * teacher_probs.clamp_min(1e-12).log()).sum(-1).mean()  # of each target
            print(f"dinov2 step {step}: loss {loss.item():.4f}, teacher entropy {entropy.item():.2f} "
                  f"(log K = {math.log(prototypes):.2f})", flush=True)
    return teacher.eval(), losses


def save_tower(name, model, folder, vocab_size, resolution, record):
    """HF towers: the vision model's save_pretrained folder. ConvNeXt: open_clip_config.json (model_cfg) +
    open_clip_model.safetensors, the whole CLIP model, which open_clip.create_model('local-dir:' + folder) loads.
    pretrain.json: how it was made (steps, seconds, first and last loss)."""
    os.makedirs(folder, exist_ok=True)
    if name == 'convnext':
        with open(os.path.join(folder, 'open_clip_config.json'), 'w') as f:
            json.dump({'model_cfg': convnext_config(vocab_size, resolution),
                       'preprocess_cfg': {'mean': list(CLIP_MEAN), 'std': list(CLIP_STD)}}, f, indent=1)
        # float16 on disk (7 MB instead of 14: the trunk is 3.4 M weights); loading casts back to float32
        save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in model.state_dict().items()}, os.path.join(folder, 'open_clip_model.safetensors'))
    else:
        vision = model['vision'] if name != 'dinov2' else model
        vision.save_pretrained(folder)
    with open(os.path.join(folder, 'pretrain.json'), 'w') as f:
        json.dump(record, f, indent=1)


def pretrain_tower(name, phases, vocab_size, resolution, batch_size, seed, folder=None):
    """One tower with its family's objective, phase after phase: phases [((steps, lr, closeup_fraction, twin_facts),
    images [2, N, 3, S, S], caption ids [2, N, L])], the scenes and their twins (DINOv2: one phase, images only).
    Saved to folder when given. Returns (model, the losses of every step, seconds)."""
    start = time.time()
    model, losses, record = None, [], []
    for (steps, lr, closeup_fraction, twin_facts), images, tokens in phases:
        if name == 'dinov2':
            assert len(phases) == 1, "DINOv2's pretraining is one phase"
            model, phase_losses = pretrain_dino(images.flatten(0, 1), resolution, steps, batch_size, lr, seed, dino_prototypes)
            told_apart = None
        else:
            model, phase_losses, told_apart = pretrain_contrastive(name, images, tokens, vocab_size, resolution, steps,
                                                                   batch_size, lr, seed, model)
        losses += phase_losses
        record.append(dict(steps=steps, learning_rate=lr, closeup_fraction=closeup_fraction, twin_facts=list(twin_facts),
                           first_loss=phase_losses[0], last_loss=phase_losses[-1], twins_told_apart=told_apart))
    seconds = time.time() - start
    if folder:
        save_tower(name, model, folder, vocab_size, resolution, dict(
            objective={'siglip': 'sigmoid image-text', 'clip': 'softmax image-text (InfoNCE)',
                       'convnext': 'softmax image-text (InfoNCE), text tower locked', 'dinov2': 'DINO self-distillation'}[name],
            resolution=resolution, steps=len(losses), batch_size=batch_size, seed=seed, seconds=round(seconds, 1),
            threads=torch.get_num_threads(), first_loss=losses[0], last_loss=losses[-1], phases=record))
    return model, losses, seconds

# -----------------------------------------------------------------------------
# the probe matrix: logistic regressions on frozen tokens, held-out accuracy per tower and factor

FACTORS = ('color', 'shape', 'size', 'texture', 'position', 'count', 'binding')


def object_labels(scenes, image_px):
    """One row per object: its scene's index, centre (x, y) in [0, 1), and its colour, shape, size, texture ids."""
    rows = [(i, o['x'] / image_px, o['y'] / image_px, list(shapes.COLORS).index(o['color']),
             shapes.SHAPES.index(o['shape']), shapes.SIZES.index(o['size']), shapes.TEXTURES.index(o['texture']))
            for i, scene in enumerate(scenes) for o in scene]
    columns = list(zip(*rows))
    return dict(scene=torch.tensor(columns[0]), x=torch.tensor(columns[1]), y=torch.tensor(columns[2]),
                color=torch.tensor(columns[3]), shape=torch.tensor(columns[4]), size=torch.tensor(columns[5]),
                texture=torch.tensor(columns[6]))


def binding_labels(scenes):
    """For each scene and each of the 24 (colour, shape) pairs: is there an object with both [N, 24], and does the
    scene hold the colour and the shape at all [N, 24]. Where it holds both, only binding tells the answer."""
    colors, num_shapes = list(shapes.COLORS), len(shapes.SHAPES)
    has_pair, has_both = torch.zeros(len(scenes), len(colors) * num_shapes), torch.zeros(len(scenes), len(colors) * num_shapes)
    for i, scene in enumerate(scenes):
        color_ids = {colors.index(o['color']) for o in scene}
        shape_ids = {shapes.SHAPES.index(o['shape']) for o in scene}
        for o in scene:
            has_pair[i, colors.index(o['color']) * num_shapes + shapes.SHAPES.index(o['shape'])] = 1
        for c in color_ids:
            for s in shape_ids:
                has_both[i, c * num_shapes + s] = 1
    return has_pair, has_both.bool()


@torch.no_grad()
def tower_tokens(encoders, images, batch_size=250):
    """Frozen tokens of every tower: {name: [N, T_g, d_g]}."""
    chunks = [encoders(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return {name: torch.cat([c[g] for c in chunks]) for g, name in enumerate(encoders.encoders)}


def fit_probe(train_x, train_y, test_x, test_y, weight_decay=1e-3, mask=None, test_mask=None):
    """A logistic regression on standardised features, full-batch L-BFGS; held-out accuracy in %.
    train_y [n] class ids (softmax), or [n, C] 0/1 targets (one sigmoid per column, scored where mask is set)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    multilabel = train_y.ndim == 2
    num_outputs = train_y.shape[1] if multilabel else int(max(train_y.max(), test_y.max())) + 1
    probe = nn.Linear(train_x.shape[1], num_outputs)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=200, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        logits = probe(train_x)
        if multilabel:
            loss = (F.binary_cross_entropy_with_logits(logits, train_y, reduction='none') * mask).sum() / mask.sum()
        else:
            loss = F.cross_entropy(logits, train_y)
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        logits = probe(test_x)
        if multilabel:
            return 100 * ((logits > 0).float() == test_y)[test_mask].float().mean().item()
        return 100 * (logits.argmax(-1) == test_y).float().mean().item()


def probe_tower(tokens, objects, has_pair, has_both, counts, num_train_scenes):
    """Held-out accuracy of one tower's tokens [N, T, d] on each factor.
    Object factors (colour, shape, size, texture, position) read the token whose patch holds the object's centre, for
    the objects whose patch holds no other object's centre (a shared token would answer for two; with every tower
    on a 3 x 3 grid these are the same objects for all). 'position' is finer than the grid: which
    quadrant of that patch holds the centre (the patch itself is known from the token's place in the sequence).
    Scene factors read the mean of the tokens: 'count' (1-8 objects) and 'binding', 24 yes/no questions "is
    there a <colour> <shape>?" scored only where the scene holds that colour and that shape on some objects."""
    N, T, _ = tokens.shape
    grid = math.isqrt(T)
    col = (objects['x'] * grid).long().clamp(max=grid - 1)
    row = (objects['y'] * grid).long().clamp(max=grid - 1)
    patch = objects['scene'] * T + row * grid + col                                             # [M] ids
    alone = torch.bincount(patch, minlength=N * T)[patch] == 1                                  # [M]
    object_tokens = tokens[objects['scene'], row * grid + col]                                   # [M, d]
    quadrant = 2 * ((objects['y'] * grid - row) >= 0.5).long() + ((objects['x'] * grid - col) >= 0.5).long()
    train_objects = alone & (objects['scene'] < num_train_scenes)
    test_objects = alone & (objects['scene'] >= num_train_scenes)
    labels = dict(color=objects['color'], shape=objects['shape'], size=objects['size'], texture=objects['texture'],
                  position=quadrant)
    accuracy = {f: fit_probe(object_tokens[train_objects], y[train_objects], object_tokens[test_objects], y[test_objects])
                for f, y in labels.items()}
    pooled = tokens.mean(1)                                                                      # [N, d]
    train, test = slice(0, num_train_scenes), slice(num_train_scenes, N)
    accuracy['count'] = fit_probe(pooled[train], counts[train] - 1, pooled[test], counts[test] - 1)
    accuracy['binding'] = fit_probe(pooled[train], has_pair[train], pooled[test], has_pair[test],
                                    mask=has_both[train].float(), test_mask=has_both[test])
    return accuracy


def chance_levels(objects, has_pair, has_both, counts, num_train_scenes):
    """The held-out accuracy of always answering the training set's most common label."""
    def majority(train_y, test_y):
        return 100 * (test_y == train_y.mode().values).float().mean().item()
    train_objects, test_objects = objects['scene'] < num_train_scenes, objects['scene'] >= num_train_scenes
    chance = {f: majority(objects[f][train_objects], objects[f][test_objects]) for f in ('color', 'shape', 'size', 'texture')}
    chance['position'] = 25.0
    chance['count'] = majority(counts[:num_train_scenes], counts[num_train_scenes:])
    pair_rate = has_pair[:num_train_scenes][has_both[:num_train_scenes]].mean().item()
    test_pairs = has_pair[num_train_scenes:][has_both[num_train_scenes:]]
    chance['binding'] = 100 * (test_pairs == float(pair_rate >= 0.5)).float().mean().item()
    return chance


def probe_matrix(paths, resolution, num_scenes, image_px, seed):
    """{row name: {factor: held-out %}} for the pretrained towers in `paths` ({name: folder}), the random tiny
    towers, and chance. The probe scenes come from their own seed, none seen in pretraining."""
    images, scenes = render_lab(seed + 1000, num_scenes, image_px)
    num_train = num_scenes * 3 // 4
    objects = object_labels(scenes, image_px)
    has_pair, has_both = binding_labels(scenes)
    counts = torch.tensor([len(s) for s in scenes])
    rows = {}
    for source in ('pretrained', 'tiny'):
        torch.manual_seed(seed)
        names = list(paths) if source == 'pretrained' else [n for n in ENCODER_ORDER if n in paths]
        encoders = Encoders(names, source, resolution, paths=paths if source == 'pretrained' else None)
        for name, tokens in tower_tokens(encoders, images).items():
            label = name if source == 'pretrained' else f'{name} (random)'
            rows[label] = probe_tower(tokens, objects, has_pair, has_both, counts, num_train)
    rows['chance'] = chance_levels(objects, has_pair, has_both, counts, num_train)
    return rows


@torch.no_grad()
def connector_tokens(model, images, batch_size=250):
    """A trained MoCHA's tokens of each tower at three places on their way to the LLM: {(name, place): [N, T_g, d]},
    place 'tower' (frozen, d_enc), 'MoEC' (its MoEC's output, d_llm) and 'HGA' (after HGA, Eqs. 7-9: the LLM's
    input), as MoCHA.encode_images computes them; and HGA's mean gate over each tower's tokens, {name: g} (Eq. 9:
    how much of a token its neighbours replace; {} with HGA off)."""
    if model.config.connector != 'moec' or model.config.fusion != 'sequence':
        raise ValueError(f"probe_ckpt: MoECs with sequence fusion only, not connector={model.config.connector!r}, "
                         f"fusion={model.config.fusion!r}")
    by_tower = tower_tokens(model.encoders, images, batch_size)                    # {name: [N, T_g, d_enc]}
    by_moec = {name: moec(by_tower[name])[0] for name, moec in model.moecs.items()}  # {name: [N, T_g, d_llm]}
    stats = {}
    by_hga = model.hga(torch.cat(list(by_moec.values()), 1), model.group_sizes, stats).split(model.group_sizes, 1)
    tokens = {(name, place): t for name, h in zip(by_tower, by_hga)
              for place, t in (('tower', by_tower[name]), ('MoEC', by_moec[name]), ('HGA', h))}
    if not model.hga.enabled:
        return tokens, {}
    return tokens, {name: g.mean().item() for name, g in zip(by_tower, stats['gate_per_token'].split(model.group_sizes, 1))}


def connector_matrix(model, num_scenes, image_px, seed):
    """The probe matrix of what a trained MoCHA passes on, {'<tower> <place>': {factor: held-out %}}: where a fact the
    tower reads is lost on the way, its MoEC or HGA dropped it (the same probe scenes as probe_matrix). Also, per
    tower, HGA's mean gate and the mean |x| of the MoEC's output, which the gate reads (Eq. 9)."""
    images, scenes = render_lab(seed + 1000, num_scenes, image_px)
    objects, (has_pair, has_both) = object_labels(scenes, image_px), binding_labels(scenes)
    counts = torch.tensor([len(s) for s in scenes])
    model.eval()
    tokens, gates = connector_tokens(model, images)
    scales = {name: t.abs().mean().item() for (name, place), t in tokens.items() if place == 'MoEC'}
    torch.manual_seed(seed)  # the probes' initial weights: identical tokens probed twice differ by up to ~0.4 points
    return {f'{name} {place}': probe_tower(t, objects, has_pair, has_both, counts, num_scenes * 3 // 4)
            for (name, place), t in tokens.items()}, gates, scales


def print_matrix(rows):
    print(f"{'tower':<20}" + ''.join(f'{f:>9}' for f in FACTORS))
    for label, accuracy in rows.items():
        print(f'{label:<20}' + ''.join(f'{accuracy[f]:9.1f}' for f in FACTORS))
    pretrained = {k: v for k, v in rows.items() if k in ENCODER_SPECS}
    if len(pretrained) > 1:
        best = {f: max(pretrained, key=lambda k: pretrained[k][f]) for f in FACTORS}
        spread = {f: max(v[f] for v in pretrained.values()) - min(v[f] for v in pretrained.values()) for f in FACTORS}
        print('best pretrained   ' + ''.join(f'{best[f]:>9}' for f in FACTORS))
        print('best - worst      ' + ''.join(f'{spread[f]:9.1f}' for f in FACTORS))
        print(f"block structure: no tower best everywhere: {len(set(best.values())) > 1}; "
              f"a factor with best - worst >= 20 points: {max(spread.values()) >= 20}")

# -----------------------------------------------------------------------------
# MoVA's oracle routing on the lab (ablate.py's mova_oracle): the towers that carry what a question asks about

QUESTION_FACTORS = {  # a question needs a factor when it holds one of these words: "What colour is the square on the
    'color': {*shapes.COLORS, 'color'},  # left?" needs the colour, the shape (to find it) and the position
    'shape': {*shapes.SHAPES, *(s + 's' for s in shapes.SHAPES), 'shape'},
    'size': {*shapes.SIZES, 'size'},
    'texture': {*shapes.TEXTURES, 'texture'},
    'position': {'where', 'left', 'right', 'top', 'bottom', 'center', 'side', 'corners'},
    'count': {*shapes.LAB_NUMBER_WORDS, 'many'},
}


def question_factors(question):
    """The probe matrix's factors a question names, in FACTORS order ('binding' has no word of its own)."""
    words = set(question.lower().replace('?', ' ').replace('.', ' ').split())
    return [factor for factor in FACTORS if words & QUESTION_FACTORS.get(factor, set())]


def oracle_experts(question, probe, experts):
    """The experts (a subset of `experts`, MoVA's experts in the adapter's order) an oracle routes `question` to:
    for each factor it names, the expert with the best held-out probe accuracy on that factor (probe: the pretrained
    rows of the probe matrix, {tower: {factor: %}}). MoVA asks its LLM for this choice; the base tower is always used,
    so it is not a candidate. A question that names no factor gets no expert."""
    chosen = {max(experts, key=lambda name: probe[name][factor]) for factor in question_factors(question)}
    return [name for name in experts if name in chosen]


def write_probe(rows, path):
    """The probe matrix as JSON ({row: {factor: %}}), written atomically: MoVA's oracle reads it."""
    with open(path + '.tmp', 'w') as f:
        json.dump(rows, f, indent=1)
    os.replace(path + '.tmp', path)

# -----------------------------------------------------------------------------

if __name__ == '__main__':
    exec(open('configurator.py').read())
    if threads:
        torch.set_num_threads(threads)
    resolution = dict(zip(ENCODER_ORDER, encoder_resolution))
    names = list(ENCODER_ORDER) if tower == 'all' else [tower]
    assert all(n in ENCODER_SPECS for n in names), f"--tower must be 'all' or one of {list(ENCODER_SPECS)}, got {tower!r}"
    if probe_ckpt:
        start = time.time()
        rows, gates, scales = connector_matrix(MoCHA.from_pretrained(probe_ckpt), num_probe_scenes, image_px, seed)
        print_matrix(rows)
        print("the MoECs' output, mean |x|: " + ', '.join(f'{name} {x:.2f}' for name, x in scales.items()))
        print("HGA's gate, the mean over each tower's tokens (Eq. 9: the share of a token its neighbours replace): "
              + (', '.join(f'{name} {g:.2f}' for name, g in gates.items()) or 'HGA off'))
        print(f"probe matrix of {probe_ckpt} in {time.time() - start:.0f} s ({torch.get_num_threads()} threads)")
    elif probe:
        paths = {n: os.path.join(out_dir, n) for n in names if os.path.isdir(os.path.join(out_dir, n))}
        assert paths, f"no towers in {out_dir}: run python towers.py first"
        start = time.time()
        rows = probe_matrix(paths, resolution, num_probe_scenes, image_px, seed)
        print_matrix(rows)
        write_probe(rows, os.path.join(out_dir, 'probe.json'))
        print(f"probe matrix in {time.time() - start:.0f} s ({torch.get_num_threads()} threads), "
              f"written to {os.path.join(out_dir, 'probe.json')}")
    else:
        vocab, renders = caption_vocab(), {}  # {(closeup_fraction, twin_facts): (images, tokens)}, shared by phases
        for name in names:
            phases = []
            for spec in tower_phases[name]:
                if spec[2:] not in renders:
                    start = time.time()
                    renders[spec[2:]] = render_pairs(seed, num_scenes, image_px, *spec[2:], vocab)
                    print(f"rendered {num_scenes} lab scenes and twins at {image_px} px (close-ups {spec[2]}, twins "
                          f"change {'/'.join(spec[3])}) in {time.time() - start:.0f} s")
                phases.append((spec, *renders[spec[2:]]))
            _, losses, seconds = pretrain_tower(name, phases, len(vocab), resolution[name],
                                                tower_batch_size[ENCODER_ORDER.index(name)], seed, os.path.join(out_dir, name))
            print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {seconds:.0f} s "
                  f"({torch.get_num_threads()} threads), saved to {os.path.join(out_dir, name)}", flush=True)
