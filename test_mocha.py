"""
Executable documentation of nanoMoCHA: every test name states a property, its body checks it.
Run: python -m pytest -q        (CPU, offline, a few minutes on 2 cores)

The reference implementations below (`released_hga`, `released_moec`) follow the released code's
per-image / per-group / per-expert loops, written plainly; bench.py times mocha.py against them.
"""
import itertools
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

from mocha import (ENCODER_ORDER, ENCODER_SPECS, HGA, IGNORE_INDEX, IMAGE_TOKEN_ID, LLM_SPECS, Encoders, MoCHA,
                   MoCHAConfig, MoEC, build_backbone, build_llm)

TINY_RES = {name: 64 for name in ENCODER_ORDER}

# -----------------------------------------------------------------------------
# references: the released algorithms, loop by loop


def released_hga(x, group_sizes, k_intra=7, k_inter=3):
    """Per image, per group, edge lists and scatter-adds, as the released HGA does."""
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
    """Per image, per expert, as the released connector loops."""
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
    """Eqs. 2-4 token by token: y = sum_{i in top-k} p_hat_i E_i(x), every expert run densely."""
    probs = moec.gate(x).float().softmax(-1)                                # [B, N, E]
    all_outputs = torch.stack([expert(x) for expert in moec.experts], dim=-2)  # [B, N, E, d_out]
    top_p, top_e = probs.topk(moec.top_k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    chosen = all_outputs.gather(2, top_e[..., None].expand(-1, -1, -1, all_outputs.shape[-1]))
    return (chosen * top_p[..., None]).sum(2)

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
    expected_sizes = {'siglip': 64, 'convnext': 4, 'clip': 64, 'dinov2': 64}  # 64px: 8x8 patches, 2x2 at stride 32
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
    assert encoders.dims == [64, 320 // 3, 64, 64]  # the released pool of 3 applies to pretrained ConvNeXt
    assert [o.shape[1] for o in encoders(images)] == [64, 4, 64, 64]


def test_full_size_architectures_build_offline_with_paper_shapes():
    """Random-weight full-size encoders and LLMs, on the meta device (no memory, no network)."""
    with torch.device('meta'):
        encoders = Encoders(ENCODER_ORDER, 'random')
        phi2 = build_llm('microsoft/phi-2', 'random')
        vicuna = build_llm('lmsys/vicuna-7b-v1.5', 'random')
    assert encoders.group_sizes == [441, 100, 576, 576]                   # 1693 tokens at 336 px (SPEC §2)
    assert encoders.dims == [1024, 1024, 1024, 1024]
    counts = {n: sum(p.numel() for p in e.parameters()) for n, e in encoders.encoders.items()}
    assert 300e6 < counts['siglip'] < 330e6 and 300e6 < counts['clip'] < 310e6
    assert 300e6 < counts['dinov2'] < 310e6 and 840e6 < counts['convnext'] < 850e6
    assert 2.7e9 < sum(p.numel() for p in phi2.parameters()) < 2.8e9
    assert 6.7e9 < sum(p.numel() for p in vicuna.parameters()) < 6.8e9

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
    assert N == 196 and out['logits'].shape == (2, 6 + N - 1, model.llm.config.vocab_size)
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


def test_channel_concat_ablation_uses_one_connector(tokenizer_dir):
    torch.manual_seed(0)
    model = MoCHA(tiny_config(tokenizer_dir, fusion='channel'))
    assert list(model.moecs) == ['channel'] and model.num_visual_tokens == 64
    visual, _, _ = model.encode_images(random_images(2))
    assert visual.shape == (2, 64, model.llm.config.hidden_size)
