"""
Executable documentation of nanoMoCHA: every test name states a property, its body checks it.
Run: python -m pytest -q -n 2   (CPU, offline; two pytest-xdist workers, about 5 minutes on 2 cores)

Sections: mocha.py (encoders, MoEC, HGA, the splice, generation, checkpoints) · data.py · eval.py ·
train.py (real `python train.py` / `torchrun` runs on a small shapes world).
The reference implementations (`released_hga`, `released_moec`, in released.py) follow the released
code's per-image / per-group / per-expert loops, written plainly; bench.py times mocha.py against them.
"""
import copy
import filecmp
import glob
import itertools
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import data
import eval as ev
import shapes
import towers
from data import SYSTEM
from mocha import (ENCODER_ORDER, ENCODER_SPECS, HGA, IGNORE_INDEX, IMAGE_TOKEN_ID, LLM_SPECS, TINY_LLM, Encoders, MoCHA,
                   MoCHAConfig, MoEC, build_backbone, build_llm, fake_tensors)
from released import released_hga, released_moec, tokenwise_moec

TINY_RES = {name: 64 for name in ENCODER_ORDER}

# -----------------------------------------------------------------------------
# fixtures: a tiny word-level tokenizer and a tiny MoCHA


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ['<pad>', '<unk>', '<|endoftext|>', 'USER', 'ASSISTANT', ':', '?', '.', 'is', 'there', 'a', 'red',
             'blue', 'circle', 'square', 'yes', 'no', 'the', 'what', 'color']
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', unk_token='<unk>',
                                   eos_token='<|endoftext|>')
    path = tmp_path_factory.mktemp('tok') / 'tokenizer'
    fast.save_pretrained(path)
    return str(path)


def tiny_config(tokenizer_dir, **overrides):
    return MoCHAConfig(**dict(dict(encoder_source='tiny', encoder_resolution=TINY_RES, image_size=64,
                                   llm='tiny', llm_source='tiny', tokenizer=tokenizer_dir), **overrides))


@pytest.fixture(scope='module')
def tiny_mocha(tokenizer_dir):
    torch.manual_seed(0)
    return MoCHA(tiny_config(tokenizer_dir))


def random_images(n, size=64, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

# -----------------------------------------------------------------------------
# Encoders (Eq. 1)


@pytest.fixture(scope='module')
def tiny_encoders():
    torch.manual_seed(0)
    return Encoders(ENCODER_ORDER, 'tiny', TINY_RES)


@pytest.mark.parametrize('names', [c for r in range(1, 5) for c in itertools.combinations(ENCODER_ORDER, r)])
def test_every_encoder_subset_gives_one_token_tensor_per_encoder_in_order(tiny_encoders, names):
    encoders = Encoders(list(reversed(names)), 'tiny', TINY_RES)            # order given does not matter
    assert list(encoders.encoders) == list(names)
    outputs = encoders(random_images(2, size=80))
    expected_sizes = {'siglip': 16, 'convnext': 4, 'clip': 16, 'dinov2': 16}  # 64px: 4x4 patches of 16, 2x2 at stride 32
    assert [o.shape for o in outputs] == [(2, expected_sizes[n], 64) for n in names]
    assert encoders.group_sizes == [expected_sizes[n] for n in names]


def test_encoders_are_frozen_in_eval_mode_and_build_no_graph(tiny_encoders):
    tiny_encoders.train()
    assert not tiny_encoders.training and not any(m.training for m in tiny_encoders.modules())
    assert not any(p.requires_grad for p in tiny_encoders.parameters())
    assert all(not o.requires_grad for o in tiny_encoders(random_images(1)))


def test_uint8_and_float_images_give_the_same_tokens(tiny_encoders):
    images = random_images(2)
    for a, b in zip(tiny_encoders(images), tiny_encoders(images.float() / 255)):
        torch.testing.assert_close(a, b)


def test_answering_runs_each_distinct_image_once_and_gives_every_copy_its_tokens(tiny_encoders):
    images = random_images(3)
    batch = images[[2, 0, 2, 1, 0, 2]]                                       # a benchmark batch: 6 questions, 3 images
    seen = []
    hook = tiny_encoders.encoders['siglip'].register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    try:
        with torch.no_grad():
            answering = tiny_encoders(batch)
        training = tiny_encoders(batch)                                       # grad on: every image runs, as in training
    finally:
        hook.remove()
    assert seen == [3, 6]
    for a, b in zip(answering, training):
        torch.testing.assert_close(a, b)
    with torch.no_grad(), fake_tensors(num_experts=4, device='cpu'):  # bench.py's FLOPs per answer: one fake image
        assert [t.shape for t in tiny_encoders(torch.empty(1, 3, 64, 64))] == [t[:1].shape for t in training]


def test_cached_tower_tokens_stand_in_for_the_towers_only_where_every_image_is_cached():
    """Encoders.use_cached_tokens (train.py's tower_tokens): a batch whose images are all cached, in any order and
    with repeats, gets their cached tokens and runs no tower; a batch with one image not in the cache runs the
    towers for all of it; a skipped encoder (MoVA) gives zeros either way. The fingerprint names the weights."""
    from mocha import image_digests
    torch.manual_seed(0)
    encoders = Encoders(['siglip', 'convnext'], 'tiny', TINY_RES)
    images = random_images(5)                                                 # [5, 3, 64, 64] uint8
    with torch.no_grad():
        live = encoders(images)                                              # each [5, N_g, 64]
    cached = {name: (image_digests(images[:4]), tokens[:4] + 1.0)           # +1: tell cached tokens from computed ones
              for name, tokens in zip(encoders.encoders, live)}
    encoders.use_cached_tokens(cached)
    runs = []
    hook = encoders.encoders['siglip'].register_forward_hook(lambda module, args, out: runs.append(len(args[0])))
    try:
        order = [2, 0, 2, 3]
        read = encoders(images[order], skip={'convnext'})
        assert runs == [] and (encoders.batches_cached, encoders.batches_computed) == (1, 0)
        torch.testing.assert_close(read[0], live[0][order] + 1.0)
        assert not read[1].any() and read[1].shape == live[1][order].shape  # skipped: zeros
        computed = encoders(images[[1, 4]])                                  # image 4 is not cached
        assert runs == [2] and (encoders.batches_cached, encoders.batches_computed) == (1, 1)
        for tokens, expected in zip(computed, live):
            torch.testing.assert_close(tokens, expected[[1, 4]])
    finally:
        hook.remove()
    prints = encoders.fingerprints()
    with torch.no_grad():
        next(encoders.encoders['convnext'].parameters())[0] += 1
    assert encoders.fingerprints()['convnext'] != prints['convnext'] and encoders.fingerprints()['siglip'] == prints['siglip']
    with pytest.raises(ValueError, match='for encoders'):
        encoders.use_cached_tokens({'siglip': cached['siglip']})
    with pytest.raises(ValueError, match='frozen encoders'):
        Encoders(['siglip'], 'tiny', TINY_RES, trainable=True).use_cached_tokens({'siglip': cached['siglip']})


def test_encoder_bad_input_is_a_clear_error(tiny_encoders):
    with pytest.raises(ValueError, match='unknown encoder'):
        Encoders(['siglip', 'eva'], 'tiny', TINY_RES)
    with pytest.raises(ValueError, match=r'\[B, 3, H, W\]'):
        tiny_encoders(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r'\[B, 3, H, W\]'):
        tiny_encoders(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match='uint8 or float'):
        tiny_encoders(torch.zeros(1, 3, 64, 64, dtype=torch.long))


def test_convnext_pools_channels_in_threes():
    """ConvNeXt-XXL's 3072 channels become 1024 by averaging each run of three (kernel 3)."""
    feature_map = torch.arange(2 * 6 * 2 * 2, dtype=torch.float).view(2, 6, 2, 2)
    encoder = Encoders(['convnext'], 'tiny', TINY_RES).encoders['convnext']
    encoder.channel_pool = 3
    encoder.backbone.forward_features = lambda pixels: feature_map
    tokens = encoder(torch.zeros(2, 3, 64, 64))
    assert tokens.shape == (2, 4, 2)
    expected = feature_map.flatten(2).transpose(1, 2).view(2, 4, 2, 3).mean(-1)
    torch.testing.assert_close(tokens, expected)


def test_pretrained_llm_loads_in_float32_whatever_its_checkpoint_holds(tmp_path):
    """Phi-2's and Vicuna's checkpoints are float16; training needs float32 weights under bf16 autocast."""
    build_llm('tiny', 'tiny', vocab_size=50).to(torch.float16).save_pretrained(tmp_path / 'llm')
    assert build_llm(str(tmp_path / 'llm'), 'pretrained').dtype == torch.float32


def test_pretrained_loading_path_reads_local_checkpoints(tmp_path):
    """The code that loads public ids also loads local dirs: HF save_pretrained -> from_pretrained,
    and an open_clip model config + checkpoint in a local dir."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    images = random_images(1).float() / 255
    paths = {}
    for name in ENCODER_ORDER:
        backbone = build_backbone(name, 'tiny')
        if name == 'convnext':
            import open_clip
            clip_model = open_clip.CLIP(**ENCODER_SPECS['convnext']['tiny'])
            backbone = clip_model.visual.trunk
            (tmp_path / name).mkdir()
            (tmp_path / name / 'open_clip_config.json').write_text(
                json.dumps({'model_cfg': ENCODER_SPECS['convnext']['tiny'], 'preprocess_cfg': {}}))
            save_file(clip_model.state_dict(), tmp_path / name / 'open_clip_model.safetensors')
        else:
            backbone.save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
        loaded = build_backbone(name, 'pretrained', paths[name])
        for (k, v), (k2, v2) in zip(backbone.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), f'{name}: {k} differs after loading'
    encoders = Encoders(ENCODER_ORDER, 'pretrained', TINY_RES, paths=paths)
    assert encoders.dims == [64, 320 // 5, 64, 64]  # pooled by the trunk's width: a loaded tiny ConvNeXt as a random one
    assert [o.shape[1] for o in encoders(images)] == [16, 4, 16, 16]


def test_full_size_architectures_build_offline_with_paper_shapes():
    """Random-weight full-size encoders and LLMs, on the meta device (no memory, no network)."""
    with torch.device('meta'):
        encoders = Encoders(ENCODER_ORDER, 'random')
        phi2 = build_llm('microsoft/phi-2', 'random')
        vicuna = build_llm('lmsys/vicuna-7b-v1.5', 'random')
    assert encoders.group_sizes == [441, 100, 576, 576]                   # 1693 tokens at 336 px
    assert encoders.dims == [1024, 1024, 1024, 1024]
    counts = {n: sum(p.numel() for p in e.parameters()) for n, e in encoders.encoders.items()}
    assert 300e6 < counts['siglip'] < 330e6 and 300e6 < counts['clip'] < 310e6
    assert 300e6 < counts['dinov2'] < 310e6 and 840e6 < counts['convnext'] < 850e6
    assert 2.7e9 < sum(p.numel() for p in phi2.parameters()) < 2.8e9
    assert 6.7e9 < sum(p.numel() for p in vicuna.parameters()) < 6.8e9

# -----------------------------------------------------------------------------
# full size: the real widths, vocabularies, resolution and token counts, one layer per tower


def full_size_step(tmp_path, llm, stage, template, tokenizer, conversations, learning_rate):
    """One optimizer step at full width, taken as train.py takes it, on CPU in float32 (bf16 autocast is
    slow on CPUs without bf16 units; train.py keeps bf16 for GPUs). train.py itself is a script that ends
    by writing a checkpoint, gigabytes at these widths, so this makes its calls in its order: MoCHA from
    MoCHAConfig, the stage's requires_grad, gradient checkpointing, LLaVADataset + collate at
    max_length=2560, the forward with the batch's target count (Eq. 10), backward, clip_grad_norm_, AdamW.
    Every tower has one layer (encoder_layers, llm_layers: ConvNeXt one block per stage), and the LLM's
    vocabulary is cut to 4096 rows (HF's resize_token_embeddings): nothing else depends on it, and at Phi-2's
    51200 the LM head over 2560 positions and its AdamW state took more than half of a 100 s step. Widths,
    resolution, visual-token counts and positions are real. Returns the model after the step, the batch, the forward's outputs, the rotary embedding's positions
    and angles, and the weights (a gate, the LM head) from before the step."""
    torch.manual_seed(0)
    model = MoCHA(MoCHAConfig(encoder_source='random', llm=llm, llm_source='random', tokenizer=tokenizer,
                              template=template, encoder_layers=1, llm_layers=1))
    assert model.llm.config.vocab_size == LLM_SPECS[llm][1]['vocab_size']
    model.llm.resize_token_embeddings(4096)
    model.requires_grad_(False)
    model.moecs.requires_grad_(True)
    model.llm.requires_grad_(stage == 2)
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    model.llm.config.use_cache = False
    model.train()
    pixels = np.random.RandomState(0).randint(0, 256, (480, 640, 3), dtype=np.uint8)  # padded to square, resized
    Image.fromarray(pixels).save(tmp_path / 'photo.png')
    (tmp_path / 'data.json').write_text(json.dumps([dict(id='full', image='photo.png', conversations=conversations)]))
    dataset = data.LLaVADataset(str(tmp_path / 'data.json'), str(tmp_path), model.tokenizer, template, 336, 2560,
                                model.num_visual_tokens)
    tokenizer = model.tokenizer
    batch = data.collate([dataset[0]], tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id, 336)
    rotary = []
    model.llm.model.rotary_emb.register_forward_hook(
        lambda module, args, kwargs, output: rotary.append((kwargs['position_ids'], output[0])), with_kwargs=True)
    before = {'gate': model.moecs['siglip'].gate.weight.detach().clone(),
              'lm_head': model.llm.get_output_embeddings().weight[:4].detach().clone()}
    num_targets = int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())
    out = model(batch['input_ids'], batch['attention_mask'], batch['labels'], batch['images'], num_targets)
    out['loss'].backward()
    out['logits'] = out['logits'].shape
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    torch.optim.AdamW(trainable, lr=learning_rate, betas=(0.9, 0.999), weight_decay=0.0, fused=False).step()
    return model, batch, out, rotary, before


def assert_full_size_encoders(model):
    """All four encoders at 336 px: SigLIP's 384-px positions interpolated to 21x21, ConvNeXt-XXL's
    4-px stem and 4 stages up to 3072 channels (pooled in threes), CLIP-L/14 and DINOv2-L/14 at 24x24."""
    assert model.group_sizes == [441, 100, 576, 576] and model.num_visual_tokens == 1693  # Table 9
    assert model.encoders.dims == [1024] * 4 and model.encoders.encoders['siglip'].interpolate
    convnext = model.encoders.encoders['convnext'].backbone
    assert [(f['num_chs'], f['reduction']) for f in convnext.feature_info] == [(384, 4), (768, 8), (1536, 16),
                                                                               (3072, 32)]
    assert [len(stage.blocks) for stage in convnext.stages] == [1, 1, 1, 1]


def test_phi2_stage2_step_at_full_width_reaches_2560_positions(tokenizer_dir, tmp_path):
    """The path users pay for, config/stage2.py: MoECs + Phi-2 learn on a sample that fills max_length=2560
    once its image is spliced in; Phi-2 was trained on 2048 positions and takes the rest by extrapolating
    its rotary angles. 24-69 s on 2 cores (the more, the busier they were with other jobs), 6 GB of memory."""
    turns = human_gpt('<image>\nis there a red circle ?', 'yes') + human_gpt('what color is the circle ?', 'red') * 120
    model, batch, out, rotary, before = full_size_step(tmp_path, 'microsoft/phi-2', 2, 'phi', tokenizer_dir, turns,
                                                       learning_rate=2e-5)
    assert_full_size_encoders(model)
    assert len(model.llm.model.layers) == 1 and model.llm.config.hidden_size == 2560
    assert batch['input_ids'].shape == (1, 2560 - 1692)                  # cut to fit, the placeholder kept
    assert (batch['input_ids'] == IMAGE_TOKEN_ID).sum() == 1 and out['logits'] == (1, 2560, 4096)
    assert all(math.isfinite(out[k].item()) for k in ('loss', 'lm_loss', 'balance_loss', 'z_loss'))
    # positions 2048-2559: rotary angles computed for them (extrapolated), not clamped to 2047
    (position_ids, cos), = rotary
    assert position_ids.max() == 2559 and model.llm.config.max_position_embeddings == 2048
    inv_freq = model.llm.model.rotary_emb.inv_freq
    torch.testing.assert_close(cos[0, 2559, :len(inv_freq)], torch.cos(2559 * inv_freq))
    # gradients: every MoEC and LLM weight (under gradient checkpointing), no encoder weight
    for name, p in itertools.chain(model.moecs.named_parameters(), model.llm.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(moec.experts[e][0].weight.grad.abs().sum() > 0 for moec in model.moecs.values() for e in range(4))
    assert all(p.grad is None and not p.requires_grad for p in model.encoders.parameters())
    assert not torch.equal(model.moecs['siglip'].gate.weight, before['gate'])
    assert not torch.equal(model.llm.get_output_embeddings().weight[:4], before['lm_head'])


def test_vicuna_stage1_step_at_full_width_trains_only_the_moecs(sp_llama_dir, tmp_path):
    """config/stage1_vicuna7b.py: the MoECs (1024 -> 4096) learn through a frozen Vicuna-width LLM, on an
    image and a caption as LCS-558K has them (plain template, ~1.75k positions), read by a Llama-style
    SentencePiece tokenizer. 41-82 s on 2 cores (the more, the busier), 8 GB of memory: the 4096-wide
    layer over ~1.75k positions, run twice (gradient checkpointing), and AdamW over 336M connector weights."""
    caption = 'a large red circle at the top left and a small blue square next to it'
    model, batch, out, rotary, before = full_size_step(tmp_path, 'lmsys/vicuna-7b-v1.5', 1, 'plain', sp_llama_dir(),
                                                       human_gpt('<image>\nDescribe the image.', caption),
                                                       learning_rate=1e-3)
    assert_full_size_encoders(model)
    assert len(model.llm.model.layers) == 1 and model.llm.config.hidden_size == 4096
    assert all(moec.experts[0][2].out_features == 4096 for moec in model.moecs.values())
    length = batch['input_ids'].shape[1] + 1692
    assert batch['input_ids'][0, :2].tolist() == [1, IMAGE_TOKEN_ID] and out['logits'] == (1, length, 4096)
    assert 1700 < length < 1800                                              # <s>, 1693 visual tokens, caption
    assert all(math.isfinite(out[k].item()) for k in ('loss', 'lm_loss', 'balance_loss', 'z_loss'))
    for name, p in model.moecs.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None and not p.requires_grad for p in model.llm.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.encoders.parameters())
    assert not torch.equal(model.moecs['siglip'].gate.weight, before['gate'])
    assert torch.equal(model.llm.get_output_embeddings().weight[:4], before['lm_head'])


# -----------------------------------------------------------------------------
# MoEC (Eqs. 2-5)


@pytest.fixture
def moec():
    torch.manual_seed(0)
    return MoEC(16, 24, num_experts=4, top_k=2)


def test_moec_matches_tokenwise_reference_and_released_loop(moec):
    x = torch.randn(3, 10, 16)
    y, _, _ = moec(x)
    assert y.shape == (3, 10, 24)
    torch.testing.assert_close(y, tokenwise_moec(moec, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, released_moec(moec, x), atol=1e-5, rtol=1e-5)


def test_moec_losses_equal_their_formulas(moec):
    x = torch.randn(3, 10, 16)
    _, balance, z = moec(x)
    logits = x @ moec.gate.weight.T
    probs = logits.softmax(-1)
    top1 = logits.argmax(-1)
    expected_balance = 0.0
    for b in range(3):
        for e in range(4):
            expected_balance += probs[b, :, e].mean() * (top1[b] == e).float().mean()
    expected_balance = 16 * expected_balance / 12                          # E^2 * mean over (b, e)
    expected_z = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits.reshape(-1, 4)]).mean()
    torch.testing.assert_close(balance, expected_balance)
    torch.testing.assert_close(z, expected_z)


def test_moec_gradients_reach_router_and_selected_experts_only(moec):
    with torch.no_grad():  # expert 3 can never win: its router row is very negative for positive inputs
        moec.gate.weight[3] = -10.0
    x = torch.rand(2, 8, 16)
    y, _, _ = moec(x)
    y.sum().backward()
    assert moec.gate.weight.grad.abs().sum() > 0
    for e in range(3):
        assert moec.experts[e][0].weight.grad.abs().sum() > 0
    assert moec.experts[3][0].weight.grad is None or moec.experts[3][0].weight.grad.abs().sum() == 0


def test_one_expert_moec_is_the_llava_mlp_connector():
    torch.manual_seed(0)
    moec = MoEC(16, 24, num_experts=1, top_k=1)
    x = torch.randn(2, 5, 16)
    mlp = moec.experts[0]
    torch.testing.assert_close(moec(x)[0], mlp[2](F.gelu(mlp[0](x))))


def test_upcycled_moec_equals_its_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 24))  # LLaVA's mm_projector layout
    moec = MoEC(16, 24, num_experts=4, top_k=2).upcycle_from(mlp.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(moec(x)[0], mlp(x), atol=1e-6, rtol=1e-5)
    single = MoEC(16, 24, num_experts=1, top_k=1)                           # or from a 1-expert MoEC
    torch.testing.assert_close(MoEC(16, 24).upcycle_from(single.state_dict())(x)[0], single(x)[0],
                               atol=1e-6, rtol=1e-5)
    # a projector made for another LLM's width names the shapes instead of a size-mismatch deep in load_state_dict
    with pytest.raises(ValueError, match=r"do not fit this connector's .*\(24,"):
        MoEC(16, 24).upcycle_from(MoEC(16, 32, num_experts=1, top_k=1).state_dict())


def test_moec_keeps_the_released_state_dict_layout(moec):
    keys = set(moec.state_dict())
    assert 'gate.weight' in keys and moec.gate.bias is None
    assert {f'experts.{i}.{j}.{p}' for i in range(4) for j in (0, 2) for p in ('weight', 'bias')} <= keys

# -----------------------------------------------------------------------------
# HGA (Eqs. 7-9)


@pytest.mark.parametrize('group_sizes', [[5, 3, 8, 8], [1, 6, 2], [12], [2, 2], [1, 1, 1], [20, 1]])
def test_hga_matches_the_released_per_image_algorithm(group_sizes):
    torch.manual_seed(0)
    x = torch.randn(3, sum(group_sizes), 32)
    torch.testing.assert_close(HGA()(x, group_sizes), released_hga(x, group_sizes), atol=1e-4, rtol=1e-4)


def test_hga_with_large_k_clamps_to_what_exists():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(HGA(k_intra=50, k_inter=50)(x, [4, 5]), released_hga(x, [4, 5], 50, 50),
                               atol=1e-4, rtol=1e-4)


def test_hga_image_output_does_not_depend_on_other_images():
    torch.manual_seed(0)
    x = torch.randn(4, 15, 16)
    together = HGA()(x, [5, 10])
    alone = torch.cat([HGA()(x[i:i + 1], [5, 10]) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_hga_gradients_reach_x_and_match_the_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 8, requires_grad=True)
    HGA()(x, [4, 8]).pow(2).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    released_hga(x, [4, 8]).pow(2).sum().backward()
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, x.grad, atol=1e-4, rtol=1e-4)


def test_hga_off_is_identity_and_bad_groups_are_an_error():
    x = torch.randn(1, 6, 4)
    assert torch.equal(HGA(enabled=False)(x, [2, 4]), x)
    with pytest.raises(ValueError, match='sum to 5'):
        HGA()(x, [2, 3])


def test_hga_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = HGA()(x, [4, 6])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), released_hga(x.float(), [4, 6]), atol=2e-2, rtol=2e-2)

# -----------------------------------------------------------------------------
# bench.py's memory and FLOPs table, on config/stage2.py cut to 2 LLM layers and 1 encoder layer
# (real widths, vocabulary and 2560 positions; fake tensors, so no memory): 25-60 s on 2 shared cores


@pytest.fixture(scope='module')
def memory_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp('bench') / 'memory.json'
    subprocess.run([sys.executable, 'bench.py', '--table=memory', '--configs=config/stage2.py', '--llm_layers=2',
                    '--encoder_layers=1', f'--memory_json={path}'], check=True, capture_output=True,
                   cwd=os.path.dirname(os.path.abspath(__file__)))
    return {row['parallel']: row for row in json.loads(path.read_text())}


def test_memory_table_traces_every_state_and_shards_them_under_fsdp(memory_rows):
    ddp, fsdp = memory_rows['ddp'], memory_rows['fsdp']
    for row in (ddp, fsdp):
        for key in ('weights', 'grads', 'optimizer', 'activations', 'peak', 'ddp_buckets', 'autocast_cache',
                    'model_flops', 'hardware_flops'):
            assert key in row, key
        assert row['peak'] >= row['weights'] + row['grads'] + row['optimizer'] and row['activations'] > 0
    # DDP: float32 weights, float32 gradients of what trains, AdamW's two float32 moments of them
    assert ddp['grads'] == ddp['trainable_bytes'] == ddp['ddp_buckets']
    assert ddp['optimizer'] == pytest.approx(2 * ddp['grads'], rel=1e-3)
    assert ddp['weights'] > ddp['grads']  # the frozen encoders are held too
    # FSDP over 8 ranks holds an eighth of each (each tensor's first dimension padded to a multiple of 8)
    for key in ('weights', 'grads', 'optimizer'):
        assert ddp[key] / 8 <= fsdp[key] <= ddp[key] / 8 * 1.02, key
    assert fsdp['peak'] < ddp['peak']


def test_traced_llm_flops_are_the_matmul_and_attention_formula(memory_rows):
    """FlopCounterMode's count of the decoder layers and LM head, against 6 x tokens x matmul weights
    (forward, input gradient, weight gradient) plus attention: 4 B L^2 d forward, 10 B L^2 d backward
    (PyTorch's SDPA backward formula recomputes the scores), full L x L although causal."""
    row = memory_rows['ddp']
    d, vocab, layers = 2560, 51200, 2                                      # Phi-2 widths, cut to 2 layers
    B, L = row['batch_size'], row['max_length']
    layer_weights = 4 * d * d + 2 * d * 4 * d                              # q, k, v, dense; fc1, fc2
    expected = 6 * B * L * (layers * layer_weights + d * vocab) + layers * 14 * B * L * L * d
    assert row['llm_model_flops'] == pytest.approx(expected, rel=0.01)
    # the recompute of gradient checkpointing costs at most one more forward of the layers
    assert row['model_flops'] < row['hardware_flops'] <= row['model_flops'] + expected / 3

# -----------------------------------------------------------------------------
# MoCHA: splice, loss, generation, checkpoints


def batch_of(rows, pad_id=0, left=False):
    """Pads lists of ids into input_ids and attention_mask."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def test_mocha_shapes_loss_and_gradients(tiny_mocha):
    model = tiny_mocha
    model.zero_grad()
    ids, mask = batch_of([[3, IMAGE_TOKEN_ID, 8, 9, 10, 11], [3, 8, 9, 10]])
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN_ID), IGNORE_INDEX)
    out = model(ids, mask, labels, random_images(1))
    N = model.num_visual_tokens
    assert N == 52 and out['logits'].shape == (2, 6 + N - 1, model.llm.config.vocab_size)
    assert torch.isfinite(out['loss'])
    torch.testing.assert_close(out['loss'], out['lm_loss'] + 0.1 * out['balance_loss'] + 0.01 * out['z_loss'])
    out['loss'].backward()
    for name, moec in model.moecs.items():
        assert moec.gate.weight.grad.abs().sum() > 0, name
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoders.parameters())


def test_splice_puts_visual_tokens_at_the_placeholder(tiny_mocha):
    model = tiny_mocha
    images = random_images(2)
    ids, mask = batch_of([[3, 8, IMAGE_TOKEN_ID, 9], [3, 8, 9, 10, 11, 12], [IMAGE_TOKEN_ID, 4, 5]])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX).masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX)
    with torch.no_grad():
        embeds, new_mask, new_labels, _, _ = model.splice(ids, mask, labels, images)
        visual, _, _ = model.encode_images(images)
        text = model.llm.get_input_embeddings()(ids.clamp(min=0))
    N = visual.shape[1]
    for b, (placeholder, length, image) in enumerate([(2, 4, 0), (None, 6, None), (0, 3, 1)]):
        if placeholder is None:
            expected = text[b, :length]
        else:
            expected = torch.cat([text[b, :placeholder], visual[image], text[b, placeholder + 1:length]])
        n = expected.shape[0]
        torch.testing.assert_close(embeds[b, :n], expected)
        assert new_mask[b, :n].all() and not new_mask[b, n:].any()
        assert (new_labels[b, n:] == IGNORE_INDEX).all()
    assert (new_labels[0, 2:2 + N] == IGNORE_INDEX).all() and new_labels[0, 2 + N] == 9


def test_mixed_batch_gives_each_sample_the_same_logits_as_alone(tiny_mocha):
    model = tiny_mocha.eval()
    rows = [[3, IMAGE_TOKEN_ID, 8, 9], [3, 8, 9, 10, 11], [IMAGE_TOKEN_ID, 12, 13]]
    images = random_images(2)
    ids, mask = batch_of(rows)
    with torch.no_grad():
        together = model(ids, mask, None, images)['logits']
        image_index = 0
        for b, row in enumerate(rows):
            has = IMAGE_TOKEN_ID in row
            alone = model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), None,
                          images[image_index:image_index + 1] if has else None)['logits'][0]
            image_index += has
            torch.testing.assert_close(together[b, :alone.shape[0]], alone, atol=1e-4, rtol=1e-4)


def test_forward_refuses_left_padding(tiny_mocha):
    """forward runs the LLM without a padding mask: in right-padded rows (data.collate's) causal attention keeps
    each token from the padding after it (the test above: the same logits as alone). In a left-padded row tokens
    would attend to the padding before them, so such a batch is an error, not a wrong loss."""
    ids, mask = batch_of([[3, 8, 9, 10], [3, 8]], left=True)
    with pytest.raises(ValueError, match='right-padded'):
        tiny_mocha(ids, mask, None, None)


def test_generation_with_and_without_image_is_greedy_and_ignores_left_padding(tiny_mocha):
    model = tiny_mocha.eval()
    images = random_images(2, seed=3)
    rows = [[3, IMAGE_TOKEN_ID, 8, 9], [3, 8, 9, 10, 11, 12, 13], [IMAGE_TOKEN_ID, 14]]
    ids, mask = batch_of(rows, left=True)
    batched = model.generate(ids, mask, images, max_new_tokens=6)
    assert batched.shape[0] == 3 and batched.shape[1] <= 6
    eos = model.tokenizer.eos_token_id
    image_index = 0
    for b, row in enumerate(rows):
        has = IMAGE_TOKEN_ID in row
        row_images = images[image_index:image_index + 1] if has else None
        image_index += has
        alone = model.generate(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), row_images, 6)[0]
        # greedy by hand: argmax of the forward pass, one token at a time
        manual, tokens = [], list(row)
        for _ in range(6):
            logits = model(torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.long), None,
                           row_images)['logits']
            manual.append(int(logits[0, -1].argmax()))
            tokens.append(manual[-1])
            if manual[-1] == eos:
                break
        assert alone.tolist()[:len(manual)] == manual
        assert batched[b, :len(manual)].tolist() == manual


def test_mocha_bad_input_is_a_clear_error(tiny_mocha):
    ids, mask = batch_of([[3, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 4]])
    with pytest.raises(ValueError, match='more than one <image>'):
        tiny_mocha(ids, mask, None, random_images(1))
    ids, mask = batch_of([[3, IMAGE_TOKEN_ID, 4]])
    with pytest.raises(ValueError, match='1 samples hold an <image> placeholder but 0 images'):
        tiny_mocha(ids, mask, None, None)


def test_save_load_round_trip_restores_every_weight(tiny_mocha, tmp_path):
    model = tiny_mocha.eval()
    model.save_pretrained(tmp_path / 'ckpt')
    loaded = MoCHA.from_pretrained(str(tmp_path / 'ckpt')).eval()
    full, full_loaded = model.state_dict(), loaded.state_dict()
    assert full.keys() == full_loaded.keys()
    for key in full:
        assert torch.equal(full[key], full_loaded[key]), key
    ids, mask = batch_of([[3, IMAGE_TOKEN_ID, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, None, random_images(1))['logits'],
                                   loaded(ids, mask, None, random_images(1))['logits'])


def test_an_llm_with_tied_embeddings_saves_its_shared_weight_once_and_loads_it_tied(tokenizer_dir, tmp_path):
    """Qwen2-0.5B, Gemma and others tie lm_head to the input embedding; safetensors refuses shared tensors,
    so a stage-2 checkpoint of such an LLM failed to save. Saved once, loaded into both names."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**dict(TINY_LLM[1], vocab_size=vocab, tie_word_embeddings=True))
                     ).save_pretrained(tmp_path / 'tied_llm')
    model = MoCHA(tiny_config(tokenizer_dir, encoders=('siglip',), llm=str(tmp_path / 'tied_llm'),
                              llm_source='pretrained')).eval()
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight  # trainable: stage 2
    with torch.no_grad():
        model.llm.model.embed_tokens.weight.mul_(3)  # a weight the pretrained LLM does not have
    model.save_pretrained(tmp_path / 'ckpt')
    saved = load_file(tmp_path / 'ckpt' / 'model.safetensors')
    assert 'llm.model.embed_tokens.weight' in saved and 'llm.lm_head.weight' not in saved
    loaded = MoCHA.from_pretrained(str(tmp_path / 'ckpt')).eval()
    assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight
    assert torch.equal(loaded.llm.lm_head.weight, model.llm.lm_head.weight)


def test_frozen_llm_gets_no_gradient_and_is_not_saved_when_pretrained(tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    model = MoCHA(tiny_config(tokenizer_dir, encoders=('siglip',)))
    model.llm.requires_grad_(False)
    ids, mask = batch_of([[3, IMAGE_TOKEN_ID, 8, 9]])
    model(ids, mask, ids.clamp(min=0), random_images(1))['loss'].backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert model.moecs['siglip'].experts[0][0].weight.grad is not None
    model.config.llm_source = 'pretrained'                                   # as if loaded from the hub
    assert set(model.saved_parts()) == {'moecs', 'encoders'}


def save_tiny_llm(tokenizer_dir, path, seed=0):
    """A tiny Llama saved as a local HF folder: a 'pretrained' LLM that loads by path, offline."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    LlamaForCausalLM(LlamaConfig(**dict(TINY_LLM[1], vocab_size=vocab))).save_pretrained(path)
    return str(path)


def test_a_stage1_checkpoint_of_a_pretrained_llm_loads_without_the_llm_in_it(tokenizer_dir, tmp_path):
    """Stage 1 saves the MoECs alone: the pretrained LLM is reloaded by name, for eval.py and for stage 2."""
    config = tiny_config(tokenizer_dir, encoders=('siglip',), llm_source='pretrained',
                         llm=save_tiny_llm(tokenizer_dir, tmp_path / 'llm'))
    model = MoCHA(config)
    model.set_trainable(stage=1)
    model.save_pretrained(tmp_path / 'stage1')
    assert not parts(load_file(tmp_path / 'stage1' / 'model.safetensors'), 'llm.')
    loaded = MoCHA.from_pretrained(str(tmp_path / 'stage1'))
    assert_same(loaded.state_dict(), model.state_dict())
    state = load_file(tmp_path / 'stage1' / 'model.safetensors')
    with pytest.raises(KeyError, match='keys missing'):                   # a part it holds must be whole
        loaded.load_trainable({k: v for k, v in state.items() if not k.endswith('gate.weight')})


@pytest.fixture
def lora_mocha(tokenizer_dir, tmp_path):
    """A tiny MoCHA with LoRA (r 4) on a pretrained tiny LLM, its adapters' B moved off zero as training would."""
    config = tiny_config(tokenizer_dir, encoders=('siglip',), llm_source='pretrained', lora_rank=4, lora_alpha=8,
                         llm=save_tiny_llm(tokenizer_dir, tmp_path / 'llm'))
    torch.manual_seed(0)
    model = MoCHA(config)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if 'lora_B' in name:
                param.normal_(std=0.02)
    return model


def test_lora_trains_only_the_adapters_and_the_moecs(lora_mocha):
    model = lora_mocha
    model.set_trainable(stage=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in model.state_dict() if 'lora_' in n or n.startswith('moecs.')}
    adapted = {n.split('.lora_A')[0] for n in trainable if '.lora_A.' in n}
    assert len(adapted) == 2 * 7 and not any('lm_head' in n for n in adapted)  # every linear layer but the head
    ids, mask = batch_of([[3, IMAGE_TOKEN_ID, 8, 9]])
    model(ids, mask, ids.clamp(min=0), random_images(1))['loss'].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable and any('lora_A' in n for n in with_grad) and any('moecs' in n for n in with_grad)


def test_lora_checkpoint_holds_the_adapters_alone_and_merges_to_the_same_logits(lora_mocha, tmp_path):
    model = lora_mocha.eval()
    model.set_trainable(stage=2)
    model.save_pretrained(tmp_path / 'ckpt')
    saved = load_file(tmp_path / 'ckpt' / 'model.safetensors')
    assert parts(saved, 'llm.') and all('lora_' in k for k in parts(saved, 'llm.'))  # no base weight
    loaded = MoCHA.from_pretrained(str(tmp_path / 'ckpt')).eval()
    ids, mask = batch_of([[3, IMAGE_TOKEN_ID, 8, 9, 10], [4, 5, IMAGE_TOKEN_ID, 8, 9]])
    with torch.no_grad():
        reference = model(ids, mask, None, random_images(2))['logits']
        torch.testing.assert_close(loaded(ids, mask, None, random_images(2))['logits'], reference, rtol=0, atol=0)
        loaded.merge_lora()
        assert not any('lora_' in n for n in loaded.state_dict())
        torch.testing.assert_close(loaded(ids, mask, None, random_images(2))['logits'], reference, rtol=0, atol=1e-5)
    loaded.save_pretrained(tmp_path / 'merged')                            # a plain checkpoint, the LLM whole
    merged = MoCHA.from_pretrained(str(tmp_path / 'merged')).eval()
    assert merged.config.lora_rank == 0 and 'llm.lm_head.weight' in load_file(tmp_path / 'merged' / 'model.safetensors')
    pretrained = load_file(tmp_path / 'llm' / 'model.safetensors')
    for name in ('self_attn.q_proj', 'mlp.down_proj'):                     # W + (alpha / r) B A, not W
        key = f'model.layers.0.{name}.weight'
        assert not torch.allclose(merged.llm.state_dict()[key], pretrained[key], atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, mask, None, random_images(2))['logits'], reference, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# MoVA's MoV-Adapter (mova.py), the comparison


def mova_inputs(seed=0):
    """Base tokens on a 4x4 grid, two experts on other grids and widths, a text vector: B = 2."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 32, generator=g), [torch.randn(2, 9, 24, generator=g), torch.randn(2, 64, 40, generator=g)],
            torch.randn(2, 20, generator=g))


def trained_looking(adapter, seed=0):
    """The adapter with every weight random, zero-initialised output projections and gate included."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(std=0.2)
    return adapter


def test_mova_adapter_starts_as_the_base_path():
    """Zero-initialised gate and output projections: each block is the identity, (x + base) / 2 is the base."""
    from mova import MoVAdapter
    torch.manual_seed(0)
    adapter = MoVAdapter(32, [24, 40], 20, 48, num_blocks=2, top_k=1, pool=2, head_dim=16)
    base, experts, text = mova_inputs()
    pooled = F.avg_pool2d(base.transpose(1, 2).reshape(2, 32, 4, 4), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(adapter(base, experts, text), adapter.projector(pooled), rtol=0, atol=1e-6)


def test_mova_adapter_shapes_and_gradients():
    from mova import MoVAdapter
    # top-2 of 2: with top-1 the renormalised weight is 1 whatever the gate says, and the gate learns nothing
    adapter = trained_looking(MoVAdapter(32, [24, 40], 20, 48, num_blocks=2, top_k=2, pool=2, head_dim=16))
    base, experts, text = mova_inputs()
    base.requires_grad_(True)
    out = adapter(base, experts, text)
    assert out.shape == (2, 4, 48)                                      # 4x4 grid pooled by 2, to the LLM's width
    out.square().sum().backward()
    assert base.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapter.named_parameters()), \
        [n for n, p in adapter.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]


def test_mova_gate_keeps_the_top_k_renormalised_and_masked_experts_at_zero():
    from mova import MoVAdapterBlock
    block = trained_looking(MoVAdapterBlock(32, [24, 40, 8], 20, num_heads=2, top_k=2))
    base, _, text = mova_inputs()
    weights = block.expert_weights(base, text, torch.tensor([[True, True, True], [True, False, True]]))
    assert ((weights > 0).sum(-1) == 2).all() and torch.allclose(weights.sum(-1), torch.ones(2))
    assert weights[1, 1] == 0
    none = block.expert_weights(base, text, torch.zeros(2, 3, dtype=torch.bool))  # no expert: all zero
    assert torch.equal(none, torch.zeros(2, 3))
    logits = block.gate(torch.cat([text, base.mean(1)], -1))
    top2 = logits.softmax(-1).topk(2).values
    torch.testing.assert_close(weights[0].sort(descending=True).values[:2], top2[0] / top2[0].sum())


def test_a_masked_expert_changes_no_output_and_gets_no_gradient():
    from mova import MoVAdapter
    adapter = trained_looking(MoVAdapter(32, [24, 40], 20, 48, num_blocks=2, top_k=2, pool=2, head_dim=16))
    base, experts, text = mova_inputs()
    mask = torch.tensor([[True, False], [True, True]])                  # sample 0 does without expert 1
    out = adapter(base, experts, text, mask)
    other = torch.randn_like(experts[1])                                # expert 1 shows both samples something else
    out_other = adapter(base, [experts[0], other], text, mask)
    assert torch.equal(out[0], out_other[0]) and not torch.equal(out[1], out_other[1])
    adapter(base[:1], [e[:1] for e in experts], text[:1], mask[:1]).sum().backward()
    unused = [p.grad for n, p in adapter.named_parameters() if re.search(r'(cross_attns|expert_norms|query_norms)\.1\.', n)]
    assert unused and all(g is None or not g.any() for g in unused)
    used = [p.grad for n, p in adapter.named_parameters() if 'cross_attns.0.' in n]
    assert all(g is not None and g.any() for g in used)


def test_routing_answers_parse_to_expert_masks_and_junk_is_counted():
    from mova import parse_routing, routing_question
    cases = {'A': [1, 0, 0], 'A, C': [1, 0, 1], 'B C.': [0, 1, 1], 'none': [0, 0, 0], 'None.': [0, 0, 0],
             'the red one': [1, 1, 1], 'D': [1, 1, 1], '': [1, 1, 1], 'A, none': [1, 1, 1]}
    for answer, expected in cases.items():
        mask, malformed = parse_routing(answer, 3)
        assert mask.tolist() == [bool(e) for e in expected], answer
        assert malformed == (answer in ('the red one', 'D', '', 'A, none')), answer
    question = routing_question('Is there a red circle?', ['siglip', 'convnext', 'dinov2'], top_k=3)
    assert question.splitlines()[2:5] == [l for l in question.splitlines() if l[:3] in ('A. ', 'B. ', 'C. ')]
    assert question.endswith('\n\nQuestion:\nIs there a red circle?') and 'select the most 3 suitable' in question


def test_the_oracle_routes_each_factor_a_question_names_to_the_expert_the_probe_reads_it_best_with():
    """towers.oracle_experts (ablate.py's mova_oracle): colour, shape, size, texture, position, count, by their words."""
    import towers
    assert towers.question_factors('What color is the square on the left?') == ['color', 'shape', 'position']
    assert towers.question_factors('How many triangles are there?') == ['shape', 'count']
    assert towers.question_factors('Is there a red circle with checked texture in the image?') == [
        'color', 'shape', 'texture']
    assert towers.question_factors('Describe the image briefly.') == []
    probe = {'siglip': dict(color=90, shape=40, position=60, count=30, texture=25),
             'convnext': dict(color=80, shape=50, position=50, count=20, texture=60),
             'dinov2': dict(color=70, shape=30, position=95, count=40, texture=24)}
    experts = ['siglip', 'convnext', 'dinov2']
    assert towers.oracle_experts('What color is the square on the left?', probe, experts) == experts
    assert towers.oracle_experts('Is there a red circle?', probe, experts) == ['siglip', 'convnext']
    assert towers.oracle_experts('How many objects are there?', probe, experts) == ['dinov2']
    assert towers.oracle_experts('Describe the image briefly.', probe, experts) == []


def test_the_routing_prompt_grows_a_word_tokenizer_and_leaves_a_byte_level_one_alone(tokenizers):
    """mova.add_missing_words: the shapes world's word-level tokenizer reads the routing prompt's words as <unk> until
    they are appended (old ids unchanged, 'B' a word of its own, not inside 'Based'); byte-level BPE has no unknowns."""
    from mova import add_missing_words, routing_question
    prompt = routing_question('Is there a red circle?', ['siglip', 'convnext', 'dinov2'], top_k=3)
    words = shapes.build_word_tokenizer(['Is there a red circle?', 'Describe the image briefly.'])
    before, old_vocab = words('Is there a red circle?').input_ids, words.get_vocab()
    assert words.unk_token_id in words(prompt).input_ids
    added = add_missing_words(words, [prompt, 'B, C', 'none'])
    assert {'B', 'C', 'none', 'Based'} <= set(added) and words.unk_token_id not in words(prompt).input_ids
    assert words('Is there a red circle?').input_ids == before and all(words.get_vocab()[w] == i for w, i in old_vocab.items())
    assert words.convert_ids_to_tokens(words('Based on B').input_ids) == ['Based', 'on', 'B']
    byte_level = tokenizers['bpe']
    size = len(byte_level)
    assert add_missing_words(byte_level, [prompt]) == [] and len(byte_level) == size


def test_mova_runs_only_the_experts_its_batch_uses_and_answers_the_same(tokenizer_dir):
    """The routing pass (no expert) runs CLIP alone; an answer pass runs the experts some image chose. The skipped
    ones' zeros are weighed by exactly 0, so the visual tokens equal those of running every encoder."""
    torch.manual_seed(0)
    model = MoCHA(tiny_config(tokenizer_dir, connector='mova', mova_pool=1, mova_blocks=1)).eval()
    trained_looking(model.mova)
    calls = []
    hooks = [encoder.register_forward_hook(lambda module, args, out, name=name: calls.append(name))
             for name, encoder in model.encoders.encoders.items()]
    images, prompt = random_images(2), torch.randn(2, model.llm.config.hidden_size)
    every = dict(zip(model.encoders.encoders, model.encoders(images)))
    base = every.pop('clip')
    try:
        for mask, run in (([[0, 0, 0], [0, 0, 0]], ['clip']), ([[1, 0, 0], [0, 0, 1]], ['siglip', 'clip', 'dinov2'])):
            calls.clear()
            mask = torch.tensor(mask, dtype=torch.bool)
            with torch.no_grad():
                visual = model.encode_images(images, prompt_embeds=prompt, expert_mask=mask)[0]
                reference = model.mova(base, list(every.values()), prompt, mask)
            assert calls == run and torch.equal(visual, reference)
    finally:
        for hook in hooks:
            hook.remove()


def test_mova_in_mocha_trains_its_adapter_and_saves_it(tokenizer_dir, tmp_path):
    """connector='mova': the encoders and the LLM path are MoCHA's, the adapter replaces MoECs and HGA."""
    torch.manual_seed(0)
    model = MoCHA(tiny_config(tokenizer_dir, connector='mova', mova_pool=1, mova_blocks=1))
    assert not model.moecs and not model.hga.enabled and model.num_visual_tokens == 16
    model.set_trainable(stage=1)
    assert {n.split('.')[0] for n, p in model.named_parameters() if p.requires_grad} == {'mova'}
    ids, mask = batch_of([[3, IMAGE_TOKEN_ID, 8, 9], [3, 4, IMAGE_TOKEN_ID, 9]])
    model(ids, mask, ids.clamp(min=0), random_images(2))['loss'].backward()
    assert model.mova.projector[0].weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path / 'ckpt')
    loaded = MoCHA.from_pretrained(str(tmp_path / 'ckpt')).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, None, random_images(2))['logits'],
                                   model(ids, mask, None, random_images(2))['logits'], rtol=0, atol=0)


def test_channel_concat_ablation_uses_one_connector(tokenizer_dir):
    torch.manual_seed(0)
    model = MoCHA(tiny_config(tokenizer_dir, fusion='channel'))
    assert list(model.moecs) == ['channel'] and model.num_visual_tokens == 16
    visual, _, _ = model.encode_images(random_images(2))
    assert visual.shape == (2, 16, model.llm.config.hidden_size)


# =============================================================================
# data.py: templates, label masks, bad samples; shapes.py: the shapes world
# =============================================================================

CORPUS = [SYSTEM, "USER: What color is the circle? ASSISTANT: red", "How many squares are there? 2",
          "Is there a blue triangle in the image? Yes No", "a large red circle at the top left and a small square"] * 10
TWO_TURNS = [{'from': 'human', 'value': '<image>\nWhat color is the circle?'}, {'from': 'gpt', 'value': 'red'},
             {'from': 'human', 'value': 'How many squares are there?'}, {'from': 'gpt', 'value': '2'}]
CAPTION = [{'from': 'human', 'value': 'Describe the image briefly.\n<image>'},
           {'from': 'gpt', 'value': 'a large red circle at the top left'}]


@pytest.fixture(scope='module')
def word_tokenizer():
    return shapes.build_word_tokenizer(CORPUS + ['Describe the image briefly.'])


@pytest.fixture(scope='module')
def bpe_tokenizer():
    """GPT-2 / Phi-2 style: byte-level BPE, spaces belong to the next token, no bos."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token='<|endoftext|>')


@pytest.fixture(scope='module')
def llama_tokenizers(sp_llama_dir):
    """{legacy: tokenizer} for the Llama-style folder below, with `legacy` True and False: the two
    settings in the wild, which differ on the word after </s>."""
    tokenizers = {legacy: AutoTokenizer.from_pretrained(sp_llama_dir(legacy)) for legacy in (True, False)}
    assert [tokenizers[legacy].legacy for legacy in (True, False)] == [True, False]
    return tokenizers


@pytest.fixture(scope='module')
def tokenizers(word_tokenizer, bpe_tokenizer, llama_tokenizers):
    return {'word': word_tokenizer, 'bpe': bpe_tokenizer, 'llama': llama_tokenizers[True],
            'llama-nonlegacy': llama_tokenizers[False]}


@pytest.fixture(scope='module')
def sp_llama_dir(tmp_path_factory):
    """sp_llama_dir(legacy=False) -> path (str) of a Llama-2 / Vicuna-v1.5 style tokenizer folder as those
    ship: a SentencePiece BPE tokenizer.model trained here (byte fallback, dummy prefix, <unk> <s> </s> =
    0 1 2, 500 pieces) and a tokenizer_config.json naming LlamaTokenizer, and no tokenizer.json, so loading
    it converts the SentencePiece model (transformers needs sentencepiece + protobuf for that). One model,
    one folder per `legacy` value (False: transformers 5's default; True: a space-prefix after special
    tokens such as </s>). Under a second to build."""
    import io
    import sentencepiece
    model = io.BytesIO()
    corpus = CORPUS + ['Das Café hat 12 Kuchen.', 'Yes, it is red!', 'What is shown here?', 'A photo of two dogs.']
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 5), model_writer=model, vocab_size=500, model_type='bpe',
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, normalization_rule_name='identity', unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    folders = {}

    def build(legacy=False):
        if legacy not in folders:
            folder = tmp_path_factory.mktemp(f'sp_llama_legacy_{legacy}')
            (folder / 'tokenizer.model').write_bytes(model.getvalue())
            (folder / 'tokenizer_config.json').write_text(json.dumps(dict(
                tokenizer_class='LlamaTokenizer', bos_token='<s>', eos_token='</s>', unk_token='<unk>',
                add_bos_token=True, add_eos_token=False, legacy=legacy)))
            folders[legacy] = str(folder)
        return folders[legacy]
    return build


@pytest.mark.parametrize('legacy', [False, True])
def test_a_llama_folder_with_only_tokenizer_model_loads_the_way_mocha_loads_it(sp_llama_dir, legacy, tmp_path):
    """Vicuna-7B v1.5 and Llama-2 ship tokenizer.model, no tokenizer.json. Loaded as MoCHA (and so train.py
    and eval.py) loads config.tokenizer, it must encode exactly as SentencePiece itself does, <s> first,
    decode back to the text, and travel with a checkpoint unchanged."""
    import sentencepiece
    folder = sp_llama_dir(legacy)
    assert sorted(os.listdir(folder)) == ['tokenizer.model', 'tokenizer_config.json']
    torch.manual_seed(0)
    model = MoCHA(tiny_config(folder))
    tokenizer = model.tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, 'tokenizer.model'))
    texts = ['What color is the circle?', 'a large red circle\nat the top left', 'Das Café hat 12 Kuchen, 3 €.']
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text)                          # <s>, then SentencePiece's ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode('€', add_special_tokens=False)) == [
        '▁', '<0xE2>', '<0x82>', '<0xAC>']                                      # byte fallback, after the prefix
    # the dummy prefix: a text's first word is the word it would be after a space
    assert tokenizer.tokenize('circle')[0].startswith('▁')
    assert tokenizer.tokenize('circle') == tokenizer.tokenize('the circle')[len(tokenizer.tokenize('the')):]
    # legacy: whether the word right after a special token (an answer's </s>, then "USER") gets a '▁' too
    assert tokenizer.tokenize('</s>USER')[1].startswith('▁') == legacy
    assert model.llm.config.vocab_size == len(tokenizer) == 500
    model.save_pretrained(tmp_path / 'ckpt')
    reloaded = MoCHA.from_pretrained(tmp_path / 'ckpt').tokenizer
    assert [reloaded.encode(t) for t in texts + ['</s>USER']] == [tokenizer.encode(t) for t in texts + ['</s>USER']]


# -----------------------------------------------------------------------------
# the released preprocessing, re-typed plainly for one sample: the reference our templates must equal

def released_tokenizer_image_token(prompt, tokenizer):
    """llava/mm_utils.py tokenizer_image_token: encode the text between '<image>'s one chunk at a time,
    keep the first chunk's bos and drop every later chunk's first token (its bos)."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split('<image>')]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    input_ids = chunks[0]
    for chunk in chunks[1:]:
        input_ids = input_ids + [IMAGE_TOKEN_ID] + chunk[offset:]
    return input_ids


def released_preprocess(conversations, tokenizer, template, has_image):
    """LLaVA-1.5 train.py preprocess_multimodal + preprocess_plain / preprocess_v1 (vicuna_v1) and MoCHA's
    moec_train.py preprocess_phi, for one sample: (input_ids, labels, mismatch). mismatch is the released
    "tokenization mismatch" case, in which it masks the whole sample. The released code counts the
    sequence's length as its non-pad tokens; one sample has no padding, so that is its length here."""
    conversations = copy.deepcopy(conversations)
    if has_image:  # preprocess_multimodal
        for turn in conversations:
            if '<image>' in turn['value']:
                turn['value'] = ('<image>\n' + turn['value'].replace('<image>', '').strip()).strip()
    tokenize = ((lambda text: released_tokenizer_image_token(text, tokenizer)) if has_image
                else (lambda text: tokenizer(text).input_ids))
    if template == 'plain':
        input_ids = released_tokenizer_image_token('<image>' + conversations[1]['value'] + '\n', tokenizer)
        masked = len(released_tokenizer_image_token('<image>', tokenizer))
        return input_ids, [IGNORE_INDEX] * masked + input_ids[masked:], False
    eos = tokenizer.eos_token
    prompt = SYSTEM + ' '  # conversation.py, SeparatorStyle.TWO: sep ' ', sep2 eos
    for i, turn in enumerate(conversations):
        role = ('USER', 'ASSISTANT')[i % 2]
        prompt += f"{role}: {turn['value']}{(' ', eos)[i % 2]}" if turn['value'] else f"{role}:"
    input_ids = tokenize(prompt)
    labels, sep = list(input_ids), ' ASSISTANT: '
    cur_len = 1 if template == 'vicuna_v1' else 0  # vicuna skips its bos; phi has none
    labels[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, round_text in enumerate(prompt.split(eos)):
        parts = round_text.split(sep)
        if round_text == '' or len(parts) != 2:
            break
        if template == 'vicuna_v1':
            round_len, instruction_len = len(tokenize(round_text)), len(tokenize(parts[0] + sep)) - 2
            if i != 0 and not tokenizer.legacy:  # IS_TOKENIZER_GREATER_THAN_0_14 holds for us
                round_len, instruction_len = round_len - 1, instruction_len - 1
        else:
            round_len, instruction_len = len(tokenize(round_text)) + 1, len(tokenize(parts[0] + sep)) - 1
        for j in range(cur_len, min(cur_len + max(instruction_len, 0), len(labels))):
            labels[j] = IGNORE_INDEX
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * max(len(labels) - cur_len, 0)
    mismatch = cur_len != len(input_ids)
    return input_ids, [IGNORE_INDEX] * len(labels) if mismatch else labels, mismatch


def llava_conversations(seed=0, count=30):
    """LLaVA-format conversations as the data has them: <image> first, last or mid-text, 1-3 rounds,
    text-only samples, unicode and digits, answers ending in punctuation or whitespace."""
    rng = random.Random(seed)
    questions = ['What color is the circle?', 'How many squares are there?', 'Is there a blue triangle?',
                 'Describe the café in 2 words.', 'Wie viele Äpfel? 日本', 'What is 12 + 30?', 'Why?  ']
    answers = ['red', '2', 'Yes', 'No.', 'A small café, 12 cakes!', '42', 'Because it is red. ', 'yes\n',
               'Der Apfel ist grün 🍏', '3.14']
    samples = []
    for k in range(count):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{'from': 'human', 'value': rng.choice(questions)}, {'from': 'gpt', 'value': rng.choice(answers)}]
        has_image = k % 5 != 4  # every fifth sample is text-only
        if has_image:
            question = turns[0]['value']
            turns[0]['value'] = rng.choice([f'<image>\n{question}', f'{question}\n<image>', f'{question} <image>',
                                            f'Look: <image> {question}', f'  <image>{question}'])
        samples.append((turns, has_image))
    return samples


def learned_text(input_ids, labels, tokenizer):
    return tokenizer.decode([label for label in labels if label != IGNORE_INDEX])


# -----------------------------------------------------------------------------
# templates and label masks

@pytest.mark.parametrize('template, tokenizer_name', [
    ('phi', 'bpe'), ('plain', 'bpe'), ('vicuna_v1', 'llama'), ('vicuna_v1', 'llama-nonlegacy'), ('plain', 'llama'),
    ('plain', 'llama-nonlegacy'), ('phi', 'llama')])  # the last: the released Vicuna script passes --version phi
def test_templates_equal_the_released_preprocessing_token_for_token(template, tokenizer_name, tokenizers):
    """The same conversation gives the released input_ids and labels on real sub-word mechanics
    (byte-level BPE as Phi-2; SentencePiece with byte fallback and dummy prefix as Llama-2, legacy on
    and off). Where the released masking reports a mismatch (it then learns nothing from the sample),
    ours must still learn exactly the answers."""
    tokenizer = tokenizers[tokenizer_name]
    eos = tokenizer.eos_token
    samples = llava_conversations()
    if template == 'plain':
        samples = [([{'from': 'human', 'value': turns[0]['value']}, turns[1]], True) for turns, image in samples if image]
    exact = 0
    for conversations, has_image in samples:
        ours = data.tokenize_conversation(conversations, tokenizer, template)
        released_ids, released_labels, mismatch = released_preprocess(conversations, tokenizer, template, has_image)
        assert ours[0] == released_ids, conversations
        if not mismatch:
            assert ours[1] == released_labels, conversations
            exact += 1
        answers = [turn['value'] for turn in conversations[1::2]]
        expected = answers[0] + '\n' if template == 'plain' else ''.join(f' {a}{eos}' for a in answers)
        assert ''.join(learned_text(*ours, tokenizer).split()) == ''.join(expected.split())
    # the released masking is right on Phi-2's BPE and on legacy Llama for all of these; non-legacy
    # Llama breaks it on multi-round samples, as it does on real Vicuna vocabularies
    one_round = sum(len(c) == 2 for c, _ in samples)
    if template == 'phi' and tokenizer_name == 'llama':
        # phi's offsets count a bos in every round: right on the first, one off after it
        assert exact == one_round < len(samples)
    elif template == 'plain' or tokenizer_name == 'bpe' or tokenizer.legacy:
        assert exact == len(samples)
    else:  # non-legacy Llama: the released one-token shift fits Llama-2's own pieces, not this vocabulary's
        assert exact == one_round < len(samples)


@pytest.mark.parametrize('template, tokenizer_name', [('phi', 'bpe'), ('vicuna_v1', 'llama'), ('vicuna_v1', 'llama-nonlegacy')])
def test_mova_routing_turn_is_token_exact_and_its_prompt_is_the_training_prompt(template, tokenizer_name, tokenizers):
    """MoVA's routing conversation (the routing prompt over the image, answered with letters) through our templates
    gives the released preprocessing's tokens and learns the letters; eval's routing pass prompts with its prefix."""
    from mova import routing_question
    tokenizer = tokenizers[tokenizer_name]
    routing = '<image>\n' + routing_question('Is the red object a circle?\nAnswer the question using a single word '
                                             'or phrase.', ['siglip', 'convnext', 'dinov2'], top_k=3)
    for answer in ('A, C', 'none'):
        conversations = [{'from': 'human', 'value': routing}, {'from': 'gpt', 'value': answer}]
        input_ids, labels = data.tokenize_conversation(conversations, tokenizer, template)
        released_ids, released_labels, mismatch = released_preprocess(conversations, tokenizer, template, True)
        assert input_ids == released_ids and not mismatch and labels == released_labels
        first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert data.build_prompt(routing, tokenizer, template) == input_ids[:first_learned]
        assert ''.join(learned_text(input_ids, labels, tokenizer).split()) == ''.join((answer + tokenizer.eos_token).split())


@pytest.mark.parametrize('legacy', [True, False])
def test_image_goes_first_and_the_text_after_it_is_its_own_chunk(legacy, llama_tokenizers, bpe_tokenizer):
    """preprocess_multimodal moves <image> to the front of its turn; tokenizer_image_token encodes the text
    after it alone, so SentencePiece gives it a dummy prefix: '▁', '<0x0A>', ... and '▁The' for a caption."""
    llama_tokenizer = llama_tokenizers[legacy]
    image_last = [{'from': 'human', 'value': 'What color is the circle?\n<image>'}, {'from': 'gpt', 'value': 'red'}]
    image_first = [{'from': 'human', 'value': '<image>\nWhat color is the circle?'}, {'from': 'gpt', 'value': 'red'}]
    for template in ('phi', 'vicuna_v1'):
        assert (data.tokenize_conversation(image_last, llama_tokenizer, template)
                == data.tokenize_conversation(image_first, llama_tokenizer, template))
    input_ids, _ = data.tokenize_conversation(image_last, llama_tokenizer, 'vicuna_v1')
    after_image = llama_tokenizer.convert_ids_to_tokens(input_ids[input_ids.index(IMAGE_TOKEN_ID) + 1:][:3])
    assert after_image[:2] == ['▁', '<0x0A>'] and after_image[2].startswith('W')
    caption = [{'from': 'human', 'value': '<image>'}, {'from': 'gpt', 'value': 'The cat.'}]
    input_ids, labels = data.tokenize_conversation(caption, llama_tokenizer, 'plain')
    assert input_ids[:2] == [llama_tokenizer.bos_token_id, IMAGE_TOKEN_ID] and labels[:2] == [IGNORE_INDEX] * 2
    assert llama_tokenizer.convert_ids_to_tokens(input_ids[2]) == '▁The'
    input_ids, _ = data.tokenize_conversation(caption, bpe_tokenizer, 'plain')  # BPE: no bos, no prefix
    assert input_ids[0] == IMAGE_TOKEN_ID and bpe_tokenizer.decode(input_ids[1:]) == 'The cat.\n'


@pytest.mark.parametrize('legacy', [True, False])
def test_the_word_after_eos_follows_the_tokenizers_legacy_setting(legacy, llama_tokenizers):
    llama_tokenizer = llama_tokenizers[legacy]
    input_ids, labels = data.tokenize_conversation(TWO_TURNS, llama_tokenizer, 'vicuna_v1')
    tokens = llama_tokenizer.convert_ids_to_tokens([i for i in input_ids if i != IMAGE_TOKEN_ID])
    after_eos = tokens[tokens.index('</s>') + 1]
    assert after_eos.startswith('▁') == llama_tokenizer.legacy  # legacy: '▁U...'; not legacy: 'U...'
    assert input_ids[0] == llama_tokenizer.bos_token_id and input_ids.count(llama_tokenizer.bos_token_id) == 1
    assert learned_text(input_ids, labels, llama_tokenizer) == 'red</s> 2</s>'  # decode drops the first space


def test_bpe_phi_learns_answers_and_eos(bpe_tokenizer):
    input_ids, labels = data.tokenize_conversation(TWO_TURNS, bpe_tokenizer, 'phi')
    assert learned_text(input_ids, labels, bpe_tokenizer) == ' red<|endoftext|> 2<|endoftext|>'
    assert labels[-1] == bpe_tokenizer.eos_token_id
    prompt = [i for i, label in zip(input_ids, labels) if label == IGNORE_INDEX]
    text = bpe_tokenizer.decode([i for i in prompt if i != IMAGE_TOKEN_ID])
    assert text == SYSTEM + ' USER: \nWhat color is the circle? ASSISTANT:USER: How many squares are there? ASSISTANT:'


@pytest.mark.parametrize('message', ['the answer is red ASSISTANT: blue', 'a literal EOS here'])
def test_deviation_template_text_inside_a_message_still_learns_the_answers(message, llama_tokenizers, bpe_tokenizer):
    """The released masking splits the joined text at ' ASSISTANT: ' and at the eos text, so a message that
    contains either masks the whole sample (or shifts it). Character offsets do not care."""
    for tokenizer, template in ((bpe_tokenizer, 'phi'), (llama_tokenizers[True], 'vicuna_v1'),
                                (llama_tokenizers[False], 'vicuna_v1')):
        eos = tokenizer.eos_token
        answer = message.replace('EOS', eos)
        conversations = [{'from': 'human', 'value': '<image>\nWhat color?'}, {'from': 'gpt', 'value': answer},
                         {'from': 'human', 'value': 'Sure?'}, {'from': 'gpt', 'value': 'Yes'}]
        input_ids, labels = data.tokenize_conversation(conversations, tokenizer, template)
        released_ids, released_labels, mismatch = released_preprocess(conversations, tokenizer, template, True)
        assert input_ids == released_ids
        assert mismatch or labels != released_labels  # the released masking gets this sample wrong
        assert ''.join(learned_text(input_ids, labels, tokenizer).split()) == ''.join(f'{answer}{eos}Yes{eos}'.split())


def test_deviation_an_empty_answer_learns_its_eos(bpe_tokenizer):
    """The released template writes an empty answer as 'ASSISTANT:' with no eos, so the model never learns
    to stop there; we write 'ASSISTANT:' + eos and learn the eos."""
    conversations = [{'from': 'human', 'value': '<image>\nSay nothing.'}, {'from': 'gpt', 'value': ''}]
    input_ids, labels = data.tokenize_conversation(conversations, bpe_tokenizer, 'phi')
    assert [label for label in labels if label != IGNORE_INDEX] == [bpe_tokenizer.eos_token_id]
    assert bpe_tokenizer.decode(input_ids[-2:]) == ':<|endoftext|>'


@pytest.mark.parametrize('tokenizer_name', ['word', 'bpe', 'llama', 'llama-nonlegacy'])
@pytest.mark.parametrize('template', ['plain', 'phi', 'vicuna_v1'])
def test_build_prompt_is_the_training_prompt(tokenizer_name, template, tokenizers):
    tokenizer = tokenizers[tokenizer_name]
    for conversations, _ in llava_conversations(count=10):
        conversations = conversations[:2]
        if template == 'plain' and '<image>' not in conversations[0]['value']:
            continue
        input_ids, labels = data.tokenize_conversation(conversations, tokenizer, template)
        first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompt = data.build_prompt(conversations[0]['value'], tokenizer, template)
        assert prompt == input_ids[:first_learned]
        if template == 'plain':
            assert prompt == input_ids[:1 + (tokenizer.bos_token_id is not None and input_ids[0] == tokenizer.bos_token_id)]


def test_phi_label_mask_token_by_token_on_word_tokenizer(word_tokenizer):
    vocab = word_tokenizer.get_vocab()
    eos = word_tokenizer.eos_token_id
    ids = lambda text: [vocab[w] for w in text.split()]
    system = ids("A chat between a curious user and an artificial intelligence assistant . The assistant gives "
                 "helpful , detailed , and polite answers to the user ' s questions .")
    prompt1 = system + ids('USER :') + [IMAGE_TOKEN_ID] + ids('What color is the circle ? ASSISTANT :')
    prompt2 = ids('USER : How many squares are there ? ASSISTANT :')
    expected_ids = prompt1 + ids('red') + [eos] + prompt2 + ids('2') + [eos]
    expected_labels = ([IGNORE_INDEX] * len(prompt1) + ids('red') + [eos]
                       + [IGNORE_INDEX] * len(prompt2) + ids('2') + [eos])
    for template in ('phi', 'vicuna_v1'):  # same text; the eos is the tokenizer's
        assert data.tokenize_conversation(TWO_TURNS, word_tokenizer, template) == (expected_ids, expected_labels)


def test_plain_learns_caption_only_on_word_tokenizer(word_tokenizer):
    vocab = word_tokenizer.get_vocab()
    caption = [vocab[w] for w in 'a large red circle at the top left'.split()]
    input_ids, labels = data.tokenize_conversation(CAPTION, word_tokenizer, 'plain')
    assert input_ids == [IMAGE_TOKEN_ID] + caption  # human text dropped; '\n' is whitespace to a word tokenizer
    assert labels == [IGNORE_INDEX] + caption


def test_text_only_conversation_has_no_placeholder(word_tokenizer):
    conversations = [{'from': 'human', 'value': 'How many squares are there?'}, {'from': 'gpt', 'value': '2'}]
    input_ids, labels = data.tokenize_conversation(conversations, word_tokenizer, 'phi')
    assert IMAGE_TOKEN_ID not in input_ids
    assert [label for label in labels if label != IGNORE_INDEX] == [word_tokenizer.get_vocab()['2'],
                                                                   word_tokenizer.eos_token_id]


@pytest.mark.parametrize('conversations, problem', [
    ([], 'empty conversation'),
    ([{'from': 'gpt', 'value': 'red'}, {'from': 'human', 'value': 'What?'}], 'turns are not human/gpt'),
    ([{'from': 'human', 'value': '<image> <image>'}, {'from': 'gpt', 'value': 'red'}], 'more than one <image>'),
    ([{'from': 'human', 'value': 'What?'}, {'from': 'gpt', 'value': 'red'},
      {'from': 'human', 'value': 'x <image>'}, {'from': 'gpt', 'value': 'y'}], 'not in the first'),
])
def test_malformed_conversations_are_rejected(conversations, problem, word_tokenizer):
    with pytest.raises(ValueError, match=problem):
        data.tokenize_conversation(conversations, word_tokenizer, 'phi')


# -----------------------------------------------------------------------------
# images

def test_load_image_pads_with_the_mean_colour(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(10, 30, 3), dtype=np.uint8)  # 30 wide, 10 high
    Image.fromarray(pixels).save(tmp_path / 'wide.png')
    image = data.load_image(str(tmp_path / 'wide.png'), 30)
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 30)
    pad = torch.tensor(data.PAD_COLOR, dtype=torch.uint8).view(3, 1, 1)
    assert (image[:, :10] == pad).all() and (image[:, 20:] == pad).all()  # the border bands
    assert torch.equal(image[:, 10:20].permute(1, 2, 0), torch.from_numpy(pixels))  # centred, untouched
    small = data.load_image(str(tmp_path / 'wide.png'), 16)
    assert small.shape == (3, 16, 16) and torch.equal(small[:, 0, 0], pad.view(3))
    # stage 1's 'crop' (CLIP's image processor): the short side to the size, then the centre; no padding
    cropped = data.load_image(str(tmp_path / 'wide.png'), 10, aspect='crop')
    assert torch.equal(cropped.permute(1, 2, 0), torch.from_numpy(pixels[:, 10:20]))


def test_load_image_errors_name_the_path(tmp_path):
    (tmp_path / 'garbage.jpg').write_bytes(b'\xff\xd8\xff not a jpeg at all' * 10)
    for name in ('garbage.jpg', 'missing.png'):
        with pytest.raises(OSError, match=name):
            data.load_image(str(tmp_path / name), 16)


# -----------------------------------------------------------------------------
# LLaVADataset, bad samples, truncation, collate

def human_gpt(question, answer):
    return [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': answer}]


BAD_AT_INIT = {  # id -> (sample, the reason counted in dataset.skipped)
    'missing': ({'image': 'nowhere.png', 'conversations': human_gpt('<image>\nWhat color?', 'red')},
                'image file not found'),
    'orphan_token': ({'conversations': human_gpt('<image>\nWhat color?', 'red')},
                     '<image> in the text but the sample has no image'),
    'empty': ({'image': 'good.png', 'conversations': []}, 'empty conversation'),
    'two_images': ({'image': 'good.png', 'conversations': human_gpt('<image> <image>\nWhat color?', 'red')},
                   'more than one <image>'),
}
BAD_AT_LOAD = {  # id -> (sample, words of the error)
    'corrupt': ({'image': 'corrupt.jpg', 'conversations': human_gpt('<image>\nWhat color?', 'red')},
                'unreadable image'),
    'long': ({'image': 'good.png', 'conversations': human_gpt('<image>\n' + 'What color ? ' * 20, 'red')},
             'too long'),
}
GOOD = {
    'good': {'image': 'good.png', 'conversations': human_gpt('<image>\nWhat color is the circle?', 'red')},
    'text': {'conversations': human_gpt('How many squares are there?', '2')},
    'no_token': {'image': 'good.png', 'conversations': human_gpt('What color is the circle?', 'red')},
}
MAX_LENGTH, NUM_VISUAL_TOKENS, IMAGE_SIZE = 64, 8, 16


def write_dataset(folder, samples):
    Image.fromarray(np.full((12, 20, 3), 200, dtype=np.uint8)).save(folder / 'good.png')
    (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4)  # a JPEG header, then junk
    with open(folder / 'train.json', 'w') as f:
        json.dump([dict(sample, id=sample_id) for sample_id, sample in samples.items()], f)
    return str(folder / 'train.json')


def make_dataset(folder, samples, tokenizer, on_bad_sample='skip', max_length=MAX_LENGTH):
    return data.LLaVADataset(write_dataset(folder, samples), str(folder), tokenizer, 'phi', IMAGE_SIZE,
                             max_length, NUM_VISUAL_TOKENS, on_bad_sample=on_bad_sample)


def test_bad_samples_are_skipped_and_counted(tmp_path, word_tokenizer):
    samples = dict(GOOD, **{k: s for k, (s, _) in BAD_AT_INIT.items()}, **{k: s for k, (s, _) in BAD_AT_LOAD.items()})
    dataset = make_dataset(tmp_path, samples, word_tokenizer)
    assert dataset.skipped == {reason: 1 for _, reason in BAD_AT_INIT.values()}
    assert dataset.image_token_added == 1  # 'no_token' got '<image>\n' in front (a deliberate deviation)
    assert [s['id'] for s in dataset.samples] == ['good', 'text', 'no_token', 'corrupt', 'long']
    items = [dataset[i] for i in range(len(dataset))]
    assert items[3] is None and items[4] is None  # found at load time
    assert items[2]['input_ids'].tolist().count(IMAGE_TOKEN_ID) == 1
    batch = data.collate(items, word_tokenizer.pad_token_id, IMAGE_SIZE)
    assert batch['num_skipped'] == 2 and batch['ids'] == ['good', 'text', 'no_token']
    assert batch['images'].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)  # 'good' and 'no_token'; 'text' has none


def test_plain_dataset_shows_every_image_and_skips_text_only_samples(tmp_path, word_tokenizer):
    dataset = data.LLaVADataset(write_dataset(tmp_path, GOOD), str(tmp_path), word_tokenizer, 'plain', IMAGE_SIZE,
                                MAX_LENGTH, NUM_VISUAL_TOKENS)
    assert dataset.skipped == {'plain template needs an image': 1} and dataset.image_token_added == 1
    for item in (dataset[0], dataset[1]):  # 'good', and 'no_token' with its image put first
        assert item['input_ids'][0] == IMAGE_TOKEN_ID and item['labels'][0] == IGNORE_INDEX


@pytest.mark.parametrize('sample_id', list(BAD_AT_INIT))
def test_bad_sample_at_init_is_an_error_naming_it(sample_id, tmp_path, word_tokenizer):
    sample, reason = BAD_AT_INIT[sample_id]
    with pytest.raises(ValueError) as error:
        make_dataset(tmp_path, dict(GOOD, **{sample_id: sample}), word_tokenizer, on_bad_sample='error')
    message = str(error.value)
    assert repr(sample_id) in message and 'train.json' in message and reason in message
    if 'image' in sample:
        assert sample['image'] in message


@pytest.mark.parametrize('sample_id', list(BAD_AT_LOAD))
def test_bad_sample_at_load_is_an_error_naming_it(sample_id, tmp_path, word_tokenizer):
    sample, words = BAD_AT_LOAD[sample_id]
    dataset = make_dataset(tmp_path, {sample_id: sample}, word_tokenizer, on_bad_sample='error')
    with pytest.raises(ValueError) as error:
        dataset[0]
    assert repr(sample_id) in str(error.value) and sample['image'] in str(error.value) and words in str(error.value)


def test_truncation_cuts_the_tail_and_keeps_the_placeholder(tmp_path, word_tokenizer):
    turns = human_gpt('<image>\nWhat color is the circle?', 'red') + human_gpt('How many squares are there?', '2') * 3
    full_ids, _ = data.tokenize_conversation(turns, word_tokenizer, 'phi')
    max_length = len(full_ids) - 5 + NUM_VISUAL_TOKENS - 1  # 5 positions short once the image is spliced in
    item = make_dataset(tmp_path, {'multi': {'image': 'good.png', 'conversations': turns}}, word_tokenizer,
                        max_length=max_length)[0]
    input_ids, labels = item['input_ids'].tolist(), item['labels'].tolist()
    assert len(input_ids) - 1 + NUM_VISUAL_TOKENS == max_length
    assert input_ids == full_ids[:len(input_ids)] and input_ids.count(IMAGE_TOKEN_ID) == 1
    assert word_tokenizer.get_vocab()['red'] in labels
    # two positions less and the first answer no longer fits after the prompt and image: a bad sample
    tight = len(full_ids[:full_ids.index(word_tokenizer.get_vocab()['red'])]) - 1 + NUM_VISUAL_TOKENS
    assert make_dataset(tmp_path, {'multi': {'image': 'good.png', 'conversations': turns}}, word_tokenizer,
                        max_length=tight)[0] is None


def test_length_grouped_batches_hold_samples_of_about_the_same_length():
    """train.py's group_by_length: each batch is a slice of one group of batches sorted longest first, every
    sample of the whole batches is kept once, the batches are shuffled, and the padding is much less."""
    rng = torch.Generator().manual_seed(0)
    lengths = {i: int(n) for i, n in enumerate(torch.randint(5, 300, (1000,), generator=rng))}
    order = torch.randperm(1000, generator=rng).tolist()
    grouped = data.length_grouped(order, lengths, 16, 10, torch.Generator().manual_seed(1))
    assert grouped == data.length_grouped(order, lengths, 16, 10, torch.Generator().manual_seed(1))
    whole = 1000 // 16 * 16
    assert sorted(grouped) == sorted(order[:whole])
    batches = [grouped[b:b + 16] for b in range(0, whole, 16)]
    expected = []
    for start in range(0, whole, 160):  # groups of 10 batches, the last one of 2
        group = sorted(order[start:min(start + 160, whole)], key=lambda i: -lengths[i])
        expected += [group[b:b + 16] for b in range(0, len(group), 16)]
    assert sorted(batches) == sorted(expected) and batches != expected
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded(batches) < 0.7 * padded([order[b:b + 16] for b in range(0, whole, 16)])
    # no generator (sort_micro_batches): each group's batches stay in order, so a group is one optimizer step's
    # micro-batches, longest first, holding that step's samples
    in_order = data.length_grouped(order, lengths, 16, 2)
    assert in_order == [i for start in range(0, whole, 32)
                        for i in sorted(order[start:min(start + 32, whole)], key=lambda i: -lengths[i])]


def test_collate_pads_right_and_masks(word_tokenizer):
    pad = word_tokenizer.pad_token_id
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    batch = [dict(id='a', input_ids=torch.tensor([5, IMAGE_TOKEN_ID, 6, 7]), labels=torch.tensor([-100, -100, 6, 7]),
                  image=image),
             None,
             dict(id='b', input_ids=torch.tensor([8, 9]), labels=torch.tensor([-100, 9]), image=None)]
    out = data.collate(batch, pad, IMAGE_SIZE)
    assert out['input_ids'].tolist() == [[5, IMAGE_TOKEN_ID, 6, 7], [8, 9, pad, pad]]
    assert out['attention_mask'].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out['labels'].tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert out['images'].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and out['images'].dtype == torch.uint8
    assert out['ids'] == ['a', 'b'] and out['num_skipped'] == 1
    text_only = data.collate(batch[2:], pad, IMAGE_SIZE)
    assert text_only['images'].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


# -----------------------------------------------------------------------------
# the shapes world

SMALL = dict(num_train_images=30, num_pope_images=12, num_gqa_images=8, num_mme_images=3, num_text_conversations=30,
             num_lab_train_images=6, num_lab_pope_images=3, num_lab_gqa_images=3)


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('shapes')
    shapes.prepare_shapes(str(out_dir), seed=0, **SMALL)
    return out_dir


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_prepare_shapes_is_deterministic_and_complete(shapes_dir, tmp_path):
    shapes.prepare_shapes(str(tmp_path / 'again'), seed=0, **SMALL)
    files = all_files(shapes_dir)
    assert files == all_files(tmp_path / 'again')
    assert all(filecmp.cmp(shapes_dir / f, tmp_path / 'again' / f, shallow=False) for f in files)
    expected = ['pretrain.json', 'instruct.json', 'text.json', 'tokenizer/tokenizer.json', 'eval/pope/llava_pope_test.jsonl',
                'eval/gqa/llava_gqa_testdev_balanced.jsonl', 'eval/gqa/llava_gqa_testdev_balanced_words.jsonl',
                'eval/gqa/testdev_balanced_questions.json', 'eval/mme/llava_mme.jsonl']
    expected += [f'eval/pope/coco/coco_pope_{split}.json' for split in ('random', 'popular', 'adversarial')]
    expected += [f'eval/mme/MME_Benchmark_release_version/{subtask}/{kind}/0000.{ext}'
                 for subtask in ('existence', 'count', 'position', 'color')
                 for kind, ext in (('images', 'png'), ('questions_answers_YN', 'txt'))]
    expected += ['images/lab_000000.png', 'eval/lab/pope/llava_pope_test.jsonl', 'eval/lab/pope/val2014/pope_00000.png',
                 'eval/lab/gqa/llava_gqa_testdev_balanced.jsonl', 'eval/lab/gqa/testdev_balanced_questions.json']
    expected += [f'eval/lab/pope/coco/coco_pope_{split}.json' for split in ('random', 'popular', 'adversarial')]
    assert set(expected) <= set(files)
    shapes.prepare_shapes(str(tmp_path / 'other'), seed=1, **SMALL)
    assert not filecmp.cmp(shapes_dir / 'pretrain.json', tmp_path / 'other' / 'pretrain.json', shallow=False)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_shapes_images_show_their_scenes():
    """Every object sits centred in its own cell in its colour; empty cells are plain background."""
    rng = random.Random(0)
    for _ in range(20):
        scene, background = shapes.sample_scene(rng, 64), rng.randint(20, 60)
        pixels = np.asarray(shapes.draw_scene(scene, 64, background)).astype(int)  # [64, 64, 3]
        centres = {(row, col): pixels[int((row + 0.5) * 64 / 3), int((col + 0.5) * 64 / 3)]
                   for row in range(3) for col in range(3)}
        for obj in scene:
            assert np.abs(centres.pop((obj['row'], obj['col'])) - shapes.COLORS[obj['color']]).max() <= 2, obj
        assert all(np.abs(pixel - background).max() <= 2 for pixel in centres.values())
        assert len({(o['row'], o['col']) for o in scene}) == len(scene)


def test_shapes_training_data_loads_through_the_dataset(shapes_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(shapes_dir / 'tokenizer'))
    for name, template in (('pretrain.json', 'plain'), ('instruct.json', 'phi')):
        dataset = data.LLaVADataset(str(shapes_dir / name), str(shapes_dir / 'images'), tokenizer, template,
                                    IMAGE_SIZE, 512, NUM_VISUAL_TOKENS, on_bad_sample='error')
        items = [dataset[i] for i in range(len(dataset))]
        assert not dataset.skipped and dataset.image_token_added == 0 and None not in items
        assert all(tokenizer.unk_token_id not in item['input_ids'] for item in items)  # vocabulary covers all
    assert sum(item['image'] is None for item in items) >= 1  # instruct has text-only samples


def test_shapes_tokenizer_round_trips(shapes_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(shapes_dir / 'tokenizer'))
    sentence = 'Is there a red circle in the image? Please answer yes or no.'
    ids = tokenizer.encode(sentence)
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == sentence
    assert tokenizer.eos_token == '<|endoftext|>' and tokenizer.pad_token_id is not None
    for answer in ('Yes', 'No', 'red', '2', 'top left'):
        assert tokenizer.decode(tokenizer.encode(answer) + [tokenizer.eos_token_id], skip_special_tokens=True) == answer


def test_shapes_pope_files(shapes_dir):
    questions = read_jsonl(shapes_dir / 'eval/pope/llava_pope_test.jsonl')
    assert len({q['question_id'] for q in questions}) == len(questions)
    positives = {}
    for split in ('random', 'popular', 'adversarial'):
        labels = read_jsonl(shapes_dir / f'eval/pope/coco/coco_pope_{split}.json')
        split_questions = [q for q in questions if q['category'] == split]
        assert [a['question_id'] for a in labels] == [q['question_id'] for q in split_questions]  # same order
        assert [a['label'] for a in labels].count('yes') == [a['label'] for a in labels].count('no')
        assert all(q['text'] == a['text'] + shapes.SHORT_ANSWER for q, a in zip(split_questions, labels))
        positives[split] = [(a['image'], a['text']) for a in labels if a['label'] == 'yes']
        negatives = {(a['image'], a['text']) for a in labels if a['label'] == 'no'}
        assert not negatives & set(positives[split])
    assert positives['random'] == positives['popular'] == positives['adversarial']


def test_shapes_gqa_and_mme_files(shapes_dir):
    questions = read_jsonl(shapes_dir / 'eval/gqa/llava_gqa_testdev_balanced.jsonl')
    with open(shapes_dir / 'eval/gqa/testdev_balanced_questions.json') as f:
        gold = json.load(f)
    assert [q['question_id'] for q in questions] == list(gold)
    for q in questions:
        entry = gold[q['question_id']]
        assert q['image'] == entry['imageId'] + '.png' and q['text'] == entry['question'] + shapes.SHORT_ANSWER
        assert (entry['answer'] in ('yes', 'no')) == (entry['types']['structural'] == 'verify')
    mme_root = shapes_dir / 'eval/mme/MME_Benchmark_release_version'
    mme = read_jsonl(shapes_dir / 'eval/mme/llava_mme.jsonl')
    assert len({q['question_id'] for q in mme}) == len(mme) == 4 * 3 * 2
    for q in mme:
        subtask, _, file = q['image'].split('/')
        assert q['category'] == subtask and (mme_root / q['image']).is_file()
        with open(mme_root / subtask / 'questions_answers_YN' / file.replace('.png', '.txt')) as f:
            lines = [line.rstrip('\n').split('\t') for line in f]
        assert [answer for _, answer in lines] == ['Yes', 'No']
        assert q['text'] in [question for question, _ in lines] and q['text'].endswith(' Please answer yes or no.')


def test_shapes_gqa_in_words_asks_the_same_questions_about_the_same_scenes(shapes_dir):
    """The text step's benchmark: each GQA question again, its image replaced by the scene in words, which are
    read back here from the scene graph (cell from the box centre, 3x3 grid of the 64 px image)."""
    questions = read_jsonl(shapes_dir / 'eval/gqa/llava_gqa_testdev_balanced.jsonl')
    in_words = read_jsonl(shapes_dir / 'eval/gqa/llava_gqa_testdev_balanced_words.jsonl')
    graphs = json.loads((shapes_dir / 'eval/gqa/testdev_balanced_sceneGraphs.json').read_text())
    assert [q['question_id'] for q in in_words] == [q['question_id'] for q in questions]
    tokenizer = AutoTokenizer.from_pretrained(str(shapes_dir / 'tokenizer'))
    for question, worded in zip(questions, in_words):
        assert 'image' not in worded
        words, asked = worded['text'].split('\n', 1)
        assert asked == question['text']
        cells = ['empty'] * 9
        for obj in graphs[question['image'].removesuffix('.png')]['objects'].values():
            row, col = (int((obj[c] + obj[d] / 2) // (64 / 3)) for c, d in (('y', 'h'), ('x', 'w')))
            color, size = obj['attributes']
            cells[row * 3 + col] = f"{size}_{color}_{obj['name']}"
        assert words == ' '.join(cells)
        assert tokenizer.unk_token_id not in tokenizer(worded['text'])['input_ids']


def test_shapes_gqa_has_every_field_gqa_eval_reads(shapes_dir):
    """GQA's eval.py reads, per balanced question: answer, question (word count), semantic (reasoning steps),
    types, groups.global (distribution: at least one must be set or it divides by zero), entailed
    (--consistency); and choices[qid].valid / plausible, and the scene graphs file it loads."""
    gqa_dir = shapes_dir / 'eval/gqa'
    gold, choices, scenes = (json.loads((gqa_dir / f'testdev_balanced_{name}.json').read_text())
                             for name in ('questions', 'choices', 'sceneGraphs'))
    assert set(choices) == set(gold) and {q['imageId'] for q in gold.values()} == set(scenes)
    for qid, q in gold.items():
        assert q['isBalanced'] and set(q['types']) == {'structural', 'semantic', 'detailed'}
        assert q['answer'] in choices[qid]['valid'] and choices[qid]['plausible'] == choices[qid]['valid']
        for i, s in enumerate(q['semantic']):  # steps read earlier steps only
            assert set(s) == {'operation', 'argument', 'dependencies'} and all(d < i for d in s['dependencies'])
        ids = q['semantic'][0]['argument'].split('(')[1].rstrip(')')
        assert ids == '-' or all(i in scenes[q['imageId']]['objects'] for i in ids.split(','))
        assert (q['groups']['global'] is None) == (q['types']['structural'] == 'verify') and 'local' in q['groups']
        assert all(gold[e]['imageId'] == q['imageId'] and e != qid for e in q['entailed'])
    assert any(q['entailed'] for q in gold.values())
    # entailment on a hand-made scene: where -> side, colour <-> choose colour, nothing from a 'no'
    scene = [dict(color='red', shape='circle', size='small', row=0, col=0), dict(color='red', shape='square',
                                                                                   size='large', row=1, col=2)]
    red_circle = scene[0]
    where = shapes.then(shapes.refer(red_circle, scene, 'both'), 'query', 'position')
    side = shapes.then(shapes.refer(red_circle, scene, 'both'), 'verify hposition', 'left')
    color = shapes.then(shapes.refer(red_circle, scene, 'shape'), 'query', 'color')
    shape = shapes.then(shapes.refer(red_circle, scene, 'color'), 'query', 'shape')  # two red objects
    assert [s['operation'] for s in shape] == ['select', 'filter color', 'filter position', 'query']
    facts = {name: shapes.program_facts(program, answer) for name, program, answer in
             (('where', where, 'top left'), ('side', side, 'yes'), ('color', color, 'red'), ('shape', shape, 'circle'))}
    entails = lambda a, b: facts[b][0] <= facts[a][1]
    assert entails('where', 'side') and not entails('side', 'where') and entails('where', 'color')
    assert entails('shape', 'color') and not entails('color', 'shape')  # 'the red object at the top left'
    assert shapes.program_facts(side, 'no')[1] == {(0, 'shape'), (0, 'color')}


def test_eval_writes_the_files_the_official_gqa_and_mme_scorers_read(shapes_dir, tmp_path):
    """Hand-written answers (every other one wrong) -> GQA's predictions file and MME's calculation.py
    results dir; scoring those files as the official scripts do gives eval.py's numbers."""
    gqa_questions = read_jsonl(shapes_dir / 'eval/gqa/llava_gqa_testdev_balanced.jsonl')
    gold = json.loads((shapes_dir / 'eval/gqa/testdev_balanced_questions.json').read_text())
    answers = [answer(q['question_id'], gold[q['question_id']]['answer'].capitalize() + '.' if i % 2 else 'blue')
               for i, q in enumerate(gqa_questions)]
    path = ev.write_gqa_predictions(answers, str(shapes_dir / 'eval/gqa/testdev_balanced_questions.json'), tmp_path)
    assert os.path.basename(path) == 'testdev_balanced_predictions.json'
    predictions = {p['questionId']: p['prediction'] for p in json.loads(open(path).read())}
    assert set(predictions) == set(gold)
    official_accuracy = 100 * sum(predictions[qid] == q['answer'] for qid, q in gold.items()) / len(gold)
    ours = ev.score_gqa(answers, str(shapes_dir / 'eval/gqa/testdev_balanced_questions.json'))
    assert 0 < official_accuracy < 100 and official_accuracy == pytest.approx(ours['accuracy'])

    mme_root = str(shapes_dir / 'eval/mme/MME_Benchmark_release_version')
    mme_questions = read_jsonl(shapes_dir / 'eval/mme/llava_mme.jsonl')
    answers = [answer(q['question_id'], ('Yes' if i % 3 else 'No, it is not'), q['text'])
               for i, q in enumerate(mme_questions)]
    results_dir = ev.write_mme_results(answers, mme_root, str(tmp_path))
    assert sorted(os.listdir(results_dir)) == ['color.txt', 'count.txt', 'existence.txt', 'position.txt']
    scores = ev.score_mme(answers, mme_root)['subtasks']
    for subtask in ('existence', 'count', 'position', 'color'):
        rows = [line.split('\t') for line in open(os.path.join(results_dir, f'{subtask}.txt'))]
        assert len(rows) == 2 * 3 and all(len(row) == 4 and row[2] in ('yes', 'no') for row in rows)
        pairs = [rows[i:i + 2] for i in range(0, len(rows), 2)]  # calculation.py: one image per line pair
        assert all(a[0] == b[0] and a[0].endswith('.png') for a, b in pairs)
        right = [[ev.mme_prediction(pred.strip()) == gt for _, _, gt, pred in pair] for pair in pairs]
        acc, acc_plus = sum(map(sum, right)) / len(rows), sum(map(all, right)) / len(pairs)
        assert 100 * acc + 100 * acc_plus == pytest.approx(scores[subtask]['score'])
    # an unanswered question drops its image (both lines), so calculation.py's pairs stay whole
    ev.write_mme_results(answers[1:], mme_root, str(tmp_path))
    assert len(open(os.path.join(results_dir, f"{mme_questions[0]['category']}.txt")).readlines()) == 2 * 2


# =============================================================================
# eval.py: scorers on hand-made benchmark files, answering, sharding, resuming
# =============================================================================


def write_jsonl(path, records):
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)

def answer(question_id, text, prompt=''):
    return dict(question_id=question_id, prompt=prompt, text=text, answer_id=0, model_id='test', metadata={})

# -----------------------------------------------------------------------------
# parsing rules

def test_pope_prediction_follows_the_official_first_sentence_word_rule():
    cases = {
        "No, there is not.": 'no',
        "Yes.": 'yes',
        "yes, it is": 'yes',
        "NO": 'yes',  # only 'No', 'not', 'no' count, so upper-case NO reads as yes
        "There is no dog": 'no',
        "not sure": 'no',
        "": 'yes',
        "Yes. There is no cat.": 'yes',  # only the first sentence counts
        "No.": 'no',
        "No\nthere is": 'yes',  # words are split on spaces only: 'No\nthere' is one word
        "Nothing here": 'yes',
    }
    assert {text: ev.pope_prediction(text) for text in cases} == cases

def test_mme_prediction_follows_calculation_py():
    cases = {
        "yes": 'yes', "NO": 'no', "Yes.": 'yes', "No, there is not.": 'no', "yes, it is": 'yes',
        "not sure": 'no',  # 'no' is in the first four characters
        "There is no dog": 'other', "": 'other', "I don't know": 'other', "Maybe": 'other',
        "Yes. There is no cat.": 'yes', "none": 'no',
    }
    assert {text: ev.mme_prediction(text) for text in cases} == cases

# -----------------------------------------------------------------------------
# POPE

def make_pope(tmp_path):
    """Two splits (no adversarial file). The question ids are LLaVA-style and unlike the annotation
    files' own ids; the splits' questions are interleaved in the question file."""
    random_rows = [  # (answer text, label): outcome
        ("No, there is not.", 'no'),       # TN
        ("Yes.", 'yes'),                   # TP
        ("yes, it is", 'no'),              # FP
        ("NO", 'no'),                      # FP (parses as yes)
        ("There is no dog", 'yes'),        # FN
        ("not sure", 'no'),                # TN
        ("", 'yes'),                       # TP (parses as yes)
        ("Yes. There is no cat.", 'yes'),  # TP
        ("No", 'yes'),                     # FN
        (None, 'yes'),                     # no answer: reported, not scored
    ]
    popular_rows = [("Yes", 'yes'), ("no", 'no'), ("yes", 'yes'), ("No.", 'yes')]  # TP TN TP FN
    questions, answers, labels = {'random': [], 'popular': []}, [], {'random': [], 'popular': []}
    for split, rows, base in (('random', random_rows, 30000000), ('popular', popular_rows, 20000000)):
        for i, (text, label) in enumerate(rows, 1):
            image = f'COCO_val2014_{split}_{i}.jpg'
            questions[split].append(dict(question_id=base + i, image=image, category=split,
                                         text=f"Is there a thing {i}?\nAnswer the question using a single word or phrase."))
            labels[split].append(dict(question_id=i, image=image, text=f"Is there a thing {i}?", label=label))
            if text is not None:
                answers.append(answer(base + i, text))
    # interleave the splits: r1 p1 r2 p2 r3 p3 r4 p4 r5 ... r10
    questions = [q for pair in zip(questions['random'], questions['popular']) for q in pair] + questions['random'][4:]
    write_jsonl(tmp_path / 'llava_pope_test.jsonl', questions)
    os.makedirs(tmp_path / 'coco')
    for split, rows in labels.items():
        write_jsonl(tmp_path / 'coco' / f'coco_pope_{split}.json', rows)
    return answers[::-1]  # answers in any order

def test_score_pope_hand_computed(tmp_path):
    answers = make_pope(tmp_path)
    result = ev.score_pope(answers, tmp_path / 'llava_pope_test.jsonl', tmp_path / 'coco')
    # random: TP 3, FP 2, TN 2, FN 2 over 9 answered questions
    r = result['random']
    assert (r['tp'], r['fp'], r['tn'], r['fn'], r['questions']) == (3, 2, 2, 2, 9)
    assert r['accuracy'] == pytest.approx(100 * 5 / 9)
    assert r['precision'] == pytest.approx(60.0) and r['recall'] == pytest.approx(60.0)
    assert r['f1'] == pytest.approx(60.0)
    assert r['yes_ratio'] == pytest.approx(100 * 5 / 9)
    # popular: TP 2, TN 1, FN 1: precision 100, recall 2/3, F1 = 2*100*66.7/166.7 = 80
    p = result['popular']
    assert (p['tp'], p['fp'], p['tn'], p['fn']) == (2, 0, 1, 1)
    assert p['accuracy'] == pytest.approx(75.0) and p['yes_ratio'] == pytest.approx(50.0)
    assert p['recall'] == pytest.approx(200 / 3) and p['f1'] == pytest.approx(80.0)
    assert 'adversarial' not in result
    assert result['f1_avg'] == pytest.approx(70.0)
    assert result['num_missing'] == 1 and result['missing_ids'] == [30000010]
    # each question has its own image here: 'yes' ones hold 1 asked-about object, 'no' ones none
    assert result['by_positives']['1']['accuracy'] == pytest.approx(100 * 5 / 8)   # TP 3 + 2 of 5 + 3
    assert result['by_positives']['0']['accuracy'] == pytest.approx(100 * 3 / 5)   # TN 2 + 1 of 4 + 1


def test_score_pope_by_positives_groups_questions_by_the_objects_present_in_their_image(tmp_path):
    """Image a has 2 present objects asked about, image b 1; two splits share the positives, as POPE's do."""
    rows = [('a', 'yes', 'Yes'), ('a', 'yes', 'Yes'), ('a', 'no', 'Yes'), ('a', 'no', 'No'),
            ('b', 'yes', 'No'), ('b', 'no', 'No')]
    questions, labels, answers = [], {'random': [], 'adversarial': []}, []
    for split in labels:
        for image, label, said in rows:
            question_id = len(questions)
            questions.append(dict(question_id=question_id, image=image, category=split, text='Is there a thing?'))
            labels[split].append(dict(question_id=question_id, image=image, text='Is there a thing?', label=label))
            answers.append(dict(question_id=question_id, text=said))
    write_jsonl(tmp_path / 'questions.jsonl', questions)
    os.makedirs(tmp_path / 'coco')
    for split, split_labels in labels.items():
        write_jsonl(tmp_path / 'coco' / f'coco_pope_{split}.json', split_labels)
    by_positives = ev.score_pope(answers, tmp_path / 'questions.jsonl', tmp_path / 'coco')['by_positives']
    assert list(by_positives) == ['1', '2']  # strings, as results.json keeps them
    assert by_positives['2']['accuracy'] == pytest.approx(75.0) and by_positives['2']['questions'] == 8
    assert by_positives['1']['accuracy'] == pytest.approx(50.0) and by_positives['1']['questions'] == 4

def test_score_pope_refuses_mismatched_files(tmp_path):
    answers = make_pope(tmp_path)
    with pytest.raises(ValueError, match='not in'):
        ev.score_pope(answers + [answer(999, 'yes')], tmp_path / 'llava_pope_test.jsonl', tmp_path / 'coco')
    labels = ev.read_jsonl(tmp_path / 'coco' / 'coco_pope_popular.json')
    labels[1]['image'] = 'another.jpg'
    write_jsonl(tmp_path / 'coco' / 'coco_pope_popular.json', labels)
    with pytest.raises(ValueError, match=r'coco_pope_popular.json:2: label is for image another.jpg'):
        ev.score_pope(answers, tmp_path / 'llava_pope_test.jsonl', tmp_path / 'coco')
    write_jsonl(tmp_path / 'coco' / 'coco_pope_popular.json', labels[:3])
    with pytest.raises(ValueError, match='has 3 labels but .* has 4 questions'):
        ev.score_pope(answers, tmp_path / 'llava_pope_test.jsonl', tmp_path / 'coco')

# -----------------------------------------------------------------------------
# GQA

def test_score_gqa_hand_computed(tmp_path):
    def q(answer_, structural, balanced=True):
        return dict(imageId='n1', question='?', answer=answer_, isBalanced=balanced,
                    types=dict(structural=structural, semantic='attr', detailed=f'{structural}Detail'))
    questions = {'201': q('yes', 'verify'), '202': q('no', 'logical'), '203': q('red', 'query'),
                 '204': q('left', 'query'), '205': q('yes', 'compare'), '206': q('cat', 'choose'),
                 '207': q('dog', 'query', balanced=False), '208': q('dog', 'query')}
    with open(tmp_path / 'testdev_balanced_questions.json', 'w') as f:
        json.dump(questions, f)
    answers = [answer('201', 'Yes.'),               # 'yes'  right, binary
               answer('202', 'No, there is not.'),  # 'no, there is not' wrong, binary
               answer('203', 'Red.'),               # 'red' right, open
               answer('204', 'left..'),             # every trailing '.' goes: right, open
               answer('205', 'yes, it is'),         # wrong, binary
               answer('207', 'dog'),                # not balanced: not scored
               answer('208', '')]                   # wrong, open; 206 has no answer
    result = ev.score_gqa(answers, tmp_path / 'testdev_balanced_questions.json')
    assert result['questions'] == 6
    assert result['accuracy'] == pytest.approx(50.0)      # 3 of 6
    assert result['binary'] == pytest.approx(100 / 3)     # 201 of 201, 202, 205
    assert result['open'] == pytest.approx(200 / 3)       # 203, 204 of 203, 204, 208
    assert result['num_missing'] == 1 and result['missing_ids'] == ['206']
    assert result['by_type'] == {'verifyDetail': 100.0, 'logicalDetail': 0.0, 'queryDetail': pytest.approx(200 / 3),
                                 'compareDetail': 0.0}  # types.detailed; 206 (choose) unanswered
    with pytest.raises(ValueError, match='appears twice'):
        ev.score_gqa(answers + [answer('201', 'no')], tmp_path / 'testdev_balanced_questions.json')

# -----------------------------------------------------------------------------
# MME

def make_mme(root):
    """existence: images and tables side by side; artwork: images/ + questions_answers_YN/;
    code_reasoning: one question with two spaces before 'Please answer yes or no.', as in the release.
    The question files' two styles: existence and code_reasoning as LLaVA's llava_mme.jsonl (question id
    '<subtask>/<image>', MME's suffix swapped for the short-answer line), artwork as shapes.py's shapes
    MME (question id '<subtask>/images/<image>#k', MME's own suffix kept)."""
    tables = {
        ('existence', '', 'a'): [("Is there a dog in this image? Please answer yes or no.", 'Yes'),
                                 ("Is there a cat in this image? Please answer yes or no.", 'No')],
        ('existence', '', 'b'): [("Is there a bus in this image? Please answer yes or no.", 'Yes'),
                                 ("Is there a car in this image? Please answer yes or no.", 'No')],
        ('artwork', 'questions_answers_YN', 'c'): [("Is this by Monet? Please answer yes or no.", 'Yes'),
                                                   ("Is this by Dali? Please answer yes or no.", 'No')],
        ('artwork', 'questions_answers_YN', 'd'): [("Is this a fresco? Please answer yes or no.", 'Yes'),
                                                   ("Is this a mosaic? Please answer yes or no.", 'No')],
        ('code_reasoning', '', 'e'): [("Does the code print 3?  Please answer yes or no.", 'Yes'),
                                      ("Does the code print 4? Please answer yes or no.", 'No')],
    }
    questions = []
    for (subtask, table_dir, name), rows in tables.items():
        image_dir = os.path.join(root, subtask, 'images' if table_dir else '')
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(os.path.join(root, subtask, table_dir), exist_ok=True)
        Image.new('RGB', (8, 8), (255, 255, 255) if name in 'ace' else (0, 0, 0)).save(os.path.join(image_dir, f'{name}.png'))
        with open(os.path.join(root, subtask, table_dir, f'{name}.txt'), 'w') as f:
            f.writelines(f"{question}\t{gold}\n" for question, gold in rows)
        image = os.path.join(subtask, 'images' if table_dir else '', f'{name}.png')
        for k, (question, _) in enumerate(rows):
            if subtask == 'artwork':
                question_id, text = f'{image}#{k}', question
            else:
                question_id = f'{subtask}/{name}.png'
                text = question.replace('  Please answer yes or no.', ' Please answer yes or no.')
                text = text.replace(' Please answer yes or no.', '\nAnswer the question using a single word or phrase.')
            questions.append(dict(question_id=question_id, text=text, category=subtask, image=image))
    return questions

def test_score_mme_hand_computed_on_both_layouts(tmp_path):
    questions = make_mme(tmp_path / 'MME')
    texts = ["Yes.", "not sure",                          # a: yes right, no right -> image right
             "There is no dog", "NO",                     # b: other wrong, no right
             "", "No, there is not.",                     # c: other wrong, no right
             "yes, it is", None,                          # d: yes right, no answer
             "Yes. There is no cat.", "I don't know"]     # e: yes right, other wrong
    answers = [answer(q['question_id'], text, prompt=q['text']) for q, text in zip(questions, texts) if text is not None]
    result = ev.score_mme(answers, tmp_path / 'MME')
    existence, artwork, code = (result['subtasks'][s] for s in ('existence', 'artwork', 'code_reasoning'))
    # existence: acc 3/4, acc+ 1/2 -> 75 + 50
    assert (existence['acc'], existence['acc_plus'], existence['score']) == pytest.approx((75.0, 50.0, 125.0))
    assert (existence['questions'], existence['images'], existence['other']) == (4, 2, 1)
    # artwork: acc 2/3 over answered questions; acc+ over the one fully answered image (c, wrong) = 0
    assert (artwork['acc'], artwork['acc_plus'], artwork['score']) == pytest.approx((200 / 3, 0.0, 200 / 3))
    assert (artwork['questions'], artwork['images'], artwork['other']) == (3, 1, 1)
    # code_reasoning: acc 1/2, acc+ 0
    assert (code['acc'], code['acc_plus'], code['score']) == pytest.approx((50.0, 0.0, 50.0))
    assert result['perception'] == pytest.approx(125.0 + 200 / 3)
    assert result['cognition'] == pytest.approx(50.0)
    assert result['num_missing'] == 1
    assert result['missing_ids'] == ['artwork/d: Is this a mosaic? Please answer yes or no.']

def test_score_mme_bad_input_names_the_place(tmp_path):
    questions = make_mme(tmp_path / 'MME')
    with pytest.raises(ValueError, match='matches no line of a.txt'):
        ev.score_mme([answer(questions[0]['question_id'], 'yes', prompt='Is there a unicorn?')], tmp_path / 'MME')
    with open(tmp_path / 'MME' / 'existence' / 'a.txt', 'a') as f:
        f.write("A question without an answer\n")
    with pytest.raises(ValueError, match=r'a.txt:3: expected'):
        ev.score_mme([], tmp_path / 'MME')

# -----------------------------------------------------------------------------
# bad files

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / 'answers.jsonl'
    path.write_text('{"question_id": 1, "text": "yes"}\n\n{"question_id": 2, "text": "no"\n')
    with pytest.raises(ValueError, match=r'answers.jsonl:3: not valid JSON'):
        ev.read_jsonl(path)

# -----------------------------------------------------------------------------
# answering, with a stand-in model

def make_tokenizer():
    """A word-level tokenizer built in memory (the tests download nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(['<|endoftext|>', '[UNK]', 'yes', 'no', 'maybe', 'USER:', 'ASSISTANT:'])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<|endoftext|>', unk_token='[UNK]')

class FakeMoCHA(torch.nn.Module):
    """mocha.MoCHA's generate interface: 'yes' for a bright image, 'no' for a dark one, 'maybe' without."""
    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.config = SimpleNamespace(template='phi', image_size=8)
        self.word_ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ('yes', 'no', 'maybe')}
        self.eos_id = tokenizer.eos_token_id
        self.rows_answered = 0

    def generate(self, input_ids, attention_mask, images, max_new_tokens, stats=None, expert_mask=None):
        assert not self.training and expert_mask is None
        for mask in attention_mask:  # left padding: 0..0 1..1
            assert torch.equal(mask, torch.sort(mask).values) and mask[-1] == 1
        has_image = (input_ids == IMAGE_TOKEN_ID).sum(1)
        assert has_image.max() <= 1
        assert (images is None and has_image.sum() == 0) or len(images) == has_image.sum()
        image_rows = iter(images if images is not None else [])
        new_ids = []
        for row_has_image in has_image:
            word = ('yes' if next(image_rows).float().mean() > 127 else 'no') if row_has_image else 'maybe'
            new_ids.append([self.word_ids[word]] + [self.eos_id] * (max_new_tokens - 1))
        self.rows_answered += len(new_ids)
        return torch.tensor(new_ids)

def make_questions(tmp_path, count=7):
    """Questions alternating bright/dark images, every third one without an image."""
    os.makedirs(tmp_path / 'images', exist_ok=True)
    Image.new('RGB', (10, 6), (250, 250, 250)).save(tmp_path / 'images' / 'bright.png')
    Image.new('RGB', (6, 10), (5, 5, 5)).save(tmp_path / 'images' / 'dark.png')
    questions, expected = [], []
    for i in range(count):
        q = dict(question_id=f'q{i}', text=f'Is it bright {i}?' + ' padding' * i, category='test')
        if i % 3 == 2:
            expected.append('maybe')
        else:
            q['image'] = 'bright.png' if i % 2 == 0 else 'dark.png'
            expected.append('yes' if i % 2 == 0 else 'no')
        questions.append(q)
    write_jsonl(tmp_path / 'questions.jsonl', questions)
    return questions, expected

def test_answer_questions_writes_llava_answers_in_question_order(tmp_path):
    questions, expected = make_questions(tmp_path)
    tokenizer = make_tokenizer()
    model = FakeMoCHA(tokenizer)
    answers_file = str(tmp_path / 'out' / 'answers.jsonl')
    ev.answer_questions(model, tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images', answers_file,
                        batch_size=3, max_new_tokens=4, model_id='fake')
    answers = ev.read_jsonl(answers_file)
    assert [a['text'] for a in answers] == expected
    assert [a['question_id'] for a in answers] == [q['question_id'] for q in questions]
    assert answers[0] == dict(question_id='q0', prompt='Is it bright 0?', text='yes', answer_id=0,
                              model_id='fake', metadata={})
    assert model.training and os.listdir(tmp_path / 'out') == ['answers.jsonl']  # mode restored, shards merged

def test_mova_answers_in_two_passes_routing_first(tokenizer_dir, tmp_path):
    """route='llm': a routing pass with no expert, its answer parsed into each image's experts (junk: all, flagged),
    then the answer pass with them; text-only questions take one pass."""
    make_questions(tmp_path, count=5)
    torch.manual_seed(0)
    model = MoCHA(tiny_config(tokenizer_dir, connector='mova', mova_pool=1, mova_blocks=1)).eval()
    calls, generate = [], model.generate
    model.generate = lambda *args, expert_mask=None, **kwargs: calls.append(expert_mask) or generate(
        *args, expert_mask=expert_mask, **kwargs)
    answers_file = tmp_path / 'answers.jsonl'
    ev.answer_questions(model, model.tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images', str(answers_file),
                        batch_size=5, max_new_tokens=2, route='llm')
    routing_pass, answer_pass = calls                                   # one batch: two generations
    assert routing_pass.shape == (4, 3) and not routing_pass.any()       # 4 images, 3 experts, none in the first
    answers = ev.read_jsonl(answers_file)
    with_image = [a for a, q in zip(answers, ev.read_jsonl(tmp_path / 'questions.jsonl')) if q.get('image')]
    assert all(set(a['metadata']) == {'experts', 'malformed'} for a in with_image)
    from mova import parse_routing
    expected = torch.stack([parse_routing(a['metadata']['experts'], 3)[0] for a in with_image])
    assert torch.equal(answer_pass, expected)
    assert answers[2]['metadata'] == {}                                 # q2 has no image


def test_answer_questions_resumes_without_redoing_answers(tmp_path):
    questions, expected = make_questions(tmp_path)
    tokenizer = make_tokenizer()
    model = FakeMoCHA(tokenizer)
    answers_file = tmp_path / 'answers.jsonl'
    old = [answer(questions[i]['question_id'], 'old', prompt=questions[i]['text']) for i in (1, 4)]
    write_jsonl(answers_file, old)
    ev.answer_questions(model, tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images', str(answers_file),
                        batch_size=2, max_new_tokens=3)
    answers = ev.read_jsonl(answers_file)
    assert model.rows_answered == len(questions) - 2
    assert answers[:2] == old  # appended to, not overwritten
    assert [a['question_id'] for a in answers[2:]] == ['q0', 'q2', 'q3', 'q5', 'q6']
    assert [a['text'] for a in answers[2:]] == [expected[i] for i in (0, 2, 3, 5, 6)]
    ev.answer_questions(model, tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images', str(answers_file))
    assert model.rows_answered == len(questions) - 2 and len(ev.read_jsonl(answers_file)) == len(questions)

def test_answers_of_other_weights_are_set_aside_not_resumed(tmp_path):
    """weights (eval.checkpoint_stamp of the checkpoint answering): the same weights resume their answers;
    other weights (a checkpoint retrained into the same out_dir) move the old answers and an interrupted
    run's shards to *.other, where no later run reads them, and answer every question again."""
    questions, expected = make_questions(tmp_path)
    tokenizer = make_tokenizer()
    model = FakeMoCHA(tokenizer)
    answers_file = str(tmp_path / 'answers.jsonl')
    ask = lambda weights: ev.answer_questions(model, tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images',
                                              answers_file, batch_size=2, max_new_tokens=3, weights=weights)
    old = [answer(questions[i]['question_id'], 'old', prompt=questions[i]['text']) for i in (1, 4)]
    write_jsonl(answers_file, old)
    write_jsonl(answers_file + '.rank1', [answer(questions[2]['question_id'], 'old')])  # an interrupted run's
    ask('100:1')  # answers without a record of their weights: set aside too
    assert model.rows_answered == len(questions)
    assert [a['text'] for a in ev.read_jsonl(answers_file)] == expected
    assert ev.read_jsonl(answers_file + '.other') == old and os.path.exists(answers_file + '.other.rank1')
    assert open(answers_file + '.weights').read() == '100:1' and ev.answer_shards(answers_file) == []
    ask('100:1')  # the same weights: nothing left to answer
    assert model.rows_answered == len(questions)
    ask('100:2')
    assert model.rows_answered == 2 * len(questions) and len(ev.read_jsonl(answers_file)) == len(questions)
    (tmp_path / 'ckpt').mkdir()
    (tmp_path / 'ckpt' / 'model.safetensors').write_bytes(b'12345')
    assert ev.checkpoint_stamp(tmp_path / 'ckpt').startswith('5:')


def test_missing_image_names_question_and_path(tmp_path):
    write_jsonl(tmp_path / 'questions.jsonl', [dict(question_id=17, image='gone.png', text='What?')])
    tokenizer = make_tokenizer()
    with pytest.raises(FileNotFoundError, match=r'question 17: image not found: .*gone.png'):
        ev.answer_questions(FakeMoCHA(tokenizer), tokenizer, tmp_path / 'questions.jsonl', tmp_path,
                            str(tmp_path / 'answers.jsonl'))

def answer_on_rank(rank, tmp_path, answers_file):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=rank, world_size=2)
    tokenizer = make_tokenizer()
    ev.answer_questions(FakeMoCHA(tokenizer), tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images',
                        answers_file, batch_size=2, max_new_tokens=3)
    dist.destroy_process_group()

def test_two_ranks_write_the_same_answers_file_as_one(tmp_path):
    make_questions(tmp_path)
    tokenizer = make_tokenizer()
    ev.answer_questions(FakeMoCHA(tokenizer), tokenizer, tmp_path / 'questions.jsonl', tmp_path / 'images',
                        str(tmp_path / 'one.jsonl'), batch_size=2, max_new_tokens=3)
    mp.spawn(answer_on_rank, args=(tmp_path, str(tmp_path / 'two.jsonl')), nprocs=2)
    assert (tmp_path / 'two.jsonl').read_text() == (tmp_path / 'one.jsonl').read_text()
    assert not [name for name in os.listdir(tmp_path) if '.rank' in name]

def test_evaluate_shapes_writes_results_json_with_all_three_scores(tmp_path):
    """The shapes layout of ev.shapes_files, filled with a tiny hand-made benchmark of each kind."""
    files = ev.shapes_files(str(tmp_path / 'shapes'))
    # POPE: bright images have the object
    os.makedirs(files['pope']['image_folder']), os.makedirs(files['pope']['annotation_dir'])
    Image.new('RGB', (8, 8), (255, 255, 255)).save(os.path.join(files['pope']['image_folder'], 'bright.png'))
    Image.new('RGB', (8, 8), (0, 0, 0)).save(os.path.join(files['pope']['image_folder'], 'dark.png'))
    pope_questions = [dict(question_id=i, image=image, text='Is there a circle?', category=split)
                      for i, (split, image) in enumerate([(s, im) for s in ev.POPE_SPLITS for im in ('bright.png', 'dark.png')])]
    write_jsonl(files['pope']['question_file'], pope_questions)
    for split in ev.POPE_SPLITS:
        write_jsonl(os.path.join(files['pope']['annotation_dir'], f'coco_pope_{split}.json'),
                    [dict(image='bright.png', label='yes'), dict(image='dark.png', label='yes')])
    # GQA: one binary question the fake gets right, one open question it gets wrong
    os.makedirs(files['gqa']['image_folder'])
    Image.new('RGB', (8, 8), (255, 255, 255)).save(os.path.join(files['gqa']['image_folder'], 'g.png'))
    write_jsonl(files['gqa']['question_file'], [dict(question_id='1', image='g.png', text='Is it white?'),
                                                dict(question_id='2', image='g.png', text='What colour?')])
    with open(files['gqa']['questions_json'], 'w') as f:
        json.dump({'1': dict(answer='yes', types=dict(structural='verify')),
                   '2': dict(answer='white', types=dict(structural='query'))}, f)
    # MME: existence / artwork / code_reasoning as in the MME scorer test
    write_jsonl(files['mme']['question_file'], make_mme(files['mme']['mme_root']))
    tokenizer = make_tokenizer()
    results = ev.evaluate_shapes(FakeMoCHA(tokenizer), tokenizer, str(tmp_path / 'shapes'), str(tmp_path / 'out'),
                                 batch_size=4, max_new_tokens=2)
    with open(tmp_path / 'out' / 'results.json') as f:
        assert json.load(f) == results
    assert list(results) == ['pope', 'gqa', 'mme']  # no eval/lab here (an older shapes.py): the lab's are skipped
    # POPE per split: bright -> yes (TP), dark -> no (FN): precision 100, recall 50, F1 66.7
    assert results['pope']['f1_avg'] == pytest.approx(200 / 3) and results['pope']['num_missing'] == 0
    assert (results['gqa']['accuracy'], results['gqa']['binary'], results['gqa']['open']) == (50.0, 100.0, 0.0)
    # MME: the fake says yes to bright images (a, c, e), no to dark ones (b, d): every question of
    # a/c/e with gold 'no' and every b/d question with gold 'yes' is wrong -> acc 50, acc+ 0 everywhere
    assert results['mme']['perception'] == pytest.approx(100.0) and results['mme']['cognition'] == pytest.approx(50.0)
    assert sorted(os.listdir(tmp_path / 'out')) == ['gqa_answers.jsonl', 'mme_answers.jsonl', 'mme_results',
                                                    'pope_answers.jsonl', 'results.json',
                                                    'testdev_balanced_predictions.json']


@pytest.fixture(scope='module')
def small_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes') / 'shapes'
    shapes.prepare_shapes(str(root), seed=0, num_train_images=48, num_pope_images=4, num_gqa_images=4, num_mme_images=2,
                          num_text_conversations=40, num_lab_train_images=8, num_lab_pope_images=2, num_lab_gqa_images=2)
    return root


def run_train(shapes, out_dir, *overrides, nproc=1, with_output=False):
    args = ['config/shapes.py', f'--out_dir={out_dir}', f'--data_json={shapes}/pretrain.json',
            f'--image_folder={shapes}/images', f'--tokenizer={shapes}/tokenizer', '--prepare_shapes_data=False',
            '--eval_shapes_at_end=False', '--num_workers=0', '--batch_size=4', '--max_steps=3',
            '--gradient_accumulation_steps=1', '--sort_micro_batches=False',
            '--log_interval=1', '--train_encoders=False', '--template=plain', '--stage=1', '--val_fraction=0.0',
            '--llm=tiny', '--llm_source=tiny', '--encoder_source=tiny', '--encoder_resolution=(48, 64, 48, 48)',
            '--image_size=64', *overrides]  # random tiny towers, as cheap as they come: these runs test the loop
    if nproc == 1:
        command = [sys.executable, 'train.py', *args]
    else:
        command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                   'train.py', *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [float(v) for v in open(f'{out_dir}/losses.txt').read().split()]
    if with_output:  # stdout then stderr of every process
        return load_file(f'{out_dir}/ckpt/model.safetensors'), losses, result.stdout + result.stderr
    return load_file(f'{out_dir}/ckpt/model.safetensors'), losses


def test_a_run_reads_the_tower_tokens_that_the_first_run_computed(small_shapes, tmp_path):
    """train.py --tower_tokens=<folder> (ablate.py's runs): the first run computes each frozen tower's tokens of every
    training image (48) into one file per tower, named by the tower's fingerprint; the next finds them and runs no
    tower in its steps. Both read the same file, so they give the same losses, and these match a run without it to
    float rounding (the file was computed in batches of 64, the steps' towers see batches of 4)."""
    cache = tmp_path / 'tokens'
    _, plain = run_train(small_shapes, tmp_path / 'plain')
    _, first, first_output = run_train(small_shapes, tmp_path / 'first', f'--tower_tokens={cache}', with_output=True)
    _, second, second_output = run_train(small_shapes, tmp_path / 'second', f'--tower_tokens={cache}', with_output=True)
    assert sorted(p.name.split('-')[0] for p in cache.glob('*.safetensors')) == sorted(ENCODER_ORDER)
    assert 'tower tokens of 48 images for siglip, convnext, clip, dinov2' in first_output
    assert 'tower tokens of' not in second_output
    assert '3 batches of images read from' in second_output and '0 run through the towers' in second_output
    assert first == second
    assert first == pytest.approx(plain, rel=1e-4)


def test_train_checks_the_shapes_benchmarks_files_before_it_trains(tmp_path):
    """A data/shapes written by an older shapes.py lacks the GQA in words: config/shapes_lm.py says so at once,
    not after its text step."""
    (tmp_path / 'eval').mkdir()
    result = subprocess.run([sys.executable, 'train.py', 'config/shapes_lm.py', f'--data_json={tmp_path}/text.json',
                             '--prepare_shapes_data=False', f'--out_dir={tmp_path}/out'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'gqa_words needs' in result.stderr and 'llava_gqa_testdev_balanced_words.jsonl' in result.stderr
    assert not (tmp_path / 'out' / 'ckpt').exists()


def run_dry(*overrides):
    command = [sys.executable, 'train.py', 'config/shapes.py', '--dry_run=True', '--prepare_shapes_data=False',
               '--llm=tiny', '--llm_source=tiny', *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def train_defaults():
    """The names train.py assigns in its default-config block, read from its source."""
    source = open('train.py').read()
    block = source[source.index('# default config'):source.index('config_keys = ')]
    return {name.strip() for line in block.splitlines() if re.match(r'^\w+(, \w+)* = ', line)
            for name in line.split(' = ')[0].split(',')}


def test_text_json_writes_each_scene_as_nine_words_the_tokenizer_keeps_whole(small_shapes):
    """text.json, the tiny LM's pretraining: each conversation opens with its scene as 9 cell words in reading
    order, where instruct.json has '<image>'; each object word is one token of the shapes tokenizer."""
    scene = [dict(row=0, col=2, size='large', color='red', shape='circle'),
             dict(row=2, col=1, size='small', color='blue', shape='square')]
    assert shapes.scene_words(scene).split() == ['empty', 'empty', 'large_red_circle', 'empty', 'empty', 'empty',
                                                 'empty', 'small_blue_square', 'empty']
    text = json.loads((small_shapes / 'text.json').read_text())
    tokenizer = AutoTokenizer.from_pretrained(small_shapes / 'tokenizer')
    assert len(text) == 40
    for sample in text:
        assert 'image' not in sample and data.IMAGE_TEXT not in json.dumps(sample)
        words = sample['conversations'][0]['value'].split('\n')[0].split()
        assert len(words) == 9 and 1 <= sum(w != 'empty' for w in words) <= 4
        ids = tokenizer(' '.join(words), add_special_tokens=False)['input_ids']
        assert len(ids) == 9 and tokenizer.unk_token_id not in ids


def test_text_json_asks_position_in_every_conversation_and_the_image_data_does_not(small_shapes):
    """shapes.TEXT_ALWAYS: every text.json conversation asks "where is ..." and a yes/no side question, so that the
    tiny LM learns position on every seed; instruct.json (the image step) keeps the 3-5 random families."""
    side_endings = tuple(f' {phrase}?' for phrase in shapes.SIDES.values())

    def position_questions(sample):
        lines = [line for turn in sample['conversations'] if turn['from'] == 'human' for line in turn['value'].split('\n')]
        questions = [line.split('?')[0] + '?' for line in lines if '?' in line]  # no scene words, no suffix
        return (sum(q.startswith('Where is the ') for q in questions),
                sum(q.startswith('Is the ') and q.endswith(side_endings) for q in questions))

    text = json.loads((small_shapes / 'text.json').read_text())
    assert all(position_questions(sample) == (1, 1) for sample in text)  # once each: rng.sample draws no repeats
    instruct = [s for s in json.loads((small_shapes / 'instruct.json').read_text()) if 'image' in s]
    assert any(position_questions(sample) == (0, 0) for sample in instruct)


def test_export_llm_saves_the_trained_llm_as_a_folder_that_config_shapes_loads(small_shapes, tmp_path):
    """config/shapes_lm.py's export_llm: the LM of the final checkpoint as an HF folder; a MoCHA whose llm names
    that folder ('pretrained', as config/shapes.py does) starts from exactly those weights."""
    out = tmp_path / 'lm'
    result = subprocess.run(
        [sys.executable, 'train.py', 'config/shapes_lm.py', f'--out_dir={out}', f'--data_json={small_shapes}/text.json',
         f'--tokenizer={small_shapes}/tokenizer', '--prepare_shapes_data=False', '--num_workers=0',
         '--batch_size=4', '--max_steps=2', '--val_fraction=0.0'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = load_file(out / 'ckpt' / 'model.safetensors')
    llm = MoCHA(MoCHAConfig(encoders=('siglip',), encoder_source='tiny', llm=str(out / 'llm'),
                            llm_source='pretrained', template='phi')).llm
    exported = llm.state_dict()
    assert exported and all(torch.equal(tensor, trained['llm.' + name]) for name, tensor in exported.items())
    assert llm.config.vocab_size == len(AutoTokenizer.from_pretrained(out / 'llm'))
    # the folder keeps the tokenizer it was trained with; a tokenizer of another vocabulary (a changed world) would
    # look up the wrong embeddings, so it stops the build with a clear error (the same vocabulary does not)
    MoCHA(MoCHAConfig(encoders=('siglip',), encoder_source='tiny', llm=str(out / 'llm'), llm_source='pretrained',
                      tokenizer=str(small_shapes / 'tokenizer'), template='phi'))
    shapes.build_word_tokenizer(['a changed world']).save_pretrained(tmp_path / 'other')
    with pytest.raises(ValueError, match='does not keep the ids of the vocabulary the llm .* was trained with'):
        MoCHA(MoCHAConfig(encoders=('siglip',), encoder_source='tiny', llm=str(out / 'llm'), llm_source='pretrained',
                          tokenizer=str(tmp_path / 'other'), template='phi'))
    # words appended after the LLM's own (the lab world's) keep every old id: the embedding and the head grow by
    # those rows, the old rows as trained
    extended = AutoTokenizer.from_pretrained(out / 'llm')
    extended.add_tokens(['zigzag', 'octagon'])
    extended.save_pretrained(tmp_path / 'extended')
    grown = MoCHA(MoCHAConfig(encoders=('siglip',), encoder_source='tiny', llm=str(out / 'llm'), llm_source='pretrained',
                              tokenizer=str(tmp_path / 'extended'), template='phi')).llm
    old_rows = trained['llm.model.embed_tokens.weight']
    assert grown.get_input_embeddings().weight.shape[0] == len(old_rows) + 2 == grown.get_output_embeddings().weight.shape[0]
    assert torch.equal(grown.get_input_embeddings().weight[:len(old_rows)], old_rows)


def test_config_shapes_starts_from_the_shipped_text_pretrained_lm():
    """config/shapes.py's llm is the folder the repo ships (config/shapes_lm.py's export): a Llama of mocha.TINY_LLM's
    widths whose vocabulary is its own tokenizer's, the one that data/shapes/tokenizer must equal (checked when
    MoCHA is built, above)."""
    llm_dir = re.search(r"^llm = '([^']+)'", open('config/shapes.py').read(), re.M).group(1)
    assert llm_dir == 'weights/shapes-lm' and os.path.isfile(os.path.join(llm_dir, 'model.safetensors'))
    model = MoCHA(MoCHAConfig(encoders=('siglip',), encoder_source='tiny', llm=llm_dir, llm_source='pretrained',
                              template='phi'))
    widths = {k: v for k, v in TINY_LLM[1].items() if k != 'tie_word_embeddings'}
    assert {k: getattr(model.llm.config, k) for k in widths} == widths
    assert model.llm.get_input_embeddings().num_embeddings == len(model.tokenizer)
    assert {'empty', 'large_red_circle', 'Answer'} <= set(model.tokenizer.get_vocab())


@pytest.fixture(scope='module')
def one_step_deep_run(small_shapes, tmp_path_factory):
    """The out_dir of a 1-step stage-2 run with a 3-layer tiny LM that saves at the end only (save_interval=0)."""
    out = tmp_path_factory.mktemp('deep') / 'deep'
    run_train(small_shapes, out, '--stage=2', '--template=phi', '--llm_layers=3', '--max_steps=1', '--save_interval=0',
              f'--data_json={small_shapes}/instruct.json')
    return out


def test_checkpoint_config_holds_exactly_the_config_globals(one_step_deep_run):
    saved = torch.load(one_step_deep_run / 'ckpt' / 'train_state.pt', weights_only=False)['config']
    assert set(saved) == train_defaults() and saved['max_steps'] == 1 and saved['template'] == 'phi'
    assert saved['save_interval'] == 0  # 0: saved at the end only


def test_an_invalid_option_stops_every_process_with_a_clear_error(small_shapes, tmp_path):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
               'config/shapes.py', f'--data_json={small_shapes}/pretrain.json', '--prepare_shapes_data=False',
               f'--out_dir={tmp_path}', '--parallel=dpp']
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("parallel must be one of ('ddp', 'fsdp'), got 'dpp'") >= 2  # both ranks


ENTRY_POINTS = ('train.py', 'eval.py', 'bench.py', 'shapes.py', 'ablate.py', 'plot.py', 'mova.py', 'towers.py')


def config_names(script):
    """The --key=value names a script takes: the names it assigns before running configurator.py
    (ablate.py also passes train.py's on)."""
    source = open(script).read()
    head = source[:source.index("exec(open('configurator.py')")] if 'configurator.py' in source else source
    names = set(re.findall(r'^\s*(\w+)(?:, \w+)* = ', head, re.M)) | set(re.findall(r'^\s*\w+, (\w+) = ', head, re.M))
    return names | (train_defaults() if script == 'ablate.py' else set())


def shown_commands():
    """(where, script, args) of every `python X.py ...` / `torchrun ... X.py ...` shown in README.md and docs/*.md,
    in the entry points' docstrings and in the configs' comments."""
    import ast
    texts = {f: open(f).read() for f in ['README.md', *sorted(glob.glob('docs/*.md'))]}
    texts.update({f: ast.get_docstring(ast.parse(open(f).read())) or '' for f in ENTRY_POINTS if os.path.exists(f)})
    texts.update({f: open(f).read() for f in sorted(glob.glob('config/*.py'))})
    for where, text in texts.items():
        for line in text.splitlines():
            match = re.search(r'(?:python|torchrun)\b[^`#\n]*?\b(\w+\.py)\b([^`#\n]*)', line)
            if match and match.group(1) in ENTRY_POINTS:
                yield where, match.group(1), match.group(2).split()


def test_every_command_shown_names_real_files_keys_and_paths(small_shapes):
    """Every command the README, docs/, the docstrings and the configs show: the script and config files exist,
    every --key is one the script reads, a --ckpt_dir is where train.py writes a config's checkpoint, and
    a shapes file has a name that shapes.py writes."""
    ckpt_dirs = {os.path.join(re.search(r"^out_dir = '([^']+)'", open(f).read(), re.M).group(1), 'ckpt')
                 for f in glob.glob('config/*.py') if re.search(r"^out_dir = ", open(f).read(), re.M)}
    commands = list(shown_commands())
    assert len(commands) >= 15
    for where, script, args in commands:
        assert os.path.exists(script), (where, script)
        if any(a.startswith('--') and '=' not in a for a in args):
            continue  # another tool's flags (the official GQA script's, for one)
        for arg in args:
            if arg.startswith('config/'):
                assert os.path.exists(arg), (where, arg)
            elif arg.startswith('--'):
                key, value = arg[2:].split('=', 1)
                assert key in config_names(script), (where, script, key)
                if key == 'ckpt_dir' and value != '...':
                    assert value in ckpt_dirs, (where, value)
                if value.startswith('data/shapes/'):
                    assert (small_shapes / value.removeprefix('data/shapes/')).exists(), (where, value)


def test_a_config_file_may_only_set_keys_its_script_has(tmp_path):
    """configurator.py: a misspelt key in a config file stops the run, where it would have changed nothing;
    and every shipped config sets only keys of the script its header names (eval.py for eval_*)."""
    (tmp_path / 'typo.py').write_text("import math\nlearning_rate = math.sqrt(1e-8)\nlearnig_rate = 1e-4\n")
    result = subprocess.run([sys.executable, 'train.py', str(tmp_path / 'typo.py')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{tmp_path / 'typo.py'}: unknown config keys ['learnig_rate']" in result.stderr  # not 'math'
    for config in glob.glob('config/*.py'):
        script = 'eval.py' if os.path.basename(config).startswith('eval_') else 'train.py'
        assigned = set(re.findall(r'^(\w+) = ', open(config).read(), re.M))
        assert assigned and assigned <= config_names(script), (config, assigned - config_names(script))


def test_dry_run_shows_the_template_and_fails_on_skipped_samples(small_shapes, llama_tokenizers, tmp_path):
    """train.py --dry_run=True prints samples piece by piece with learned pieces marked, the visual-token
    count and the length distribution, and exits non-zero when too many samples are skipped; it builds
    the model on the meta device only. Here: the shapes world, then a LLaVA JSON read by a SentencePiece
    tokenizer, one of whose samples cannot fit max_length with its image."""
    result = run_dry(f'--data_json={small_shapes}/instruct.json', f'--image_folder={small_shapes}/images',
                     f'--tokenizer={small_shapes}/tokenizer')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '36 visual tokens per image' in result.stdout and '|ASSISTANT|:|⟦' in result.stdout
    assert 'length with visual tokens: min' in result.stdout
    Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
    long_question = 'What is shown here? ' * 60
    samples = [{'id': 'short', 'image': 'a.png', 'conversations': [
                   {'from': 'human', 'value': 'What is shown here?\n<image>'}, {'from': 'gpt', 'value': 'A photo of two dogs.'}]},
               {'id': 'long', 'image': 'a.png', 'conversations': [
                   {'from': 'human', 'value': '<image>\n' + long_question}, {'from': 'gpt', 'value': 'Yes'}]},
               {'id': 'text', 'conversations': [
                   {'from': 'human', 'value': 'What is shown here?'}, {'from': 'gpt', 'value': 'red'}]}]
    (tmp_path / 'llava.json').write_text(json.dumps(samples))
    result = run_dry(f'--data_json={tmp_path}/llava.json', f'--image_folder={tmp_path}',
                     f'--tokenizer={llama_tokenizers[True].name_or_path}', '--template=vicuna_v1', '--max_length=200')
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sample 'short'" in result.stdout and '<s>|▁A|' in result.stdout and '|<image>|▁|<0x0A>|' in result.stdout
    assert 'skipped: 1 x too long' in result.stdout and 'PROBLEM: 1 of 3 samples skipped' in result.stdout


def parts(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def assert_same(a, b):
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_all_changed(a, b):
    assert a.keys() == b.keys() and a
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert len(changed) == len(a), f'{len(a) - len(changed)} tensors did not change'


def test_stage1_trains_only_moecs_and_stage2_starts_from_them(small_shapes, tmp_path):
    untrained, _ = run_train(small_shapes, tmp_path / 'lr0', '--learning_rate=0.0')
    stage1, losses = run_train(small_shapes, tmp_path / 'stage1')
    assert len(losses) == 3 and all(l == l for l in losses)
    assert_same(parts(stage1, 'llm.'), parts(untrained, 'llm.'))              # frozen LLM: bit-identical
    assert_same(parts(stage1, 'encoders.'), parts(untrained, 'encoders.'))
    moec_weights = {k: v for k, v in parts(stage1, 'moecs.').items() if 'experts' in k and k.endswith('weight')}
    changed = [k for k in moec_weights if not torch.equal(moec_weights[k], untrained[k])]
    assert len(changed) >= len(moec_weights) // 2                              # routed experts moved
    assert all(not torch.equal(stage1[k], untrained[k]) for k in stage1 if k.endswith('gate.weight'))

    stage2_args = (f'--init_from={tmp_path}/stage1/ckpt', '--stage=2', '--template=phi',
                   f'--data_json={small_shapes}/instruct.json', '--gradient_checkpointing=True')
    # the checkpoint brings its architecture: a setting that differs stops the run, named; so does upcycling
    # over the MoECs it brings
    result = subprocess.run([sys.executable, 'train.py', 'config/shapes.py', *stage2_args, '--num_experts=2',
                             f'--upcycle_from={tmp_path}/lr0/ckpt', '--llm=tiny', '--llm_source=tiny',
                             f'--out_dir={tmp_path}/wrong'], capture_output=True, text=True)
    assert result.returncode != 0, result.stderr[-2000:]
    assert "num_experts=2 (the checkpoint's: 4)" in result.stderr and 'already brings trained MoECs' in result.stderr
    # the loss weights of Eq. 10 are this run's, not the checkpoint's: at 0 the loss is the LM loss alone
    stage2_lr0, _ = run_train(small_shapes, tmp_path / 'stage2', *stage2_args, '--learning_rate=0.0',
                              '--eval_shapes_at_end=True', '--shapes_benchmarks=pope', '--balance_coef=0.0',
                              '--z_coef=0.0')
    assert_same(parts(stage2_lr0, 'moecs.'), parts(stage1, 'moecs.'))        # stage 2 starts from stage 1
    logged = [json.loads(line) for line in (tmp_path / 'stage2' / 'metrics.jsonl').read_text().splitlines()]
    assert all(r['loss'] == pytest.approx(r['lm_loss']) and r['balance_loss'] > 0 for r in logged)
    lr0_answers = (tmp_path / 'stage2' / 'eval' / 'pope_answers.jsonl').read_text()
    # a new run into the same out_dir: its own losses, and its own answers (the lr0 ones set aside, not resumed)
    stage2, losses, output = run_train(small_shapes, tmp_path / 'stage2', *stage2_args, '--eval_shapes_at_end=True',
                                       with_output=True)
    assert len(losses) == 3 and output.count('answering afresh') == 1  # POPE's; GQA and MME are new
    eval_dir = tmp_path / 'stage2' / 'eval'
    assert (eval_dir / 'pope_answers.jsonl.other').read_text() == lr0_answers
    assert (eval_dir / 'pope_answers.jsonl.weights').read_text() == ev.checkpoint_stamp(tmp_path / 'stage2' / 'ckpt')
    assert len(ev.read_jsonl(eval_dir / 'pope_answers.jsonl')) == len(lr0_answers.splitlines())
    # the trained tiny checkpoint answered every shapes benchmark and all three scorers reported
    results = json.loads((tmp_path / 'stage2' / 'eval' / 'results.json').read_text())
    assert {'pope', 'gqa', 'mme'} <= set(results)
    assert results['pope']['num_missing'] == results['gqa']['num_missing'] == results['mme']['num_missing'] == 0
    assert 0 <= results['gqa']['accuracy'] <= 100 and 0 <= results['pope']['f1_avg'] <= 100
    assert results['mme']['perception'] is not None
    for benchmark in ('pope', 'gqa', 'mme'):  # each benchmark's routing: per MoEC, expert shares summing to 1
        assert set(results[benchmark]['expert_usage']) == set(ENCODER_ORDER) and results[benchmark]['expert_usage_images'] > 0
        assert all(sum(u) == pytest.approx(1) for u in results[benchmark]['expert_usage'].values())
    assert_all_changed(parts(stage2, 'llm.model.layers.0.'), parts(stage1, 'llm.model.layers.0.'))
    assert not torch.equal(stage2['moecs.siglip.gate.weight'], stage1['moecs.siglip.gate.weight'])
    assert_same(parts(stage2, 'encoders.'), parts(stage1, 'encoders.'))
    # the template and the tokenizer travel with the weights; eval.py uses them and warns when told otherwise
    ckpt = tmp_path / 'stage2' / 'ckpt'
    assert json.loads((ckpt / 'config.json').read_text())['template'] == 'phi'
    assert (ckpt / 'tokenizer' / 'tokenizer.json').is_file()
    ask = [sys.executable, 'eval.py', f'--ckpt_dir={ckpt}', f'--image={small_shapes}/images/000000.png',
           '--question=What color is the circle?', '--max_new_tokens=3']
    for overrides, warned in (((), False), (('--template=plain',), True)):
        result = subprocess.run(ask + list(overrides), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("was trained with the 'phi' template" in result.stdout) == warned


def test_upcycling_from_a_one_expert_run_and_from_a_llava_projector(small_shapes, tmp_path):
    """Paper Table 4's upcycling, from both sources a user has: a one-expert MoCHA run (num_experts=1,
    top_k=1: LLaVA's MLP connector per encoder), and LLaVA-1.5's mm_projector.bin (one MLP reading CLIP,
    keys 'model.mm_projector.0.weight', ...). With lr 0 every expert still equals its source after a step."""
    clip_only = "--encoders=('clip',)"
    mlp, _ = run_train(small_shapes, tmp_path / 'mlp', clip_only, '--num_experts=1', '--top_k=1', '--max_steps=1')
    projector = {k.replace('moecs.clip.experts.0.', 'model.mm_projector.'): v
                 for k, v in mlp.items() if k.startswith('moecs.clip.experts.0.')}
    torch.save(projector, tmp_path / 'mm_projector.bin')
    for source in (tmp_path / 'mlp' / 'ckpt', tmp_path / 'mm_projector.bin'):
        upcycled, _ = run_train(small_shapes, tmp_path / f'from_{source.stem}', clip_only, f'--upcycle_from={source}',
                                '--learning_rate=0.0', '--max_steps=1')
        for e in range(4):
            for layer in ('0.weight', '0.bias', '2.weight', '2.bias'):
                assert torch.equal(upcycled[f'moecs.clip.experts.{e}.{layer}'], projector[f'model.mm_projector.{layer}'])


# -----------------------------------------------------------------------------
# looking inside a run: routing and HGA statistics, FLOPs, metrics.jsonl, plot.py, eval.py --explain


def test_routing_statistics_and_the_collapse_check():
    """MoEC's stats: shares of the top-k assignments (sum 1), router entropy, its losses; collapsed_experts
    (train.py's WARNING) names the experts a router never picks and nobody on a balanced router. < 1 s."""
    from mocha import collapsed_experts
    torch.manual_seed(0)
    moec = MoEC(8, 16, num_experts=4, top_k=2)
    x = torch.randn(4, 64, 8)
    stats = {}
    _, balance, z = moec(x, stats)
    probs = moec.gate(x).softmax(-1)
    assert stats['usage'].sum().item() == pytest.approx(1) and stats['top1'].shape == (4, 64)
    torch.testing.assert_close(stats['entropy'], -(probs * probs.log()).sum(-1).mean())
    assert (stats['balance_loss'], stats['z_loss']) == (balance, z)
    assert collapsed_experts([stats['usage'].tolist()] * 3, 0.1) == []          # a random router on random tokens
    with torch.no_grad():  # one logit dominates, a second is next: on positive tokens experts 2 and 3 never win
        moec.gate.weight.copy_(torch.tensor([10.0, 5.0, 0.0, 0.0])[:, None].expand(4, 8))
    stats = {}
    moec(x.abs(), stats)
    assert stats['usage'].tolist() == [0.5, 0.5, 0.0, 0.0] and stats['top1'].eq(0).all()
    assert collapsed_experts([stats['usage'].tolist()] * 3, 0.1) == [2, 3]
    assert collapsed_experts([[0.5, 0.5, 0.0, 0.0], [0.4, 0.5, 0.08, 0.02]], 0.1) == [3]  # the window's mean counts
    assert collapsed_experts([[0.5, 0.5, 0.0, 0.0], [0.25] * 4], 0.1) == [] and collapsed_experts([[1.0]], 0.1) == []


def test_forward_stats_cover_every_moec_and_hga(tiny_mocha):
    ids, mask = batch_of([[5, IMAGE_TOKEN_ID, 6, 7], [8, 9, 10, 11]])
    with torch.no_grad():
        stats = tiny_mocha(ids, mask, None, random_images(1), with_stats=True)['stats']
        assert 'stats' not in tiny_mocha(ids, mask, None, random_images(1))
        assert tiny_mocha(ids[1:], mask[1:], with_stats=True)['stats'] == {}   # no image, nothing routed
    assert set(stats) == set(ENCODER_ORDER) | {'hga'}
    for name, size in zip(ENCODER_ORDER, tiny_mocha.group_sizes):
        assert stats[name]['usage'].sum().item() == pytest.approx(1) and stats[name]['top1'].shape == (1, size)
    hga = stats['hga']
    assert 0 < hga['gate'] < 1 and 0 <= hga['inter_weight'] <= 1 and 0 <= hga['intra_weight'] <= 1
    assert not any(v.requires_grad for s in stats.values() for v in s.values())


def test_model_flops_leave_out_the_checkpointing_recompute(tokenizer_dir):
    """count_flops (train.py's FLOP/s and MFU, bench.py's table) counts on fake tensors: the same FLOPs as
    FlopCounterMode around the real step, without touching the model's gradients. With gradient checkpointing
    the hardware count grows by the decoder layers' forward and the model count stays the same. ~3 s."""
    from torch.utils.flop_counter import FlopCounterMode
    from mocha import count_flops
    torch.manual_seed(0)
    model = MoCHA(tiny_config(tokenizer_dir)).train()
    ids, mask = batch_of([[5, IMAGE_TOKEN_ID, 6, 7, 8], [5, 6, 7, 8, 9]])
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(ids == IMAGE_TOKEN_ID, IGNORE_INDEX),
                 images=random_images(1))
    plain = count_flops(model, batch)
    assert all(p.grad is None for p in model.parameters())
    with FlopCounterMode(display=False) as real_step:  # the straightforward count: the real step, counted
        model(**batch)['loss'].backward()
    assert plain['model'] == plain['hardware'] == real_step.get_total_flops()
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    checkpointed = count_flops(model, batch)
    assert plain['model'] == checkpointed['model'] < checkpointed['hardware']
    layers = [name for name in checkpointed['by_module'] if re.search(r'llm\.model\.layers\.\d+$', name)]
    assert len(layers) == 2


def test_metrics_plot_and_explain_from_a_short_run(small_shapes, tmp_path):
    """A 4-step run with a held-out split writes metrics.jsonl (loss parts, speed, FLOPs, routing, HGA,
    validation losses, the collapse check of train.py) and --profile's table; plot.py and eval.py --explain
    draw it. ~30 s."""
    from mocha import collapsed_experts
    _, _, output = run_train(small_shapes, tmp_path, '--max_steps=4', '--val_fraction=0.25', '--eval_interval=2',
                             '--collapse_window=2', '--stage=2', '--template=phi', '--profile=True',
                             '--gradient_checkpointing=True', '--trace_memory=True',
                             f'--data_json={small_shapes}/instruct.json', with_output=True)
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    logs = [r for r in records if 'val_loss' not in r]
    assert [r['step'] for r in logs] == [1, 2, 3, 4]
    assert [r['step'] for r in records if 'val_loss' in r] == [2, 4]
    assert all(math.isfinite(r['val_loss']) for r in records if 'val_loss' in r)
    assert output.count('val lm') == 2
    # each step's peak (torch's MemTracker): the first needs no more than the later ones, whose AdamW state
    # exists from their start (FLOPs are counted on fake tensors, not by holding a real step's activations)
    peaks = [r['peak_memory'] for r in logs]
    print('peaks', peaks)
    assert peaks[0] <= min(peaks[1:]) and all(f"peak {p / 2 ** 30:.2f} GiB" in output for p in peaks)
    for r in logs:
        assert {'lr', 'loss', 'lm_loss', 'balance_loss', 'z_loss', 'tokens_per_s', 'flops_per_s', 'mfu'} <= set(r)
        assert r['flops_per_token'] > 0 and r['mfu'] is None                   # CPU: no known peak
        assert set(r['moec']) == set(ENCODER_ORDER)
        assert all(sum(m['usage']) == pytest.approx(1, abs=1e-5) and m['entropy'] > 0 for m in r['moec'].values())
        assert 0 < r['hga']['gate'] < 1
    # the collapse check is collapsed_experts over the last collapse_window log steps, warned about once
    for i, r in enumerate(logs):
        window = logs[max(i - 1, 0):i + 1]
        expected = [f'{name}.{e}' for name in ENCODER_ORDER if len(window) == 2
                    for e in collapsed_experts([w['moec'][name]['usage'] for w in window], 0.1)]
        assert r['collapsed'] == expected
    collapsed = {c for r in logs for c in r['collapsed']}
    assert output.count('WARNING: expert collapse') >= len(collapsed)
    for c in collapsed:
        name, e = c.split('.')
        assert f'the {name} MoEC sent' in output and f'to expert {e} over' in output

    # --profile: the time of each part of the 3 steps after the first, per step, and its share of their wall time
    rows = re.findall(r'^  (.+?) +([\d.]+) ms +([\d.]+) %$', output.split('profile: 3 steps after the first')[1], re.M)
    assert [part for part, _, _ in rows] == ['data', 'encoders', 'MoECs', 'HGA', 'LM forward',
                                             'rest of the forward (splice, losses)', 'backward', 'optimizer',
                                             'other (logs, validation, checkpoints)']
    assert all(float(ms) > 0 for _, ms, _ in rows)
    assert sum(float(share) for _, _, share in rows) == pytest.approx(100, abs=0.5)

    subprocess.run([sys.executable, 'plot.py', str(tmp_path)], check=True, capture_output=True, timeout=120)
    for name in ('curves.png', 'experts.png'):
        assert os.path.getsize(tmp_path / name) > 10_000 and Image.open(tmp_path / name).size == (1000, 600)
    model = MoCHA.from_pretrained(str(tmp_path / 'ckpt')).eval()
    picture = data.load_image(str(small_shapes / 'images' / '000000.png'), model.config.image_size)
    answer = ev.explain_answer(model, model.tokenizer, 'What color is the circle?', picture,
                               str(tmp_path / 'explain.png'), max_new_tokens=3)
    assert isinstance(answer, str)
    assert os.path.getsize(tmp_path / 'explain.png') > 10_000
    assert Image.open(tmp_path / 'explain.png').size == (400 * 5, 460)      # four MoEC panels and HGA's


def test_sorted_micro_batches_hold_the_samples_of_one_batch(small_shapes, tmp_path):
    """sort_micro_batches (config/shapes.py's): a step of two micro-batches of 2 sorted by length learns from the
    samples of one batch of 4, so the first step's LM loss, taken before any update, is the same (each learned
    token weighs alike in both); the MoEC balance loss is the micro-batches' mean, so the total loss is not."""
    _, _, one = run_train(small_shapes, tmp_path / 'one', '--batch_size=4', '--max_steps=1', with_output=True)
    _, _, two = run_train(small_shapes, tmp_path / 'two', '--batch_size=2', '--gradient_accumulation_steps=2',
                          '--sort_micro_batches=True', '--max_steps=1', with_output=True)
    first_lm = lambda output: float(re.search(r'step 1/1 loss \S+ lm (\S+)', output).group(1))
    assert first_lm(one) == pytest.approx(first_lm(two), abs=2e-4)
    both = run_dry('--group_by_length=2', '--sort_micro_batches=True')  # one regrouping or the other, said so
    assert both.returncode != 0 and 'one or the other' in both.stderr


def test_data_seed_moves_the_data_order_and_leaves_the_init(small_shapes, tmp_path):
    """data_seed seeds the shuffle apart from `seed`, which still seeds the weights: with no update (learning rate
    0) two runs of one seed end with the same weights, and a data_seed of its own gives other batches, so other
    losses."""
    weights, losses = run_train(small_shapes, tmp_path / 'seed', '--learning_rate=0.0')
    moved_weights, moved_losses = run_train(small_shapes, tmp_path / 'moved', '--learning_rate=0.0', '--data_seed=5')
    assert weights.keys() == moved_weights.keys()
    assert all(torch.equal(weights[k], moved_weights[k]) for k in weights)
    assert len(losses) == len(moved_losses) == 3 and losses != moved_losses


def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(small_shapes, tmp_path):
    """group_by_length sorts whole global batches (4 samples here, from one process or two) by length."""
    _, one = run_train(small_shapes, tmp_path / 'one', '--batch_size=4', '--group_by_length=2')
    _, two = run_train(small_shapes, tmp_path / 'two', '--batch_size=2', '--group_by_length=2', nproc=2)
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, abs=1e-4)


@pytest.mark.parametrize('parallel', ['ddp', 'fsdp'])
def test_an_over_long_sample_leaves_both_processes_in_step(small_shapes, tmp_path, parallel):
    """Two processes, one sample each per step, four samples: two normal, one whose prompt alone passes
    max_length (skipped at load time: its process gets an empty micro-batch, run as one padding token
    without image) and one whose answer does (cut). A process that crashed, took a step less or held other
    gradients (FSDP reduce-scatters what each holds) would stop the other in a collective; both must report
    the same last step. max_length=1100 is past the tiny LM's 1024 positions, so the run also starts with
    the warning about positions it was not trained on. 11 s each on 2 cores (25-30 s with other jobs)."""
    instruct = json.loads((small_shapes / 'instruct.json').read_text())
    normal = [s for s in instruct if s.get('image')][:2]
    words = ' '.join(['what color is the circle ?'] * 250)  # about 1500 tokens
    samples = normal + [
        dict(id='long_prompt', image=normal[0]['image'], conversations=[
            {'from': 'human', 'value': '<image>\n' + words}, {'from': 'gpt', 'value': 'red'}]),
        dict(id='long_answer', image=normal[1]['image'], conversations=[
            {'from': 'human', 'value': '<image>\nDescribe it.'}, {'from': 'gpt', 'value': words}])]
    (tmp_path / 'long.json').write_text(json.dumps(samples))
    _, losses, output = run_train(small_shapes, tmp_path / 'out', f'--data_json={tmp_path}/long.json', '--stage=2',
                                  '--template=phi', '--batch_size=1', '--max_steps=2', '--max_length=1100',
                                  f'--parallel={parallel}', nproc=2, with_output=True)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert output.count("sample 'long_prompt'") == 1 and 'too long' in output and "'long_answer'" not in output
    # found anywhere, not line by line: the two processes share one pipe, and another line may land in between
    stops = sorted(re.findall(r'rank \d: (stopped after step \d+; samples skipped as bad here: \d+)', output))
    assert stops == ['stopped after step 2; samples skipped as bad here: 0',
                     'stopped after step 2; samples skipped as bad here: 1']
    assert 'WARNING: max_length=1100 is past the 1024 positions' in output


def test_a_training_batch_without_images_gives_the_connectors_zero_gradients(tiny_mocha):
    """What keeps FSDP processes in step when one has only text: every training forward reaches the same
    parameters (the image path runs on a blank image, weighted 0), and the loss is the text's alone."""
    tiny_mocha.train()
    tiny_mocha.zero_grad(set_to_none=True)
    ids, mask = batch_of([[3, 8, 9, 10], [3, 8, 9]])
    out = tiny_mocha(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX))
    out['loss'].backward()
    assert all(p.grad is not None and not p.grad.any() for p in tiny_mocha.moecs.parameters())
    assert out['loss'].item() == out['lm_loss'].item() and out['balance_loss'] == out['z_loss'] == 0
    tiny_mocha.zero_grad(set_to_none=True)


def test_text_training_with_the_image_path_frozen_skips_the_blank_image(tiny_mocha):
    """config/shapes_lm.py trains the LM alone (train_connectors=False): with nothing of the image path to
    keep in step, no blank image runs through the encoders, and only the LM gets gradients."""
    calls = []
    hook = tiny_mocha.encoders.register_forward_hook(lambda *args: calls.append(1))
    image_path = [tiny_mocha.encoders, tiny_mocha.moecs, tiny_mocha.hga]
    flags = {p: p.requires_grad for p in tiny_mocha.parameters()}  # the module-scoped fixture's, restored after
    try:
        tiny_mocha.train()
        tiny_mocha.zero_grad(set_to_none=True)
        for part in image_path:
            part.requires_grad_(False)
        ids, mask = batch_of([[3, 8, 9, 10], [3, 8, 9]])
        tiny_mocha(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX))['loss'].backward()
        assert calls == []
        assert all(p.grad is None for part in image_path for p in part.parameters())
        assert all(p.grad is not None for p in tiny_mocha.llm.parameters())
        tiny_mocha.moecs.requires_grad_(True)  # one trainable part of the image path: the blank image runs
        tiny_mocha(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX))['loss'].backward()
        assert calls == [1]
    finally:
        hook.remove()
        tiny_mocha.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def test_resumed_lora_run_gives_the_losses_of_an_uninterrupted_one_then_merges_and_is_scored(small_shapes, tmp_path):
    """config/stage2_lora.py's path on the shapes world: LoRA on a pretrained (local) LLM with adapter-only checkpoints,
    two optimizer param groups (the adapters, the MoECs at connector_lr_scale) and dropout, which draws from the RNG
    the resume restores; then the merged checkpoint and the benchmarks scored."""
    llm = save_tiny_llm(f'{small_shapes}/tokenizer', tmp_path / 'llm')
    args = ('--max_steps=6', '--stage=2', '--template=phi', f'--data_json={small_shapes}/instruct.json',
            f'--llm={llm}', '--llm_source=pretrained',
            '--lora_rank=4', '--lora_alpha=8', '--lora_dropout=0.1', '--connector_lr_scale=0.25', '--merge_lora=True')
    full_state, full = run_train(small_shapes, tmp_path / 'full', *args, '--eval_shapes_at_end=True',
                                 '--shapes_benchmarks=pope')
    run_train(small_shapes, tmp_path / 'cut', *args, '--stop_at_step=3')
    resumed_state, resumed = run_train(small_shapes, tmp_path / 'cut', *args, '--init_from=resume')
    assert len(full) == len(resumed) == 6
    assert full == pytest.approx(resumed, abs=1e-5)
    for k in full_state:
        torch.testing.assert_close(full_state[k], resumed_state[k], atol=1e-5, rtol=1e-5)
    assert parts(full_state, 'llm.') and all('lora_' in k for k in parts(full_state, 'llm.'))  # adapters alone
    assert all(v.abs().sum() > 0 for k, v in full_state.items() if 'lora_B' in k)              # trained off zero
    merged = load_file(tmp_path / 'full' / 'merged' / 'model.safetensors')
    assert 'llm.model.layers.0.self_attn.q_proj.weight' in merged and not any('lora_' in k for k in merged)
    assert json.loads((tmp_path / 'full' / 'eval' / 'results.json').read_text())['pope']['num_missing'] == 0


def test_a_routed_mova_run_trains_on_its_routing_data_resumes_exactly_and_is_scored(small_shapes, tmp_path):
    """ablate.py's mova_routed on the shapes world: a MoVA model labels training samples by MoVA's rule (routing_from),
    the run trains on them and their routing conversations, with the tokenizer grown by the routing prompt's words;
    cut and resumed it gives the uninterrupted run's losses and weights; it is scored with the LLM routing first,
    against the lab's oracle, and then by the oracle alone (mova_oracle)."""
    torch.manual_seed(0)
    labeller = MoCHA(tiny_config(f'{small_shapes}/tokenizer', connector='mova', mova_pool=1, mova_blocks=1,
                                 template='phi'))
    trained_looking(labeller.mova)
    labeller.save_pretrained(str(tmp_path / 'labeller'))
    args = ('--stage=2', '--template=phi', '--connector=mova', '--mova_pool=1', '--mova_blocks=1', '--max_steps=6',
            f'--data_json={small_shapes}/instruct.json', f"--routing_from={tmp_path / 'labeller'}",
            '--routing_samples=8')
    full = tmp_path / 'ablate' / 'mova_routed' / 'seed0'  # where ablate.py puts it: plot.py's routing figure reads it
    state, losses = run_train(small_shapes, full, *args, '--eval_shapes_at_end=True',
                              '--shapes_benchmarks=lab_pope,lab_gqa', '--eval_route=llm')
    run_train(small_shapes, tmp_path / 'cut', *args, '--stop_at_step=3')
    resumed_state, resumed = run_train(small_shapes, tmp_path / 'cut', *args, '--init_from=resume')
    assert len(losses) == len(resumed) == 6 and losses == pytest.approx(resumed, abs=1e-5)
    for k in state:
        torch.testing.assert_close(state[k], resumed_state[k], atol=1e-5, rtol=1e-5)
    assert parts(state, 'mova.blocks.0.cross_attns.') and not parts(state, 'moecs.')
    routing_data = json.loads((full / 'routing' / 'instruct.json').read_text())
    routing = [s for s in routing_data if s['id'].endswith('-routing')]
    assert len(routing) == 8 and all(s['experts'] == [] for s in routing)
    model = MoCHA.from_pretrained(str(full / 'ckpt')).eval()
    ids = model.tokenizer(routing[0]['conversations'][0]['value'].replace('<image>', '')).input_ids
    assert model.tokenizer.unk_token_id not in ids                     # the routing prompt's words were appended
    routed = json.loads((full / 'eval' / 'results.json').read_text())['lab_pope']
    questions = ev.read_jsonl(small_shapes / 'eval' / 'lab' / 'pope' / 'llava_pope_test.jsonl')
    assert routed['num_missing'] == 0 and routed['mova_routing']['answers'] == len(questions)
    assert 0 <= routed['mova_routing']['matches_oracle'] <= 100         # scored against the shipped probe matrix
    probe = json.loads(open('weights/towers/probe.json').read())
    oracle = ev.evaluate_shapes(model, model.tokenizer, str(small_shapes), str(tmp_path / 'oracle'), max_new_tokens=3,
                                benchmarks=['lab_pope'], route='oracle', probe=probe)['lab_pope']
    assert oracle['num_missing'] == 0 and oracle['mova_routing']['malformed'] == 0
    import towers
    from mova import routing_answer
    experts = ['siglip', 'convnext', 'dinov2']
    for answer, question in zip(ev.read_jsonl(tmp_path / 'oracle' / 'lab_pope_answers.jsonl'), questions):
        chosen = towers.oracle_experts(question['text'], probe, experts)
        assert answer['metadata']['experts'] == routing_answer(torch.tensor([e in chosen for e in experts]))
    import plot
    plot.plot_routing(str(tmp_path / 'ablate'), str(small_shapes), str(tmp_path / 'routing.png'))
    assert (tmp_path / 'routing.png').stat().st_size > 10_000


def test_routing_data_labels_each_sample_by_the_experts_that_lower_its_answer_loss(small_shapes, tmp_path):
    """mova.py's writer: per-sample answer losses equal MoCHA.forward's, the labels are 'alone below none', and the
    routing conversations (letters or none) join the instruct data in LLaVA's format."""
    import mova
    torch.manual_seed(0)
    model = MoCHA(tiny_config(f'{small_shapes}/tokenizer', connector='mova', mova_pool=1, mova_blocks=1,
                              template='phi')).eval()
    trained_looking(model.mova)
    dataset = data.LLaVADataset(f'{small_shapes}/instruct.json', f'{small_shapes}/images', model.tokenizer, 'phi', 64,
                                512, model.num_visual_tokens)
    batch = data.collate([dataset[i] for i in range(3)], model.tokenizer.eos_token_id, 64)
    everything = torch.ones(3, 3, dtype=torch.bool)
    with torch.no_grad():
        per_sample = mova.answer_losses(model, batch, everything)
        for i in range(3):
            alone = {k: v[i:i + 1] for k, v in batch.items() if k in ('input_ids', 'attention_mask', 'labels', 'images')}
            torch.testing.assert_close(per_sample[i], model(**alone)['lm_loss'])
        none = mova.answer_losses(model, batch, torch.zeros(3, 3, dtype=torch.bool))
        one = mova.answer_losses(model, batch, torch.tensor([[True, False, False]] * 3))
    assert torch.equal(mova.routing_labels(model, batch)[:, 0], one < none)
    counts = mova.write_routing_data(model, f'{small_shapes}/instruct.json', f'{small_shapes}/images',
                                     str(tmp_path / 'routing'), batch_size=4, max_samples=6)
    written = json.loads((tmp_path / 'routing' / 'instruct.json').read_text())
    routing = [s for s in written if s['id'].endswith('-routing')]
    assert len(written) == len(json.loads((small_shapes / 'instruct.json').read_text())) + 6 == len(routing) + len(dataset)
    assert sum(counts.values()) >= 6
    experts = ['siglip', 'convnext', 'dinov2']
    labelled = {s['id']: s['experts'] for s in written if 'experts' in s and not s['id'].endswith('-routing')}
    assert len(labelled) == 6
    for sample in routing:
        human, answer = sample['conversations']
        assert human['value'].startswith('<image>\nYou are a helpful assistant router.')
        assert not mova.parse_routing(answer['value'], 3)[1]                     # letters or none, never junk
        assert sample['experts'] == []                                           # routed through the base alone
        chosen = labelled[sample['id'].removesuffix('-routing')]                 # the labels, in both forms
        assert answer['value'] == mova.routing_answer(torch.tensor([e in chosen for e in experts]))
    routed = data.LLaVADataset(str(tmp_path / 'routing' / 'instruct.json'), f'{small_shapes}/images', model.tokenizer,
                               'phi', 64, 2048, model.num_visual_tokens, experts=experts)
    assert len(routed) == len(written) and not routed.skipped
    batch = data.collate([routed[i] for i in range(len(routed))], model.tokenizer.eos_token_id, 64)
    masks = {s['id']: [e in s.get('experts', experts) for e in experts] for s in routed.samples if s.get('image')}
    assert batch['expert_mask'].tolist() == [masks[i] for i in batch['ids'] if i in masks]
    grown = AutoTokenizer.from_pretrained(str(tmp_path / 'routing' / 'tokenizer'))
    assert grown.get_vocab() | model.tokenizer.get_vocab() == grown.get_vocab()   # words appended, none moved
    assert grown.unk_token_id not in grown(routing[0]['conversations'][0]['value']).input_ids


@pytest.fixture(scope='module')
def one_process_stage2(small_shapes, tmp_path_factory):
    """(weights, losses) of a 3-step stage-2 run of the shapes world on one process, batch 4, encoders frozen:
    the reference of the FSDP test and of the encoder_lr_scale test."""
    return run_train(small_shapes, tmp_path_factory.mktemp('stage2') / 'one', '--stage=2', '--template=phi',
                     f'--data_json={small_shapes}/instruct.json', '--batch_size=4')


def test_encoder_lr_scale_sets_how_fast_trained_encoders_move(small_shapes, tmp_path, one_process_stage2):
    args = ('--stage=2', '--template=phi', f'--data_json={small_shapes}/instruct.json')
    frozen, _ = one_process_stage2  # the same run with frozen encoders
    still, _ = run_train(small_shapes, tmp_path / 'scale0', *args, '--train_encoders=True', '--encoder_lr_scale=0.0')
    moving, _ = run_train(small_shapes, tmp_path / 'scale1', *args, '--train_encoders=True', '--encoder_lr_scale=1.0')
    assert_same(parts(still, 'encoders.'), parts(frozen, 'encoders.'))            # lr 0: bit-identical
    patch = [k for k in moving if k.startswith('encoders.') and '.clip.' in k and 'patch_embedding' in k]
    assert patch and all(not torch.equal(moving[k], frozen[k]) for k in patch)


def test_llm_layers_sets_the_depth_of_a_tiny_lm_and_travels_with_the_checkpoint(one_step_deep_run):
    """train.py --llm_layers=3 (the shapes LM has 2): three decoder layers are trained and saved, and the
    checkpoint rebuilds them, as eval.py loads it."""
    weights = load_file(one_step_deep_run / 'ckpt' / 'model.safetensors')
    layers = {k.split('.')[3] for k in weights if k.startswith('llm.model.layers.')}
    assert layers == {'0', '1', '2'}
    model = MoCHA.from_pretrained(one_step_deep_run / 'ckpt')
    assert model.config.llm_layers == 3 and len(model.llm.model.layers) == 3


def test_fsdp_stage2_gives_the_losses_of_one_process(small_shapes, tmp_path, one_process_stage2):
    args = ('--stage=2', '--template=phi', f'--data_json={small_shapes}/instruct.json')
    _, one = one_process_stage2
    _, sharded = run_train(small_shapes, tmp_path / 'fsdp', *args, '--batch_size=2', '--parallel=fsdp', nproc=2)
    assert len(one) == len(sharded) == 3
    assert one[0] == pytest.approx(sharded[0], abs=1e-5)  # the same forward, sharded
    # after an update: AdamW's first step is about lr * sign(gradient), so gradient entries near zero, summed in
    # another order over two processes, can flip. Seeds 1337 / 1 / 2 differ by 3e-5 / 1.5e-4 / 2e-7 (relative)
    assert one[1:] == pytest.approx(sharded[1:], rel=1e-3)


def test_ablate_pairs_each_variant_with_full_by_seed_and_judges_it_against_the_paper():
    """Hand-computed: differences (variant - full) of 1, 2, 3 points have mean 2, sd 1, and a 95 % interval of
    2 +- t(0.975, 2) / sqrt(3) = 2 +- 2.484, which holds 0; -3, -2, -4 give -3 +- 2.484, the paper's direction for
    SigLIP alone. Minimum detectable: (t(0.975, 2) + t(0.80, 2)) * 1 / sqrt(3) = (4.303 + 1.061) / 1.732."""
    import ablate
    def run(pope, gqa):
        return {name: None for name in ablate.METRICS} | dict(pope_mean=pope, gqa=gqa)
    full = {0: run(90, 70), 1: run(91, 71), 2: run(92, 72)}
    runs = {'full': full, 'mlp': {s: run(m['pope_mean'] + d, m['gqa'] + d) for (s, m), d in zip(full.items(), (1, 2, 3))},
            'siglip': {s: run(m['pope_mean'] + d, m['gqa']) for (s, m), d in zip(full.items(), (-3, -2, -4))}}
    rows, power = ablate.paired(ablate.ablation_table(runs, []))
    mlp, siglip = rows['mlp']['pope_mean'], rows['siglip']['pope_mean']
    assert mlp['mean'] == 2 and mlp['low'] == pytest.approx(2 - 2.4841, abs=1e-3) and mlp['verdict'] == 'not detected'
    assert siglip['high'] == pytest.approx(-3 + 2.4841, abs=1e-3) and siglip['verdict'] == "paper's direction"
    assert rows['siglip']['gqa']['verdict'] == 'not detected'                # no difference at all: sd 0, mean 0
    assert power['pope_mean']['minimum_detectable'] == pytest.approx((4.3027 + 1.0607) / math.sqrt(3), abs=1e-3)
    # each row's own spread: mlp's differences 1, 2, 3 have sd 1 (6 seeds for 1.5 points, below); siglip's GQA sd 0
    assert mlp['sd'] == 1 and mlp['seeds_for_effect'] == 6 and rows['siglip']['gqa']['seeds_for_effect'] == 2
    table = ablate.paired_markdown(rows, power)
    assert '| mlp | 6 (sd 1.00) | 6 (sd 1.00) |' in table
    # Table 5's steps: adding ConvNeXt to SigLIP gained the paper 5.57 POPE; here +1, +2, +3 over SigLIP alone
    runs['siglip_convnext'] = {s: run(m['pope_mean'] + d, m['gqa']) for (s, m), d in zip(runs['siglip'].items(), (1, 2, 3))}
    steps = ablate.encoder_steps(ablate.ablation_table(runs, []))
    assert list(steps) == ['siglip_convnext − siglip']  # siglip_clip_convnext's steps need runs it does not have
    assert steps['siglip_convnext − siglip']['pope_mean']['mean'] == 2
    assert steps['siglip_convnext − siglip']['pope_mean']['paper'] == pytest.approx(87.84 - 82.27)
    # sd 1: 5 seeds detect (2.776 + 0.941) / sqrt(5) = 1.66 points, 6 seeds (2.571 + 0.920) / sqrt(6) = 1.43
    assert ablate.seeds_for(1.0, effect=1.5) == 6
    # the lab's question types pair the same way, judged only higher or lower (the paper has no such numbers)
    for s, d in zip(range(3), (-3, -2, -4)):
        for variant, base in (('full', 30.0), ('siglip', 30.0 + d)):
            runs[variant][s] = runs[variant][s] | dict(lab_binding=base, lab_count=50.0 + s)
    rows, power = ablate.paired(ablate.ablation_table(runs, []), variants=('siglip',), metrics=ablate.LAB_FACTORS)
    assert rows['siglip']['lab_binding']['mean'] == -3 and rows['siglip']['lab_binding']['verdict'] == 'lower'
    assert rows['siglip']['lab_count']['verdict'] == 'not detected' and rows['siglip']['lab_texture']['n'] == 0
    assert list(power) == ['lab_binding', 'lab_count']  # the metrics these runs have
    assert 'lab_binding: difference' in ablate.paired_markdown(rows, power, metrics=ablate.LAB_FACTORS)


def test_ablate_question_share_splits_the_paired_spread_into_questions_and_seeds(tmp_path, monkeypatch):
    """Four GQA questions, three seeds; 'full' answers all of them right. The variant's ('mlp') seed 0 gets all four wrong and
    its seeds 1 and 2 all four right: the questions move together, a whole seed's model is worse, so the question-level
    share of the paired variance is 1/4 (each question's variance over seeds, weighted 1/16, summed over 4, against
    the variance of the accuracy difference: 4 * (1/16) * v / v). Twice the questions would not narrow it."""
    import ablate
    questions = {str(q): dict(answer='red', types=dict(structural='query', detailed='queryAttr')) for q in range(4)}
    gqa_dir = tmp_path / 'shapes' / 'eval' / 'gqa'
    gqa_dir.mkdir(parents=True)
    (gqa_dir / 'testdev_balanced_questions.json').write_text(json.dumps(questions))
    runs = {}
    for variant, right_at_seed in (('full', (True, True, True)), ('mlp', (False, True, True))):
        for seed, right in enumerate(right_at_seed):
            answers = tmp_path / 'ablate' / variant / f'seed{seed}' / 'eval' / 'gqa_answers.jsonl'
            answers.parent.mkdir(parents=True)
            answers.write_text(''.join(json.dumps(dict(question_id=q, text='red' if right else 'blue')) + '\n'
                                       for q in questions))
            runs.setdefault(variant, {})[seed] = {name: None for name in ablate.METRICS} | dict(gqa=100.0 * right)
    monkeypatch.setattr(ablate, 'out_dir', str(tmp_path / 'ablate'))
    monkeypatch.setattr(ablate, 'shapes_dir', str(tmp_path / 'shapes'))
    share = ablate.question_share(ablate.ablation_table(runs, []))
    assert set(share) == {'gqa'} and share['gqa'] == pytest.approx(0.25)


def test_ablate_runs_variants_by_seeds_into_one_table(small_shapes, tmp_path):
    """ablate.py --lm_config=config/shapes_lm.py: each seed's LM stage on text, then 'mlp' x seeds 0 and 1, 2 steps
    each, two processes at once, then 'upcycled' from each seed's MLP (about a minute on 2 busy cores). The seed is
    honest: it changes the losses on the same data."""
    import ablate
    out = tmp_path / 'ablate'
    result = subprocess.run(
        [sys.executable, 'ablate.py', '--variants=mlp,upcycled', '--seeds=0,1', '--jobs=2', f'--out_dir={out}',
         '--lm_config=config/shapes_lm.py', f'--data_json={small_shapes}/instruct.json', f'--image_folder={small_shapes}/images',
         f'--tokenizer={small_shapes}/tokenizer', '--prepare_shapes_data=False', '--num_workers=0',
         '--batch_size=4', '--max_steps=2', '--train_encoders=False',
         f'--lm_args=--data_json={small_shapes}/text.json --tokenizer={small_shapes}/tokenizer --prepare_shapes_data=False '
         '--num_workers=0 --batch_size=4 --max_steps=2 --val_fraction=0'], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((out / 'ablation.json').read_text())
    assert list(table) == ['lm', 'mlp', 'upcycled']
    # the text step's row: GQA in words only (no image benchmark ran on it), per seed
    assert set(table['lm']['per_seed']) == {'0', '1'} and table['lm']['mean']['pope_mean'] is None
    assert all(0 <= table['lm']['per_seed'][seed]['words_gqa'] <= 100 for seed in ('0', '1'))
    for row in (table['mlp'], table['upcycled']):
        assert row['seeds'] == [0, 1] and set(row['per_seed']) == {'0', '1'}
        assert list(row['mean']) == list(row['std']) == list(ablate.METRICS)
        for name in ablate.METRICS:
            values = [row['per_seed'][seed][name] for seed in ('0', '1')]
            if None not in values:
                assert row['mean'][name] == pytest.approx(statistics.mean(values))
                assert row['std'][name] == pytest.approx(statistics.stdev(values))
        assert row['std']['pope_mean'] is not None and row['std']['gqa'] is not None
    assert '| mlp | 2 |' in (out / 'ablation.md').read_text()
    assert 'upcycled every expert' in (out / 'upcycled' / 'seed0' / 'train.log').read_text()
    assert (out / 'mlp/seed0/losses.txt').read_text() != (out / 'mlp/seed1/losses.txt').read_text()
    # each seed's variants start from that seed's text-pretrained LM
    assert f"--llm={out}/lm/seed1/llm" in (out / 'mlp/seed1/ablate_command.json').read_text()
    # the shipped towers' tokens are computed once, under the lock, though both seeds' runs start together, and read
    # by every run
    logs = [(out / variant / f'seed{seed}' / 'train.log').read_text() for variant in ('mlp', 'upcycled') for seed in (0, 1)]
    assert sum(log.count('tower tokens of') for log in logs) == 1
    assert all(f'read from {out}/tower_tokens, 0 run through the towers' in log for log in logs)
    # a run that stopped before its scores goes on from its checkpoint: here it had finished its steps, so it only
    # answers again, with the same weights and the same scores; the other runs are read, not redone
    (out / 'mlp/seed0/eval/results.json').unlink()
    again = subprocess.run(result.args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert 'mlp seed 0: ' in again.stdout and '(resumed)' in again.stdout and again.stdout.count('reusing') == 5
    assert f"resumed from {out}/mlp/seed0/ckpt at step 2" in (out / 'mlp/seed0/train.log').read_text()
    scores = json.loads((out / 'ablation.json').read_text())['mlp']['per_seed']['0']
    assert {k: v for k, v in scores.items() if k != 'ms_per_answer'} == \
        {k: v for k, v in table['mlp']['per_seed']['0'].items() if k != 'ms_per_answer'}  # the time varies
    assert (out / 'lm/seed0/llm/config.json').exists() and (out / 'lm/seed1/llm/config.json').exists()


def test_ablate_starts_each_run_after_its_own_sources_only(tmp_path, monkeypatch):
    """ablate.sources: a run waits for its seed's LM and for the run it upcycles, nothing else, so seed 0's
    variants train while a later seed's LM still does (no barrier between waves); an upcycling source that is
    neither on disk nor in the table fails before any run starts."""
    import ablate
    monkeypatch.setattr(ablate, 'out_dir', str(tmp_path))
    monkeypatch.setattr(ablate, 'lm_config', 'config/shapes_lm.py')
    checkpoint_of = {os.path.join(ablate.train_command(v, s, [])[0], 'ckpt'): (v, s) for v in ('mlp', 'full')
                     for s in (0, 1)}
    assert ablate.sources('lm', 1, [], checkpoint_of) == []
    assert ablate.sources('full', 1, [], checkpoint_of) == [('lm', 1)]
    assert ablate.sources('upcycled', 1, [], checkpoint_of) == [('lm', 1), ('mlp', 1)]
    with pytest.raises(FileNotFoundError, match='upcycled seed 2 starts from'):
        ablate.sources('upcycled', 2, [], checkpoint_of)
    monkeypatch.setattr(ablate, 'lm_config', '')  # --lm_config= : no text step, so nothing to wait for but the upcycled MLP
    assert ablate.sources('upcycled', 0, [], checkpoint_of) == [('mlp', 0)]
    # MoVA's chain: every expert, then a run routed by its labels, then that run's weights routed by the oracle
    assert [ablate.depth(v) for v in ('mova', 'mova_routed', 'mova_oracle')] == [0, 1, 2]
    checkpoint_of = {os.path.join(ablate.train_command(v, 0, [])[0], 'ckpt'): (v, 0) for v in ('mova', 'mova_routed')}
    assert ablate.sources('mova_routed', 0, [], checkpoint_of) == [('mova', 0)]
    assert ablate.sources('mova_oracle', 0, [], checkpoint_of) == [('mova_routed', 0)]
    command = ablate.train_command('mova_oracle', 0, ['--max_steps=5'])[1]
    assert command[1] == 'eval.py' and '--route=oracle' in command and '--max_steps=5' not in command


def test_loader_table_times_one_worker_against_what_each_gpu_needs(tmp_path):
    """bench.py --table=loader on a tiny stand-in set (4 JPEGs, 8 samples, one pass, a 1-layer LLM for the FLOPs):
    the real LLaVADataset and collate run in the main process and in one DataLoader worker, and each config's row
    says how many workers per GPU make what the GPU eats. With stand_in_dir the stand-ins stay for train.py: the
    tokenizer, and instruct_full.json, whose every sample max_length cuts (the memory table's full-length step)."""
    stand_in = tmp_path / 'standin'
    result = subprocess.run([sys.executable, 'bench.py', '--table=loader', '--loader_images=4', '--loader_samples=8',
                             '--repeats=1', '--llm_layers=1', '--encoder_layers=1', '--loader_configs=config/stage2.py',
                             f'--stand_in_dir={stand_in}'],
                            check=True, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    tokenizer = AutoTokenizer.from_pretrained(stand_in / 'tokenizer')
    samples = json.load(open(stand_in / 'instruct_full.json'))
    assert len(samples) == 8 and all(os.path.exists(stand_in / s['image']) for s in samples)
    for sample in samples:
        text = json.dumps(sample['conversations'])
        assert text.count('<image>') == 1
        input_ids, labels = data.tokenize_conversation(sample['conversations'], tokenizer, 'phi')
        cut_ids, _ = data.fit_to_length(input_ids, labels, 2560, 1693)
        assert len(cut_ids) + 1692 == 2560 < len(input_ids) + 1692
    lines = result.stdout.splitlines()
    assert '8 samples' in result.stdout and 'image_aspect pad, image_size 336' in result.stdout
    worker = next(line for line in lines if line.startswith('one worker (workers=1)')).split()
    assert float(worker[-2]) > 0 and float(worker[-1]) > 0
    stage2 = next(line for line in lines if line.startswith('stage2 ')).split()
    assert int(stage2[4]) >= 1 and stage2[-1].isdigit()  # workers per GPU, and the config's num_workers

# -----------------------------------------------------------------------------
# The lab world's scenes (shapes.py) and its pretrained towers (towers.py)

TOWER_RESOLUTION = dict(siglip=48, convnext=64, clip=48, dinov2=48)  # ConvNeXt at 64 px: 2 x 2 tokens, cheap
TOWER_STEPS = 6


def test_lab_scenes_are_seeded_spaced_and_count_up_to_eight():
    scenes = [shapes.sample_lab_scene(random.Random(seed), 128) for seed in range(200)]
    assert scenes == [shapes.sample_lab_scene(random.Random(seed), 128) for seed in range(200)]
    assert {len(s) for s in scenes} == set(range(1, shapes.LAB_MAX_OBJECTS + 1))
    for scene in scenes:
        for i, a in enumerate(scene):
            assert a['radius'] <= a['x'] <= 128 - a['radius'] and a['radius'] <= a['y'] <= 128 - a['radius']
            assert a['texture'] in shapes.TEXTURES and (a['row'], a['col']) == (int(3 * a['y'] / 128), int(3 * a['x'] / 128))
            for b in scene[i + 1:]:  # overlap allowed, but never more than a quarter of the two radii
                assert math.hypot(a['x'] - b['x'], a['y'] - b['y']) >= 0.75 * (a['radius'] + b['radius'])


def test_lab_textures_differ_in_layout_and_not_in_their_mean():
    """Each texture is half ink under the same window: the four differ pixel by pixel at 128 px, but the object's
    centre has the same mean colour under each (within 1 of 255), so a resize that blurs the period away leaves
    no coarse trace of which texture it was (towers.py's probe matrix measures what each tower still reads)."""
    obj = dict(color='yellow', shape='square', size='large', texture='vertical', radius=13, x=64, y=64, row=1, col=1)
    drawn = {t: np.asarray(shapes.draw_lab_scene([dict(obj, texture=t)], 128, background=40)).astype(float)
             for t in shapes.TEXTURES}
    centres = {t: image[56:73, 56:73] for t, image in drawn.items()}
    means = [c.mean() for c in centres.values()]
    assert max(means) - min(means) < 1
    assert all(c.std() > 60 for c in centres.values())  # ink and colour alternate
    for a, b in itertools.combinations(shapes.TEXTURES, 2):
        assert np.abs(centres[a] - centres[b]).mean() > 10
    corner = drawn['vertical'][64 + 10, 64 + 10]  # inside the square, off the window: the object's colour
    assert all(abs(a - b) <= 25 for a, b in zip(corner, shapes.COLORS['yellow']))


def test_captions_tokenize_within_the_context():
    vocab = towers.caption_vocab()
    scene = shapes.sample_lab_scene(random.Random(3), 128)
    tokens = towers.tokenize([towers.tower_caption(scene)], vocab)
    words = [vocab[i] for i in tokens[0] if i > 0]
    assert words[-1] == '<eos>' and ' '.join(words[:-1]) == towers.tower_caption(scene)
    longest = [dict(size='small', color='red', shape='circle', texture='diagonal', row=2, col=0, x=0)] * shapes.LAB_MAX_OBJECTS
    assert towers.tokenize([towers.tower_caption(longest)], vocab).count_nonzero() == towers.CONTEXT_LENGTH


def test_twins_differ_in_one_fact_and_closeups_hold_one_large_object():
    """lab_twin: the hard negative of the image-text losses changes exactly one colour, shape or texture of one
    object; sample_closeup: one object, 0.2-0.35 of the image in radius, inside the image."""
    rng = random.Random(0)
    changed = Counter()
    for _ in range(300):
        scene = shapes.sample_lab_scene(rng, 128)
        twin = towers.lab_twin(scene, rng)
        diffs = [(k, a[k], b[k]) for a, b in zip(scene, twin) for k in a if a[k] != b[k]]
        assert len(twin) == len(scene) and len(diffs) == 1 and diffs[0][0] in ('color', 'shape', 'texture')
        changed[diffs[0][0]] += 1
        texture_twin = towers.lab_twin(scene, rng, facts=('texture',))  # ConvNeXt's texture phases
        assert [k for a, b in zip(scene, texture_twin) for k in a if a[k] != b[k]] == ['texture']
    assert min(changed.values()) > 60  # each fact about a third of the time
    for _ in range(50):
        (obj,) = towers.sample_closeup(rng, 128)
        assert 0.2 * 128 <= obj['radius'] <= 0.35 * 128 and obj['radius'] <= obj['x'] <= 128 - obj['radius']
        assert (obj['row'], obj['col']) == (min(int(3 * obj['y'] / 128), 2), min(int(3 * obj['x'] / 128), 2))


@pytest.fixture(scope='module')
def pretrained_towers(tmp_path_factory):
    """Each tower pretrained TOWER_STEPS steps on 16 lab scenes and their twins (batch 8: 4 and their 4 twins), half
    of them close-ups, and saved: {name: (losses, folder)}. ConvNeXt goes on for a second phase on the same scenes
    (towers.tower_phases gives it three on different ones)."""
    torch.manual_seed(0)
    vocab = towers.caption_vocab()
    images, tokens = towers.render_pairs(0, 16, 64, 0.5, towers.FACTS, vocab)
    assert images.shape == (2, 16, 3, 64, 64) and tokens.shape == (2, 16, towers.CONTEXT_LENGTH)
    out = tmp_path_factory.mktemp('towers')
    result = {}
    for name in ENCODER_ORDER:
        folder = str(out / name)
        phases = [((TOWER_STEPS, 2e-3, 0.5, towers.FACTS), images, tokens)] * (2 if name == 'convnext' else 1)
        _, losses, _ = towers.pretrain_tower(name, phases, len(vocab), TOWER_RESOLUTION[name], 8, seed=0, folder=folder)
        result[name] = losses, folder
    return result


@pytest.mark.parametrize('name', ENCODER_ORDER)
def test_each_towers_objective_lowers_its_loss(pretrained_towers, name):
    losses, _ = pretrained_towers[name]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < losses[0], f"{name}: {losses}"


def test_convnext_keeps_its_random_text_tower_and_goes_on_across_phases(pretrained_towers):
    """ConvNeXt's text tower stays at its random init (towers.build_contrastive: the texture's saddle), its trunk
    is drawn at N(0, 1/fan_in) with LayerScale 1, and its second phase starts from the first's weights."""
    import open_clip
    losses, folder = pretrained_towers['convnext']
    assert len(losses) == 2 * TOWER_STEPS and losses[TOWER_STEPS] < losses[0]  # phase 2 does not start afresh
    saved = open_clip.create_model('local-dir:' + folder).state_dict()
    torch.manual_seed(0)  # pretrain_contrastive's seed: the same init
    fresh, _, _ = towers.build_contrastive('convnext', len(towers.caption_vocab()), TOWER_RESOLUTION['convnext'])
    text_keys = [k for k in saved if k.startswith(('token_embedding', 'positional_embedding', 'transformer.',
                                                    'ln_final', 'text_projection'))]
    assert len(text_keys) > 10 and not any(p.requires_grad for k, p in fresh.named_parameters() if k in text_keys)
    for k in text_keys:  # saved in float16
        assert torch.allclose(saved[k].float(), fresh.state_dict()[k], rtol=1e-3, atol=1e-3), k
    trunk = fresh.visual.trunk
    stem = trunk.stem[0].weight                                                  # [40, 3, 4, 4]: fan-in 48
    assert abs(stem.std().item() * math.sqrt(48) - 1) < 0.15
    assert all((p == 1).all() for n, p in trunk.named_parameters() if n.endswith('gamma'))
    assert not torch.equal(saved['visual.trunk.stem.0.weight'].float(), stem.half().float())  # trained


def test_losses_match_their_equations():
    torch.manual_seed(0)
    u, v = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1), torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    logits = 10 * u @ v.T
    infonce = sum(-logits.log_softmax(1)[i, i] - logits.log_softmax(0)[i, i] for i in range(5)) / 10
    assert torch.allclose(towers.clip_loss(u, v, t), infonce)
    sigmoid = -sum(torch.nn.functional.logsigmoid((1 if i == j else -1) * (logits[i, j] + b))
                   for i in range(5) for j in range(5)) / 5
    assert torch.allclose(towers.siglip_loss(u, v, t, b), sigmoid)
    student, p_t = torch.randn(3, 4, 6), torch.randn(2, 4, 6).softmax(-1)
    logp_s = (student / 0.1).log_softmax(-1)
    pairs = [-(p_t[i] * logp_s[j]).sum(-1).mean() for i in range(2) for j in range(3) if i != j]
    assert torch.allclose(towers.dino_loss(student, p_t), sum(pairs) / len(pairs))


def test_sinkhorn_knopp_balances_the_teachers_targets():
    torch.manual_seed(0)
    logits = torch.randn(32, 8) * 0.1 + torch.randn(8)  # every sample prefers the same few prototypes
    targets = towers.sinkhorn_knopp(logits, iterations=50)
    assert torch.allclose(targets.sum(1), torch.ones(32), atol=1e-4)       # each target a distribution
    assert torch.allclose(targets.mean(0), torch.full((8,), 1 / 8), atol=1e-4)  # each prototype 1/K of the batch
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # each point's nearest neighbour is sqrt(2) away
    assert torch.allclose(towers.koleo_loss(x), -torch.tensor(2.0).sqrt().log())


def test_saved_towers_load_through_encoders_as_checkpoints(pretrained_towers):
    paths = {name: folder for name, (_, folder) in pretrained_towers.items()}
    encoders = Encoders(list(paths), 'pretrained', TOWER_RESOLUTION, paths=paths)
    images = towers.render_lab(1, 2, 64)[0]
    tokens = encoders(images)
    expected_tokens = dict(siglip=9, convnext=4, clip=9, dinov2=9)
    for name, t in zip(encoders.encoders, tokens):
        assert t.shape == (2, expected_tokens[name], encoders.encoders[name].dim) and torch.isfinite(t).all()
    # the loaded weights are the trained ones, not a fresh init: two differently seeded random towers differ, these match
    again = Encoders(list(paths), 'pretrained', TOWER_RESOLUTION, paths=paths)
    for a, b in zip(tokens, again(images)):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    random_tokens = Encoders(list(paths), 'tiny', TOWER_RESOLUTION)(images)
    assert not torch.allclose(tokens[2], random_tokens[2])


def test_config_shapes_loads_the_shipped_towers_by_path():
    """config/shapes.py's encoders are the shipped pretrained towers (weights/towers), loaded as real checkpoints are:
    each gives 3 x 3 tokens of width 64 on a 128-px scene at its resolution, in float32 (ConvNeXt's file is float16),
    and each folder says how it was made."""
    config = {}
    exec(open('config/shapes.py').read(), {}, config)
    assert config['encoder_source'] == 'pretrained' and config['image_size'] == 128
    resolution = dict(zip(ENCODER_ORDER, config['encoder_resolution']))
    encoders = Encoders(list(config['encoder_paths']), 'pretrained', resolution, paths=config['encoder_paths'])
    assert all(p.dtype == torch.float32 for p in encoders.parameters())
    tokens = encoders(towers.render_lab(7, 2, 128)[0])
    assert [t.shape for t in tokens] == [(2, 9, 64)] * 4 and all(torch.isfinite(t).all() for t in tokens)
    for name, folder in config['encoder_paths'].items():
        with open(os.path.join(folder, 'pretrain.json')) as f:
            record = json.load(f)
        assert record['resolution'] == resolution[name] and record['last_loss'] < record['first_loss']


def test_probe_matrix_runs_on_a_tiny_set(pretrained_towers, capsys):
    paths = {name: folder for name, (_, folder) in pretrained_towers.items()}
    rows = towers.probe_matrix(paths, TOWER_RESOLUTION, num_scenes=40, image_px=64, seed=0)
    assert list(rows) == list(ENCODER_ORDER) + [f'{n} (random)' for n in ENCODER_ORDER] + ['chance']
    assert all(set(r) == set(towers.FACTORS) and all(0 <= a <= 100 for a in r.values()) for r in rows.values())
    towers.print_matrix(rows)
    assert 'block structure' in capsys.readouterr().out



def test_connector_probe_reads_each_tower_before_and_after_its_moec_and_hga(pretrained_towers, monkeypatch):
    """towers.py --probe_ckpt: a MoCHA on the pretrained towers, probed at three places per tower. The 'HGA' tokens
    are what the LLM is given (encode_images), and with HGA off they are the MoECs' own."""
    paths = {name: folder for name, (_, folder) in pretrained_towers.items()}
    torch.manual_seed(0)
    model = MoCHA(MoCHAConfig(encoder_paths=paths, encoder_resolution=TOWER_RESOLUTION,
                              image_size=64, llm='weights/shapes-lm', llm_source='pretrained')).eval()
    images = towers.render_lab(2, 6, 64)[0]
    tokens, gates = towers.connector_tokens(model, images, batch_size=4)  # two chunks
    assert list(gates) == list(ENCODER_ORDER) and all(0 < g < 1 for g in gates.values())
    assert tokens['convnext', 'tower'].shape == (6, 4, model.encoders.encoders['convnext'].dim)
    assert tokens['convnext', 'MoEC'].shape == tokens['convnext', 'HGA'].shape == (6, 4, model.llm.config.hidden_size)
    with torch.no_grad():
        llm_input = model.encode_images(images)[0]
    assert torch.allclose(torch.cat([tokens[n, 'HGA'] for n in ENCODER_ORDER], 1), llm_input, atol=1e-5)
    model.hga.enabled = False
    unmixed, no_gates = towers.connector_tokens(model, images)
    assert no_gates == {}
    assert all(torch.equal(unmixed[n, 'HGA'], unmixed[n, 'MoEC']) for n in ENCODER_ORDER)
    assert not torch.allclose(unmixed['convnext', 'HGA'], tokens['convnext', 'HGA'])
    # the matrix: each row's tokens go to probe_tower (its fits are test_probe_matrix_runs_on_a_tiny_set's; here
    # each row just reports the width it was given, and the object count, to keep the suite short)
    monkeypatch.setattr(towers, 'probe_tower', lambda tokens, objects, *rest: dict(width=tokens.shape[-1],
                                                                                     scenes=tokens.shape[0]))
    rows, _, scales = towers.connector_matrix(model, num_scenes=8, image_px=64, seed=0)
    assert list(scales) == list(ENCODER_ORDER) and all(x > 0 for x in scales.values())
    assert list(rows) == [f'{n} {place}' for n in ENCODER_ORDER for place in ('tower', 'MoEC', 'HGA')]
    d_llm = model.llm.config.hidden_size
    assert all(rows[f'{n} tower']['width'] == model.encoders.encoders[n].dim and rows[f'{n} MoEC']['width'] ==
               rows[f'{n} HGA']['width'] == d_llm and rows[f'{n} HGA']['scenes'] == 8 for n in ENCODER_ORDER)

# -----------------------------------------------------------------------------
# The lab's questions, benchmarks (eval/lab) and training conversations (shapes.py), and their scoring (eval.py)

NO_LAB = dict(num_lab_train_images=0, num_lab_pope_images=0, num_lab_gqa_images=0)
COLOR, SHAPE, TEXTURE = ('|'.join(names) for names in (shapes.COLORS, shapes.SHAPES, shapes.TEXTURES))


@pytest.fixture(scope='module')
def lab_shapes(tmp_path_factory):
    """Grid sizes that say every word of the grid world (so the tokenizer's first 173 ids are weights/shapes-lm's),
    small lab sizes: 2 s."""
    root = tmp_path_factory.mktemp('lab') / 'shapes'
    shapes.prepare_shapes(str(root), seed=0, num_train_images=100, num_pope_images=2, num_gqa_images=2, num_mme_images=1,
                          num_text_conversations=300, num_lab_train_images=20, num_lab_pope_images=6,
                          num_lab_gqa_images=30)
    return root


def lab_answer(question, scene):
    """The answer to a lab question worked out from the scene by the question's words alone; every object a
    question names must be the only one that fits its words."""
    def only(**attributes):
        found = [o for o in scene if all(o[k] == v for k, v in attributes.items())]
        assert len(found) == 1, (question, attributes, scene)
        return found[0]
    count = lambda **attributes: sum(all(o[k] == v for k, v in attributes.items()) for o in scene)
    yes = lambda holds: 'yes' if holds else 'no'
    numbers = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight')
    rules = [
        (rf"What texture does the ({COLOR}) ({SHAPE}) have", lambda c, s: only(color=c, shape=s)['texture']),
        (rf"Does the ({COLOR}) ({SHAPE}) have ({TEXTURE}) texture", lambda c, s, t: yes(only(color=c, shape=s)['texture'] == t)),
        (rf"Is the ({COLOR}) object a ({SHAPE})", lambda c, s: yes(only(color=c)['shape'] == s)),
        (rf"Is the ({SHAPE}) ({COLOR})", lambda s, c: yes(only(shape=s)['color'] == c)),
        (rf"Is there a ({COLOR}) ({SHAPE}) with ({TEXTURE}) texture in the image",
         lambda c, s, t: yes(count(color=c, shape=s, texture=t) > 0)),
        (rf"Is there a ({COLOR}) ({SHAPE}) in the image", lambda c, s: yes(count(color=c, shape=s) > 0)),
        (rf"Is there a ({SHAPE}) in the image", lambda s: yes(count(shape=s) > 0)),
        (r"How many objects are there", lambda: str(len(scene))),
        (rf"How many ({SHAPE})s are there", lambda s: str(count(shape=s))),
        (rf"How many ({COLOR}) objects are there", lambda c: str(count(color=c))),
        (rf"Is there only one ({SHAPE}) in the image", lambda s: yes(count(shape=s) == 1)),
        (rf"Are there (\w+) ({SHAPE})s in the image", lambda n, s: yes(count(shape=s) == numbers.index(n))),
        (rf"Where is the ({COLOR}) ({SHAPE})", lambda c, s: shapes.position(only(color=c, shape=s))),
        (rf"What size is the ({COLOR}) ({SHAPE})", lambda c, s: only(color=c, shape=s)['size']),
        (rf"Is the ({COLOR}) ({SHAPE}) (on the left side|on the right side|at the top|at the bottom) of the image",
         lambda c, s, side: yes({'on the left side': only(color=c, shape=s)['col'] == 0,
                                 'on the right side': only(color=c, shape=s)['col'] == 2,
                                 'at the top': only(color=c, shape=s)['row'] == 0,
                                 'at the bottom': only(color=c, shape=s)['row'] == 2}[side])),
    ]
    for pattern, rule in rules:
        if match := re.fullmatch(pattern + r'\?', question):
            return rule(*match.groups())
    return None  # a grid family the rules above leave out (colour, shape, choose: named as in the grid world)


def test_lab_questions_are_answered_by_their_scenes_and_yes_no_is_balanced():
    """Every lab family (and the reused grid ones that name objects the lab's way) on 150 crowded scenes, 3 seeds:
    the answer follows from the scene; the yes/no ones say yes about half the time; a binding 'no' names a shape
    (colour) that another object has, where one has another; a 'no' to a full description is often a near miss."""
    asked_by_type, yes, checked, plausible_no, near_no = Counter(), Counter(), Counter(), [], []
    for seed in range(3):
        rng = random.Random(seed)
        for _ in range(150):
            scene = shapes.sample_lab_scene(rng, 128)
            for ask in shapes.LAB_FAMILIES:
                asked = ask(scene, rng)
                if asked is None:
                    continue
                question, answer, (structural, _, detailed), program = asked
                expected = lab_answer(question, scene)
                assert expected in (answer, None), (question, answer, expected, scene)
                asked_by_type[detailed] += 1
                checked[detailed] += expected is not None
                if structural == 'verify':
                    yes[detailed] += answer == 'yes'
                    if detailed == 'verifyBinding' and answer == 'no':
                        asked_for = program[-1]['operation'].split()[1]
                        named = scene[int(program[0]['argument'].split('(')[1].rstrip(')'))]
                        others = {o[asked_for] for o in scene} - {named[asked_for]}
                        plausible_no.append(not others or program[-1]['argument'] in others)
                    if detailed == 'existDescribed' and answer == 'no':
                        named = re.fullmatch(rf"Is there a ({COLOR}) ({SHAPE}) with ({TEXTURE}) texture in the image\?",
                                             question).groups()
                        near_no.append(any(sum(a != b for a, b in zip(named, shapes.lab_category(o))) == 1
                                           for o in scene))
    lab_types = ('queryTexture', 'verifyTexture', 'verifyBinding', 'existDescribed', 'count', 'verifyCount')
    assert all(checked[t] >= 100 for t in lab_types + ('queryPosition', 'verifyPosition', 'existAttrC')), checked
    for detailed, n in yes.items():  # the side question: 'no' about an object in the middle cell
        assert 0.35 < n / asked_by_type[detailed] < 0.65 or detailed == 'verifyPosition', (detailed, n, asked_by_type)
    assert all(plausible_no) and 0.3 < sum(near_no) / len(near_no) < 0.8
    counts = [int(a) for a in (shapes.ask_count(shapes.sample_lab_scene(random.Random(s), 128), random.Random(s))[1]
                               for s in range(400))]
    assert max(counts) == 8


def test_lab_families_skip_what_they_cannot_name_and_the_image_still_gets_its_questions():
    """Two red circles and nothing else: no family can name one of them, so the texture, binding, colour and
    where questions give way (None) and the questions that name no object stand in for them."""
    twins = [dict(color='red', shape='circle', size='small', texture=t, radius=9, x=x, y=20, row=0, col=0)
             for t, x in (('vertical', 12), ('checked', 30))]
    for ask in (shapes.ask_texture, shapes.ask_texture_verify, shapes.ask_binding, shapes.ask_color, shapes.ask_where):
        assert ask(twins, random.Random(0)) is None
    rng = random.Random(0)
    for _ in range(20):
        drawn = rng.sample(shapes.LAB_FAMILIES, 3)
        asked = list(shapes.ask_each(drawn, shapes.LAB_FAMILIES, twins, rng))
        assert len(asked) == 3 and all(lab_answer(q, twins) in (a, None) for q, a, *_ in asked)


def test_lab_pope_labels_follow_the_scenes_and_adversarial_negatives_are_near_misses(tmp_path):
    """Up to 3 distinct present descriptions per image and as many absent ones per split; adversarial: a present
    object with exactly one of colour, shape and texture changed (and then absent)."""
    scenes = []
    def recorded(rng, image_px):
        scenes.append(shapes.sample_lab_scene(rng, image_px))
        return scenes[-1]
    shapes.make_pope(str(tmp_path), random.Random(0), 40, 128, shapes.LAB._replace(sample=recorded))
    scene_of = {f'pope_{i:05d}.png': scene for i, scene in enumerate(scenes)}
    for split in ('random', 'popular', 'adversarial'):
        per_image = Counter()
        for label in read_jsonl(tmp_path / f'pope/coco/coco_pope_{split}.json'):
            scene = scene_of[label['image']]
            present = {(o['color'], o['shape'], o['texture']) for o in scene}
            asked = re.fullmatch(rf"Is there a ({COLOR}) ({SHAPE}) with ({TEXTURE}) texture in the image\?",
                                 label['text']).groups()
            assert (asked in present) == (label['label'] == 'yes')
            if split == 'adversarial' and label['label'] == 'no':
                assert any(sum(a != b for a, b in zip(asked, p)) == 1 for p in present), (asked, present)
            per_image[label['image'], label['label']] += 1
        for image, scene in scene_of.items():
            distinct = len({(o['color'], o['shape'], o['texture']) for o in scene})
            assert per_image[image, 'yes'] == per_image[image, 'no'] == min(3, distinct)


def test_lab_benchmarks_are_written_in_the_official_formats(lab_shapes):
    """eval/lab/pope and eval/lab/gqa hold eval/pope's and eval/gqa's files with their fields (the official scorers'),
    GQA's scene graphs give each object its texture, and eval.py's scorers read them unchanged."""
    files = ev.shapes_files(str(lab_shapes))
    pope = files['lab_pope']
    questions = read_jsonl(pope['question_file'])
    for q in questions:
        assert set(q) == {'question_id', 'image', 'text', 'category'} and isinstance(q['question_id'], int)
        assert q['text'].endswith(shapes.SHORT_ANSWER)
        assert os.path.isfile(os.path.join(pope['image_folder'], q['image']))
    gold = []
    for split in ev.POPE_SPLITS:
        labels = read_jsonl(os.path.join(pope['annotation_dir'], f'coco_pope_{split}.json'))
        assert all(set(a) == {'question_id', 'image', 'text', 'label'} for a in labels)
        assert [a['question_id'] for a in labels] == [q['question_id'] for q in questions if q['category'] == split]
        gold += labels
    assert len({q['question_id'] for q in questions}) == len(questions) == len(gold)
    assert ev.score_pope([answer(a['question_id'], a['label'].capitalize()) for a in gold], pope['question_file'],
                         pope['annotation_dir'])['f1_avg'] == 100
    gqa = files['lab_gqa']
    questions = read_jsonl(gqa['question_file'])
    entries, choices, graphs = (json.loads((lab_shapes / f'eval/lab/gqa/testdev_balanced_{name}.json').read_text())
                                for name in ('questions', 'choices', 'sceneGraphs'))
    assert [q['question_id'] for q in questions] == list(entries) == list(choices) and len(questions) == 3 * 30
    assert not (lab_shapes / 'eval/lab/gqa/llava_gqa_testdev_balanced_words.jsonl').exists()  # lab scenes have no words
    for q in questions:
        entry = entries[q['question_id']]
        assert set(entry) == {'imageId', 'question', 'answer', 'fullAnswer', 'isBalanced', 'types', 'semantic',
                              'groups', 'entailed'}
        assert q['image'] == entry['imageId'] + '.png' and os.path.isfile(os.path.join(gqa['image_folder'], q['image']))
        assert set(entry['types']) == {'structural', 'semantic', 'detailed'}
        assert set(entry['groups']) == {'global', 'local'}
        assert entry['answer'] in choices[q['question_id']]['valid']
        assert all(set(s) == {'operation', 'argument', 'dependencies'} and all(d < i for d in s['dependencies'])
                   for i, s in enumerate(entry['semantic']))
    for graph in graphs.values():
        assert graph['width'] == graph['height'] == 128
        assert all(len(o['attributes']) == 3 and o['attributes'][2] in shapes.TEXTURES
                   for o in graph['objects'].values())
    scores = ev.score_gqa([answer(qid, e['answer']) for qid, e in entries.items()], gqa['questions_json'])
    assert scores['accuracy'] == 100
    lab_types = {'queryTexture', 'verifyTexture', 'verifyBinding', 'existDescribed', 'count', 'verifyCount'}
    assert lab_types <= set(scores['by_type'])


def test_lab_tokenizer_keeps_the_shipped_lms_ids_and_appends_the_labs_words(lab_shapes):
    ours = AutoTokenizer.from_pretrained(str(lab_shapes / 'tokenizer'))
    shipped = AutoTokenizer.from_pretrained('weights/shapes-lm').get_vocab()
    vocab = ours.get_vocab()
    assert len(shipped) == 173 and {w: i for w, i in vocab.items() if i < len(shipped)} == shipped
    appended = sorted(vocab, key=vocab.get)[len(shipped):]
    assert appended == sorted(appended)
    assert {*shapes.TEXTURES, 'texture', 'five', 'six', 'seven', 'eight'} <= set(appended)
    instruct = json.loads((lab_shapes / 'instruct.json').read_text())
    lab = [s for s in instruct if s['id'].startswith('lab_')]
    assert len(lab) == 20 and len(instruct) == 20 + 102  # shuffled in among the grid world's 100 + 2 text-only
    for sample in lab:
        assert Image.open(lab_shapes / 'images' / sample['image']).size == (128, 128)
        assert 3 <= len(sample['conversations']) // 2 <= 6
        for turn in sample['conversations']:
            assert ours.unk_token_id not in ours(turn['value'])['input_ids']


def test_lab_sizes_zero_write_todays_grid_world_and_the_lab_leaves_it_alone(shapes_dir, tmp_path):
    """With every lab size 0 prepare_shapes writes what it wrote before the lab (md5 of SMALL's files at seed 0,
    written by shapes.py before the lab; the JSON files' content as it wrote them then, indented by 1); with the lab,
    every grid file is the same but instruct.json, which holds the same grid samples shuffled among the lab's, and the
    tokenizer."""
    import hashlib
    shapes.prepare_shapes(str(tmp_path), seed=0, **dict(SMALL, **NO_LAB))
    md5 = lambda name: hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
    json_md5 = lambda name: hashlib.md5(json.dumps(json.loads((tmp_path / name).read_text()), indent=1).encode()).hexdigest()
    assert json_md5('instruct.json') == 'd7c0a6550638dddb066b2ffbe28b84b1'
    assert json_md5('eval/gqa/testdev_balanced_questions.json') == 'c285fb0e7d8c144165d63f63d9cf5ab8'
    assert md5('eval/pope/llava_pope_test.jsonl') == 'f020f59c308828e9610a2cfc6cd1c374'
    grid = all_files(tmp_path)
    assert not [f for f in grid if f.startswith('eval/lab') or 'lab_' in f]
    assert [f for f in all_files(shapes_dir) if not f.startswith('eval/lab/') and 'lab_' not in f] == grid
    assert all(filecmp.cmp(shapes_dir / f, tmp_path / f, shallow=False) for f in grid
               if f not in ('instruct.json', 'tokenizer/tokenizer.json'))
    without_lab = [s for s in json.loads((shapes_dir / 'instruct.json').read_text()) if not s['id'].startswith('lab_')]
    assert sorted(without_lab, key=lambda s: s['id']) == sorted(json.loads((tmp_path / 'instruct.json').read_text()),
                                                                  key=lambda s: s['id'])


def test_evaluate_shapes_scores_the_labs_benchmarks_by_default(lab_shapes, tmp_path):
    """The stand-in model says 'no' to every (dark) lab image: lab POPE 50 % on every split, lab GQA right on the
    yes/no questions whose answer is no; by_type shows each lab question type, the table its own rows."""
    tokenizer = make_tokenizer()
    results = ev.evaluate_shapes(FakeMoCHA(tokenizer), tokenizer, str(lab_shapes), str(tmp_path), batch_size=32,
                                 max_new_tokens=2)
    assert list(results) == ['pope', 'gqa', 'mme', 'lab_pope', 'lab_gqa']
    assert all(results['lab_pope'][split]['accuracy'] == 50 for split in ev.POPE_SPLITS)
    gold = json.loads((lab_shapes / 'eval/lab/gqa/testdev_balanced_questions.json').read_text())
    binary = [q['answer'] for q in gold.values() if q['types']['structural'] != 'query']
    assert results['lab_gqa']['binary'] == pytest.approx(100 * binary.count('no') / len(binary))
    texture = [q['answer'] == 'no' for q in gold.values() if q['types']['detailed'] == 'verifyTexture']
    assert results['lab_gqa']['by_type']['verifyTexture'] == pytest.approx(100 * sum(texture) / len(texture))
    assert results['lab_gqa']['by_type']['queryTexture'] == 0
    table = ev.results_table(results)
    assert 'LAB POPE   F1 (mean of splits)' in table and 'LAB GQA    queryTexture accuracy' in table
    assert (tmp_path / 'lab' / 'testdev_balanced_predictions.json').is_file()
