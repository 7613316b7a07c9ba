"""
MoVA beside MoCHA: the other way to fuse many vision experts, coarse to fine.

References:
1) the paper, "MoVA: Adapting Mixture of Vision Experts to Diverse Multimodal Context", arXiv 2404.13046;
2) its released code (github.com/TempleX98/MoVA): the MoV-Adapter in
   mova/model/multimodal_projector/builder.py (MoVAdapter, AdapterBlock), the routing prompt in mova/constants.py
   and its two passes in mova/eval/model_vqa_loader.py.

Where MoCHA sends every encoder through its own sparse connector and fuses all the tokens with HGA, MoVA keeps
one base encoder's tokens (CLIP) as the queries and lets the other encoders, the experts, add to them:

    image ─┬─ CLIP (base) ─────────────► MoV-Adapter blocks ─► (x + base) / 2 ─► pool ─► MLP ─► LLM
           ├─ SigLIP   ─┐                 ▲ gate(question, image) over the experts
           ├─ ConvNeXt ─┼─ resized to ───┘ cross-attention to each expert
           └─ DINOv2   ─┘  the base grid

Coarse routing, the LLM picking the experts that suit the question before it answers, is MoVA's other half. Here
the adapter takes the choice as `expert_mask` ([B, E], True = use); with every expert on it is the `mova` model.
The LLM learns to route from routing conversations, which this file writes from a trained MoVA checkpoint by the
paper's rule, an expert is right for a sample when it lowers the loss of the sample's answer:

    python mova.py --ckpt_dir=out/mova-phi2-stage2/ckpt --data_json=playground/data/llava_v1_5_mix665k.json \
        --image_folder=playground/data --out_dir=out/mova-routing
    torchrun --nproc_per_node=8 train.py config/mova_stage2_routed.py

Where this file departs from the released adapter (each to keep it short; none measured against it):
- the gate reads the mean of the LLM's own input embeddings over the prompt's tokens, not BERT-large's CLS of the
  question (no second text model to load);
- plain multi-head attention without the released 2-D rotary embedding and sub-LayerNorm, a GELU MLP instead of
  the SwiGLU, no learned position embedding (the base tokens carry CLIP's);
- average pooling of the grid instead of the two RegNet stages around the released pooling.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from mocha import IGNORE_INDEX, resize_to_grid


def zero_init(linear):
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class MoVAdapterBlock(nn.Module):
    """One block of the MoV-Adapter (released AdapterBlock). x: the base tokens [B, N, D]; experts: each [B, N, d_e]
    on the same grid; text [B, d_text]; expert_mask [B, E] bool. Every output projection starts at zero, so at
    initialisation the block is the identity and the adapter is the base path."""

    def __init__(self, dim, expert_dims, text_dim, num_heads, top_k):
        super().__init__()
        self.top_k = min(top_k, len(expert_dims))
        self.gate = nn.Sequential(nn.Linear(text_dim + dim, dim), nn.GELU(),
                                  zero_init(nn.Linear(dim, len(expert_dims))))
        self.query_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in expert_dims)
        self.expert_norms = nn.ModuleList(nn.LayerNorm(d) for d in expert_dims)
        self.cross_attns = nn.ModuleList(nn.MultiheadAttention(dim, num_heads, kdim=d, vdim=d, batch_first=True)
                                         for d in expert_dims)
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), zero_init(nn.Linear(4 * dim, dim)))
        for attention in (*self.cross_attns, self.self_attn):
            zero_init(attention.out_proj)

    def expert_weights(self, x, text, expert_mask):
        """The dynamic gate: g = softmax(MLP([t; mean_i x_i]) + m), m = -1e6 on masked experts, then the top-k kept
        and renormalised; all zero for a sample with no expert (the released routing_binary_weight). [B, E]"""
        logits = self.gate(torch.cat([text, x.mean(1)], dim=-1)).float()               # [B, E]
        weights = (logits - 1e6 * (~expert_mask)).softmax(dim=-1)                       # masked: exactly 0
        kept = torch.zeros_like(weights).scatter(1, weights.topk(self.top_k, dim=-1).indices, 1.0)
        weights = weights * kept
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * expert_mask.any(-1, keepdim=True)

    def forward(self, x, experts, text, expert_mask):
        weights = self.expert_weights(x, text, expert_mask)                             # [B, E]
        # x <- x + sum_e g_e CrossAttn_e(LN x, LN F_e): one attention per expert (their key widths differ)
        fused = torch.stack([attention(query_norm(x), expert_norm(f), expert_norm(f), need_weights=False)[0]
                             for attention, query_norm, expert_norm, f
                             in zip(self.cross_attns, self.query_norms, self.expert_norms, experts)], dim=1)
        # fused: [B, E, N, D]
        x = x + (weights.to(fused.dtype)[:, :, None, None] * fused).sum(1)
        attended = self.self_norm(x)
        x = x + self.self_attn(attended, attended, attended, need_weights=False)[0]    # x <- x + SelfAttn(LN x)
        return x + self.mlp(self.mlp_norm(x))                                           # x <- x + MLP(LN x)


class MoVAdapter(nn.Module):
    """The MoV-Adapter (released MoVAdapter): blocks over the base tokens, (x + base) / 2, the grid pooled by `pool`
    on each side, then an MLP to the LLM's width. Returns [B, N / pool^2, d_llm]."""

    def __init__(self, base_dim, expert_dims, text_dim, llm_dim, num_blocks=3, top_k=3, pool=2, head_dim=64):
        super().__init__()
        self.pool = pool
        num_heads = max(base_dim // head_dim, 1)
        self.blocks = nn.ModuleList(MoVAdapterBlock(base_dim, expert_dims, text_dim, num_heads, top_k)
                                    for _ in range(num_blocks))
        self.projector = nn.Sequential(nn.Linear(base_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, base_tokens, expert_tokens, text, expert_mask=None):
        """base_tokens [B, N, D]; expert_tokens: each [B, N_e, d_e]; text [B, d_text]; expert_mask [B, E] bool,
        None = every expert."""
        B, N, D = base_tokens.shape
        side = math.isqrt(N)
        if expert_mask is None:
            expert_mask = torch.ones(B, len(expert_tokens), dtype=torch.bool, device=base_tokens.device)
        experts = [resize_to_grid(tokens, side) for tokens in expert_tokens]            # each [B, N, d_e]
        x = base_tokens
        for block in self.blocks:
            x = block(x, experts, text, expert_mask)
        x = (x + base_tokens) / 2
        grid = x.transpose(1, 2).reshape(B, D, side, side)
        pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)               # [B, N / pool^2, D]
        return self.projector(pooled)


# -----------------------------------------------------------------------------
# Coarse routing: the routing prompt (released mova/constants.py, ROUTING_PROMPT) and its answer

ROUTING_HEADER = ("You are a helpful assistant router. Based on the visual content, questions, and model pool the user "
                  "provides, you need to consider the expertise of these models to select the most {k} suitable models "
                  "to help you answer the questions. Answer with the model's letter from the given choices directly. "
                  "If no models are selected, just answer 'none'.\nModel pool:")
# one line per expert, in the order of the adapter's experts (ENCODER_ORDER without the base)
EXPERT_DESCRIPTIONS = {  # what each was trained on, nothing more
    'siglip': "This model was trained to match images with their captions, at 384 pixels.",
    'convnext': "This convolutional model was trained to match images with their captions and sees the image at a "
                "higher resolution, with its fine detail.",
    'clip': "This model was trained to match images with their captions, at 336 pixels.",
    'dinov2': "This model was trained on images alone, without text, and keeps their shapes and layout.",
}
LETTERS = 'ABCDEFG'


def routing_question(question, experts, top_k):
    """The routing turn's text for a question (no image placeholder): the header, one lettered line per expert,
    then the question, as the released eval builds it."""
    pool = ''.join(f"\n{LETTERS[i]}. {EXPERT_DESCRIPTIONS[name]}" for i, name in enumerate(experts))
    return ROUTING_HEADER.format(k=top_k) + pool + "\n\nQuestion:\n" + question


def parse_routing(answer, num_experts):
    """The routing answer as (mask [num_experts] bool, malformed). Letters separated by commas or spaces ("A, C"),
    or "none" (no expert). Anything else, or a letter past the pool, is malformed: every expert is used, and the
    caller counts it. (The released get_routing_weights looks for each capital letter anywhere in the first three
    comma-separated parts, so junk text there may switch experts on or off; we would rather count it.)"""
    words = [w for w in answer.replace(',', ' ').split() if w]
    if [w.lower().strip('.') for w in words] == ['none']:
        return torch.zeros(num_experts, dtype=torch.bool), False
    letters = [w.strip('.') for w in words]
    if not letters or any(len(l) != 1 or l not in LETTERS[:num_experts] for l in letters):
        return torch.ones(num_experts, dtype=torch.bool), True
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[[LETTERS.index(l) for l in letters]] = True
    return mask, False


# -----------------------------------------------------------------------------
# Routing annotations (the paper's rule; the released repository has no code for it)


@torch.no_grad()
def answer_losses(model, batch, expert_mask):
    """Each sample's mean loss over its learned (answer) tokens, [B], with these experts (expert_mask [n_img, E]).
    The same loss as MoCHA.forward's, per sample."""
    inputs_embeds, attention_mask, labels, _, _ = model.splice(
        batch['input_ids'], batch['attention_mask'], batch['labels'], batch['images'], expert_mask=expert_mask)
    logits = model.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits        # [B, L', V]
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                             reduction='none')                                                 # [B, L' - 1]
    return losses.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)


def routing_labels(model, batch, margin=0.0):
    """[B, E] bool: expert e is right for sample b when the adapter with e alone gives b's answer a loss below the
    base path's (no expert) by more than `margin` (a fraction of it). Every sample of the batch has an image."""
    num_images, num_experts = len(batch['images']), len(model.mova.blocks[0].cross_attns)
    if num_images != len(batch['input_ids']):
        raise ValueError(f"routing_labels: {len(batch['input_ids'])} samples but {num_images} images")
    none = answer_losses(model, batch, torch.zeros(num_images, num_experts, dtype=torch.bool))
    alone = torch.stack([answer_losses(model, batch, F.one_hot(torch.full((num_images,), e), num_experts).bool())
                         for e in range(num_experts)], dim=1)                                   # [B, E]
    return alone < none[:, None] * (1 - margin)


def routing_answer(mask):
    """The letters of the chosen experts, or 'none': what parse_routing reads back."""
    return ', '.join(LETTERS[e] for e in mask.nonzero().flatten().tolist()) or 'none'


def add_missing_words(tokenizer, texts):
    """Append to `tokenizer` the words of `texts` it can only read as its unknown token, each as a whole-word added
    token (HF add_tokens: new ids after the last, so a model trained with the old ids still reads them). Byte-level
    BPE tokenizers (Phi-2's) have no unknown words and are left alone; a word-level one (the shapes world's) lacks the
    routing prompt's words and letters. Returns the words added."""
    from tokenizers import AddedToken
    unk = tokenizer.unk_token_id
    if unk is None or all(unk not in tokenizer(text, add_special_tokens=False).input_ids for text in texts):
        return []
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    words = sorted({word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text)
                    if tokenizer(word, add_special_tokens=False).input_ids == [unk]})
    # a word only where it stands alone ('B' never inside 'Based'); a run of punctuation ("'.") wherever it is
    tokenizer.add_tokens([AddedToken(word, single_word=word[0].isalnum()) for word in words])
    return words


def write_routing_data(model, data_json, image_folder, out_dir, batch_size=16, margin=0.0, max_samples=0, seed=0):
    """MoVA's routing data from a trained MoVA model (every expert on), in out_dir:
    - instruct.json: data_json's samples, and for each of max_samples of them (0: all) with an image, a routing
      conversation, the routing prompt over its first question answered with the experts its labels pick (those that
      lower the loss of that question's answer), shuffled in. Each labelled sample gets "experts", the names it was
      labelled with, and each routing conversation "experts": [] (the routing pass sees the image through the base
      path alone, as eval.py's does); train.py trains MoVA's adapter on them with those experts, so that it has seen
      the subsets routing picks;
    - tokenizer/: the model's tokenizer with the routing prompt's words it lacks appended (add_missing_words).
    Returns the label counts per expert letter and of 'none'."""
    import json
    import random
    from collections import Counter
    from data import LLaVADataset, collate
    model.eval()
    tokenizer, config = model.tokenizer, model.config
    experts = model.mova_experts
    dataset = LLaVADataset(data_json, image_folder, tokenizer, config.template, config.image_size, 10 ** 6,
                           model.num_visual_tokens)
    # each label is its first question's: the loss of that answer alone, as the routing conversation asks that question
    # alone (a LLaVA sample holds several questions, of different kinds)
    dataset.samples = [dict(s, conversations=s['conversations'][:2]) for s in dataset.samples]
    with_image = [i for i, s in enumerate(dataset.samples) if s.get('image')]
    with_image = random.Random(seed).sample(with_image, min(max_samples or len(with_image), len(with_image)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen, routed, counts = {}, [], Counter()  # chosen: sample id -> its experts' names
    for start in range(0, len(with_image), batch_size):
        indices = with_image[start:start + batch_size]
        batch = collate([dataset[i] for i in indices], pad_id, config.image_size)
        for index, mask in zip(indices, routing_labels(model, batch, margin)):
            sample = dataset.samples[index]
            answer = routing_answer(mask)
            counts.update(answer.split(', '))
            chosen[sample['id']] = [experts[e] for e in mask.nonzero().flatten().tolist()]
            question = sample['conversations'][0]['value'].replace('<image>', '').strip()
            routed.append(dict(id=f"{sample['id']}-routing", image=sample['image'], experts=[], conversations=[
                {'from': 'human', 'value': '<image>\n' + routing_question(question, experts, config.mova_top_k)},
                {'from': 'gpt', 'value': answer}]))
    with open(data_json) as f:
        samples = json.load(f)
    samples = [dict(s, experts=chosen[s['id']]) if s.get('id') in chosen else s for s in samples] + routed
    random.Random(seed).shuffle(samples)
    os.makedirs(out_dir, exist_ok=True)
    out_json = os.path.join(out_dir, 'instruct.json')
    with open(out_json + '.tmp', 'w') as f:
        json.dump(samples, f)
    add_missing_words(tokenizer, [turn['value'] for sample in routed for turn in sample['conversations']])
    tokenizer.save_pretrained(os.path.join(out_dir, 'tokenizer'))
    os.replace(out_json + '.tmp', out_json)  # last: instruct.json there means the folder is whole
    return counts


if __name__ == '__main__':
    ckpt_dir = 'out/mova-phi2-stage2/ckpt'  # a trained MoVA checkpoint (connector='mova'), every expert on
    data_json = 'playground/data/llava_v1_5_mix665k.json'
    image_folder = 'playground/data'
    out_dir = 'out/mova-routing'        # instruct.json and tokenizer/, train.py's data_json and tokenizer
    batch_size = 16
    margin = 0.0                        # an expert must lower the answer's loss by this fraction of the base path's
    max_samples = 0                     # 0 = every sample with an image, else this many drawn at random
    exec(open('configurator.py').read())
    from mocha import MoCHA
    counts = write_routing_data(MoCHA.from_pretrained(ckpt_dir), data_json, image_folder, out_dir, batch_size,
                                margin, max_samples)
    print(f"wrote {out_dir}: routing answers by expert letter and 'none': {dict(sorted(counts.items()))}")
