"""
Benchmarks, after nanoGPT's bench.py:
1) speed: MoEC and HGA forward / forward+backward at the paper's shapes, against the released
   per-image / per-expert loops (released.py) and, for MoEC, against the same FLOPs done as dense
   batched matmuls. Every ratio is measured in the same run.
2) params: the parameter breakdown of full-size MoCHA-Phi2 and MoCHA-Vicuna7B, built offline on
   the meta device (no memory, no weights).
3) memory: per-GPU memory and FLOPs of one training step of every shipped real config
   (config/stage{1,2}*.py) under DDP and FSDP at 8 GPUs, traced at full size on fake tensors
   with PyTorch's MemTracker / FSDPMemTracker; FLOPs counted apart (mocha.count_flops).
4) loader: samples/s that one DataLoader worker makes of stage-2 batches (JPEGs at COCO sizes, the real
   LLaVADataset, a byte-level BPE tokenizer, collate), against the samples/s a GPU eats at `mfu` of `gpu_tflops`
   (each stage-2 config's model FLOPs per sample, counted as in 3): the workers each GPU needs.

    python bench.py                     # the first three, float32 on whatever device is there
    python bench.py --table=speed --device=cuda --dtype=bfloat16
    python bench.py --table=memory      # about 3 minutes on 2 CPU cores, no GPU needed
    python bench.py --table=loader      # 40 s on 2 idle CPU cores, 50-75 s on busy ones
    python bench.py --table=answer --device=cuda   # also times greedy answers at full size
"""
import contextlib
import glob
import json
import math
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from data import IMAGE_TEXT
from mocha import (HGA, IGNORE_INDEX, IMAGE_TOKEN_ID, LLM_SPECS, MoCHA, MoCHAConfig, MoEC, add_lora, count_flops,
                   fake_batch, fake_tensors, lean_memory_tracker)
from released import released_hga, released_moec

# -----------------------------------------------------------------------------
device = 'cpu'
dtype = 'float32'
batch_size = 4
group_sizes = [441, 100, 576, 576]  # SigLIP, ConvNeXt, CLIP, DINOv2 at 336 px
d_enc, d_llm = 1024, 2560           # Phi-2's width
moec_tokens = 576
repeats = 3
seed = 0
table = 'all'              # 'speed' | 'params' | 'memory' | 'all' (the three) | 'loader' | 'answer'
# memory table: the shipped real configs, traced at world_size GPUs
configs = ('config/stage1.py,config/stage2.py,config/stage1_vicuna7b.py,config/stage2_vicuna7b.py,'
           'config/stage2_lora.py,config/stage2_vicuna7b_lora.py')
world_size = 8
llm_layers = 0             # > 0 cuts the traced towers to that depth (the test's quick run); 0 = full size
encoder_layers = 0
memory_json = ''           # also write the memory table's rows here, as JSON
micro_batch = 0            # > 0 replaces each config's batch_size (what fits smaller cards)
# answer table: one answer's prefill FLOPs, MoCHA (one pass) against MoVA (routing pass + answer pass)
answer_text_tokens = 40    # a short question in its template (a POPE question under phi: about 40 BPE tokens)
answer_batch = 16          # on a GPU the table also times greedy answers, alone and in batches of this many
# loader table: the stage-2 configs' data settings, timed per worker against what a GPU needs
loader_configs = 'config/stage2.py,config/stage2_vicuna7b.py'  # + config/stage2*_lora.py: about 10 s each more
loader_images = 48         # JPEGs written (cycled through by the samples)
loader_samples = 192       # samples timed per pass; each pass is timed `repeats` times
jpeg_quality = 90
photo_noise = 24.0         # the stand-in photos' texture (std, of 255): JPEGs of COCO's mean size, 150-160 KB
stand_in_dir = ''          # keep the stand-ins here (JPEGs, instruct.json, instruct_full.json, tokenizer/) for train.py
gpu_tflops = 989.0         # H100 SXM dense bf16 peak
mfu = 0.4
exec(open('configurator.py').read())
# -----------------------------------------------------------------------------
torch.manual_seed(seed)
dtype = getattr(torch, dtype)


def seconds(fn, repeats=repeats):
    """Best wall time of `repeats` calls, after one warm-up."""
    fn()
    best = float('inf')
    for _ in range(repeats):
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def forward_backward(fn, x):
    def run():
        inputs = x.detach().requires_grad_(True)
        fn(inputs).float().sum().backward()
    return run


def dense_moec(moec):
    """The same FLOPs as top-k routing with perfect balance: every expert gets T*k/E tokens,
    as one batched matmul per layer (the lower bound routing should stay close to)."""
    E = len(moec.experts)
    w1 = torch.stack([e[0].weight.T for e in moec.experts])          # [E, d_in, d_out]
    b1 = torch.stack([e[0].bias for e in moec.experts])[:, None]
    w2 = torch.stack([e[2].weight.T for e in moec.experts])
    b2 = torch.stack([e[2].bias for e in moec.experts])[:, None]

    def run(x):
        tokens = x.reshape(-1, x.shape[-1])
        per_expert = tokens.repeat(moec.top_k, 1).view(E, -1, tokens.shape[-1])  # [E, T*k/E, d_in]
        return torch.baddbmm(b2, F.gelu(torch.baddbmm(b1, per_expert, w1)), w2)
    return run


def ratio_row(name, ours, reference):
    print(f"{name:<44s} {ours * 1e3:9.1f} ms {reference * 1e3:9.1f} ms   {reference / ours:5.2f}x")


def speed_table():
    print(f"device {device}, dtype {dtype}, torch threads {torch.get_num_threads()}")
    print(f"{'':<44s} {'nanoMoCHA':>12s} {'reference':>12s}   speed-up")
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        # HGA at B=4, N=1693, D=2560 (the released reference runs in float32 always)
        hga = HGA()
        x = torch.randn(batch_size, sum(group_sizes), d_llm, device=device)
        with torch.no_grad():
            ratio_row('HGA forward vs released per-image', seconds(lambda: hga(x, group_sizes)),
                      seconds(lambda: released_hga(x, group_sizes)))
        ratio_row('HGA forward+backward vs released per-image',
                  seconds(forward_backward(lambda t: hga(t, group_sizes), x)),
                  seconds(forward_backward(lambda t: released_hga(t, group_sizes), x)))

        # MoEC at B=4, N=576, 1024 -> 2560, E=4, k=2
        moec = MoEC(d_enc, d_llm, num_experts=4, top_k=2).to(device)
        x = torch.randn(batch_size, moec_tokens, d_enc, device=device)
        ours_fb = seconds(forward_backward(lambda t: moec(t)[0], x))
        with torch.no_grad():
            ratio_row('MoEC forward vs released per-image loop', seconds(lambda: moec(x)),
                      seconds(lambda: released_moec(moec, x)))
        ratio_row('MoEC forward+backward vs released per-image', ours_fb,
                  seconds(forward_backward(lambda t: released_moec(moec, t), x)))
        ratio_row('MoEC forward+backward vs dense same-FLOPs', ours_fb,
                  seconds(forward_backward(dense_moec(moec), x)))

# -----------------------------------------------------------------------------
# parameter breakdown of the full-size models (meta device: shapes only)


def count(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def params_table():
    print(f"{'model':<22s} {'encoders':>9s} {'connector':>9s} {'LLM':>8s} {'total':>8s} {'stage 1':>9s} {'stage 2':>9s} "
          f"{'LoRA 128':>9s}  (billions; stage = trainable; LoRA: stage 2 with r 128 adapters)")
    for llm_id in LLM_SPECS:
        for connector in ('moec', 'mova'):
            with torch.device('meta'):
                model = MoCHA(MoCHAConfig(encoder_source='random', llm_source='random', llm=llm_id, connector=connector))
            n_enc, n_llm = count(model.encoders), count(model.llm)
            n_connector = sum(count(c) for c in model.connectors)
            n_lora = count(add_lora(model.llm, 128, 256, 0.05), trainable_only=True)
            name = ('MoVA-' if connector == 'mova' else 'MoCHA-') + llm_id.split('/')[-1]
            print(f"{name:<22s} {n_enc / 1e9:9.3f} {n_connector / 1e9:9.3f} {n_llm / 1e9:8.3f} "
                  f"{(n_enc + n_connector + n_llm) / 1e9:8.3f} {n_connector / 1e9:9.3f} {(n_connector + n_llm) / 1e9:9.3f} "
                  f"{(n_connector + n_lora) / 1e9:9.3f}")

# -----------------------------------------------------------------------------
# memory and FLOPs of one training step of each shipped config, per GPU at world_size GPUs.
# The step is train.py's: the whole MoCHA.forward (encoders, MoECs, HGA, splice, LM loss) and
# backward under bf16 autocast with the LLM's gradient checkpointing, grad clipping, AdamW.
# It runs at full size on fake tensors (shapes and dtypes, no storage, no arithmetic), with
# PyTorch's MemTracker (DDP: one replica) or FSDPMemTracker (FSDP over a fake 8-rank process
# group) counting live bytes. FLOPs are counted in a pass of their own (mocha.count_flops): torch's
# FlopCounterMode keeps every recomputed layer's activations alive while it counts (its docstring says why).
# What the trace cannot do, and what stands in for it:
#  - fake CUDA tensors cannot run backward without a GPU, so the trace runs on fake CPU tensors
#    under CPU bf16 autocast (the same bf16 matmuls/convs as CUDA autocast; no allocator
#    rounding or fragmentation, no CUDA context, no NCCL buffers: hence the 10 % margin in `fits`);
#  - attention runs PyTorch's CPU flash kernel, which saves what the CUDA flash and memory-efficient
#    kernels save for backward: the output and a float32 logsumexp per query, no L x L matrix;
#  - which tokens each MoEC expert gets depends on the data, which fake tensors do not have:
#    every expert gets T*k/E tokens (perfect balance);
#  - DDP's gradient buckets (a flat float32 copy of every trainable gradient unless
#    gradient_as_bucket_view=True, as the DDP docs say) are added as arithmetic: DDP itself
#    does not run on fake tensors.

GiB = 2 ** 30
# what nvidia-smi reports of each size's smallest common card, in MiB: H100 SXM 80 GB, L40 / L40S 48 GB, A10 24 GB
CARDS_MIB = {80: 81559, 48: 46068, 24: 23028}
TRAIN_DEFAULTS = dict(stage=1, llm='microsoft/phi-2', batch_size=4, max_length=2560, parallel='ddp',
                      num_experts=4, top_k=2, gradient_checkpointing=True, dtype='bfloat16',
                      template='plain', image_aspect='crop', image_size=336, num_workers=4, lora_rank=0,
                      lora_alpha=256, lora_dropout=0.05, connector='moec', mova_pool=2)  # train.py's


def read_config(path):
    """A config file's values over train.py's defaults (config files are plain Python)."""
    values = dict(TRAIN_DEFAULTS)
    exec(open(path).read(), values)
    return dict({k: values[k] for k in TRAIN_DEFAULTS}, batch_size=micro_batch or values['batch_size'])


def fake_pg():
    """A fake process group of world_size ranks (no communication) for FSDP's sharding."""
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the 'fake' backend)
    from torch._C._distributed_c10d import FakeStore
    if not dist.is_initialized():
        dist.init_process_group('fake', store=FakeStore(), rank=0, world_size=world_size)
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh('cpu', (world_size,))


def meta_model(cfg, checkpointing=True):
    """The config's full-size MoCHA on the meta device (no memory), trainable and checkpointed as train.py sets it."""
    with torch.device('meta'):
        model = MoCHA(MoCHAConfig(encoder_source='random', llm_source='random', llm=cfg['llm'],
                                  num_experts=cfg['num_experts'], top_k=cfg['top_k'], lora_rank=cfg['lora_rank'],
                                  lora_alpha=cfg['lora_alpha'], lora_dropout=cfg['lora_dropout'], llm_layers=llm_layers,
                                  connector=cfg['connector'], mova_pool=cfg['mova_pool'],
                                  encoder_layers=encoder_layers))
    model.set_trainable(cfg['stage'])
    if checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        model.llm.config.use_cache = False
    return model


def full_batch(cfg, model):
    """A micro-batch of the config whose every sample fills max_length: <image> + text."""
    B, text_length = cfg['batch_size'], cfg['max_length'] - model.num_visual_tokens + 1
    input_ids = torch.randint(3, model.llm.config.vocab_size, (B, text_length), generator=torch.Generator().manual_seed(0))
    input_ids[:, 0] = IMAGE_TOKEN_ID
    return dict(input_ids=input_ids, attention_mask=torch.ones(B, text_length, dtype=torch.long),
                labels=input_ids.masked_fill(torch.arange(text_length) < 2, IGNORE_INDEX),
                images=torch.empty(B, 3, 336, 336, dtype=torch.uint8))


def step_flops(cfg):
    """mocha.count_flops of the config's checkpointed step (fake tensors), with the LLM's model FLOPs: its decoder layers and
    head (the module tracker files part of HGA's backward, which runs after the LLM's, under the LLM module itself)."""
    model = meta_model(cfg)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        counted = count_flops(model, full_batch(cfg, model))
    flops = counted['by_module']
    llm_parts = [name for name in flops if name == 'MoCHA.llm.lm_head'
                 or (name.startswith('MoCHA.llm.model.layers.') and name.count('.') == 4)]
    recompute = counted['hardware'] - counted['model']  # all of it in the decoder layers
    return dict(counted, llm=sum(sum(flops[n].values()) for n in llm_parts) - recompute)


def trace_step(cfg, parallel, autocast_cache=True, checkpointing=True):
    """Bytes per GPU of one train.py step of config `cfg` on fake tensors: weights, gradients, AdamW, the peak."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    model = meta_model(cfg, checkpointing)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if parallel == 'fsdp':  # train.py's wrapping: one unit per decoder layer, then the rest
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = fake_pg()
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.llm.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=precision)
        fully_shard(model, mesh=mesh, mp_policy=precision)
    real_batch = full_batch(cfg, model)
    with fake_tensors(cfg['num_experts'], 'cpu'):
        model.to_empty(device='cpu')
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        # FSDP: AdamW and clipping without foreach ops. On DTensors those build full-size fake tensors to work out
        # their output's shapes, which the tracker would count as memory (26 GiB for Vicuna stage 2); run for real
        # they hold one shard-sized temporary at most, well below the backward's peak
        optimizer = torch.optim.AdamW(trainable, lr=1e-3, fused=parallel == 'ddp', foreach=False)
        for p in trainable:  # a steady-state step: AdamW's two moments exist before it starts
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch = fake_batch(real_batch)
        tracker = lean_memory_tracker(FSDPMemTracker(model, optimizer) if parallel == 'fsdp' else MemTracker(), model)
        if parallel == 'fsdp':
            tracker.track_inputs(tuple(batch.values()))
        else:
            tracker.track_external(model, optimizer, *batch.values())
        with tracker:  # train.py's step
            with torch.autocast('cpu', dtype=torch.bfloat16, cache_enabled=autocast_cache):
                out = model(**batch)
                del out['logits']
                out['loss'].backward()
            after_backward = tracker.get_tracker_snapshot('current')
            torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=parallel == 'ddp')
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    result = dict(trainable_bytes=trainable_bytes)
    (now,), (peak,) = after_backward.values(), tracker.get_tracker_snapshot('peak').values()
    pick = lambda snap, *keys: sum(snap.get(k, 0) for k in keys)
    result.update(weights=pick(now, 'Parameter', 'Sharded Param'), grads=pick(now, 'Gradient', 'Sharded Grad'),
                  optimizer=pick(now, 'Optstate', 'OptState'), peak=peak['Total'])
    # everything else live at the peak: activations, temporaries, autocast's bf16 weight copies,
    # FSDP's gathered bf16 layers, the batch
    result['activations'] = result['peak'] - pick(peak, 'Parameter', 'Sharded Param', 'Gradient', 'Sharded Grad',
                                                   'Optstate', 'OptState')
    return result


def memory_table():
    rows = []
    for path in configs.split(','):
        cfg = read_config(path)
        t = time.perf_counter()
        counted = step_flops(cfg)  # hardware: with the recompute; model: without (what MFU counts)
        no_checkpointing = trace_step(cfg, 'ddp', checkpointing=False)['peak']
        for parallel in ('ddp', 'fsdp'):
            row = dict(config=path, parallel=parallel, default=parallel == cfg['parallel'],
                       batch_size=cfg['batch_size'], max_length=cfg['max_length'], **trace_step(cfg, parallel),
                       model_flops=counted['model'], hardware_flops=counted['hardware'], llm_model_flops=counted['llm'],
                       peak_no_checkpointing=no_checkpointing if parallel == 'ddp' else None)
            if parallel == 'ddp':
                # DDP keeps a float32 bucket copy of every trainable gradient unless the gradients
                # are views into the buckets (gradient_as_bucket_view=True)
                row['ddp_buckets'] = row['trainable_bytes']
                row['autocast_cache'] = row['peak'] - trace_step(cfg, parallel, autocast_cache=False)['peak']
            else:
                row['ddp_buckets'] = row['autocast_cache'] = 0
            row['seconds'] = time.perf_counter() - t
            t = time.perf_counter()
            rows.append(row)
            print_row(row)
    if memory_json:
        with open(memory_json, 'w') as f:
            json.dump(rows, f, indent=1)
    return rows


def fits(peak_bytes):
    """Cards the peak fits, keeping 10 % of each for what the trace does not see."""
    return '/'.join(str(gb) for gb, mib in CARDS_MIB.items() if peak_bytes <= 0.9 * mib * 2 ** 20) or 'none'


def print_row(row):
    name = row['config'].removeprefix('config/').removesuffix('.py') + ('*' if row['default'] else '')
    gib = lambda key: f"{row[key] / GiB:6.1f}"
    with_buckets = row['peak'] + row['ddp_buckets']
    no_checkpointing = f"{row['peak_no_checkpointing'] / GiB:8.1f}" if row['peak_no_checkpointing'] else '-'
    print(f"{name:<18s} {row['parallel']:<5s} {gib('weights')} {gib('grads')} {gib('optimizer')} {gib('activations')} "
          f"{gib('autocast_cache')} {gib('ddp_buckets')} {with_buckets / GiB:8.1f} {row['peak'] / GiB:8.1f} "
          f"{fits(row['peak']):>9s} {no_checkpointing:>8s} {row['model_flops'] / 1e12:8.1f} {row['hardware_flops'] / 1e12:8.1f} "
          f"{row['model_flops'] / row['batch_size'] / 1e12:7.2f}  ({row['seconds']:.0f} s)")


# -----------------------------------------------------------------------------
# loader throughput. Each GPU eats batch_size samples a step; the DataLoader's workers must make them at least as
# fast. On the CPU a sample is its JPEG decoded once, padded to a square and resized to image_size (data.load_image,
# uint8), its conversation tokenised and labelled, and the batch collated; the conversion to float and each encoder's
# normalisation (and resize, for an encoder whose resolution is not image_size) run on the GPU (mocha.Encoders).
# Stand-ins, made here offline: JPEGs at COCO's sizes (most of LLaVA-665K's images are COCO's), conversations of
# English words from this repo's docs, and a byte-level BPE with Phi-2's mechanics trained on the same text.
# What runs on them is train.py's: LLaVADataset, collate, a DataLoader.

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (640, 424), (500, 375), (640, 512), (612, 612)]


def photo_like(width, height, rng):
    """An RGB photo stand-in: shading, shapes with edges, and fine texture (what JPEG spends its bits on)."""
    from PIL import Image, ImageDraw
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-90, 90, 3) \
        + np.linspace(0, 1, height)[:, None, None] * rng.uniform(-90, 90, 3)
    image = Image.fromarray(np.clip(rng.uniform(60, 200, 3) + ramp, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, width), rng.integers(0, height)
        box = (x, y, x + rng.integers(20, width // 2), y + rng.integers(20, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    texture = rng.normal(0, photo_noise, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + texture, 0, 255).astype(np.uint8))


def bpe_tokenizer(texts, vocab_size=8000):
    """A byte-level BPE as Phi-2's (GPT-2's pre-tokenizer, no bos, eos '<|endoftext|>'), trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token='<|endoftext|>')


def instruct_json(folder, image_names, words, rng):
    """A LLaVA-format instruct JSON of loader_samples samples cycling through the images: 1 to 6 turns, questions of
    5 to 20 words, answers of 1 to 80 (one-word VQA answers up to paragraphs, as LLaVA-665K mixes them)."""
    def text(low, high):  # low to high consecutive words from a random place
        start = rng.integers(0, len(words) - high)
        return ' '.join(words[start:start + rng.integers(low, high + 1)])

    samples = []
    for i in range(loader_samples):
        turns = []
        for turn in range(rng.integers(1, 7)):
            turns += [{'from': 'human', 'value': ('<image>\n' if turn == 0 else '') + text(5, 20) + '?'},
                      {'from': 'gpt', 'value': text(1, 80) + '.'}]
        samples.append({'id': str(i), 'image': image_names[i % len(image_names)], 'conversations': turns})
    path = os.path.join(folder, 'instruct.json')
    with open(path, 'w') as f:
        json.dump(samples, f)
    return path


def prefill_tflops(llm_id, connector, text_tokens, no_expert=False):
    """TFLOP of one forward over <image> + text_tokens tokens at full size (fake tensors, bf16 autocast): a greedy
    answer's prefill, and the encoders' share of it; and the visual tokens. The LM head runs over every position here
    (generate needs the last one's only). no_expert: MoVA's routing pass, the base path alone (CLIP, no expert run)."""
    with torch.device('meta'):
        model = MoCHA(MoCHAConfig(encoder_source='random', llm_source='random', llm=llm_id, connector=connector))
    input_ids = torch.full((1, 1 + text_tokens), 3)
    input_ids[0, 0] = IMAGE_TOKEN_ID
    prompt = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  images=torch.empty(1, 3, 336, 336, dtype=torch.uint8))
    if no_expert:
        prompt['expert_mask'] = torch.zeros(1, len(model.encoders.encoders) - 1, dtype=torch.bool)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        counted = count_flops(model, prompt, backward=False)
    encoders = sum(sum(ops.values()) for name, ops in counted['by_module'].items() if name == 'MoCHA.encoders')
    return counted['hardware'] / 1e12, encoders / 1e12, model.num_visual_tokens


def answer_seconds(model, text_tokens, batch, new_tokens, no_expert=False):
    """Seconds of one greedy generate on `device` as eval.py runs it (float32 weights, bf16 autocast): `batch`
    prompts of <image> + text_tokens tokens, `new_tokens` new tokens each (random weights almost never end early).
    The best of `repeats` after a warm-up."""
    input_ids = torch.full((batch, 1 + text_tokens), 3, device=device)
    input_ids[:, 0] = IMAGE_TOKEN_ID
    images = torch.randint(0, 256, (batch, 3, 336, 336), dtype=torch.uint8, device=device)
    expert_mask = (torch.zeros(batch, len(model.encoders.encoders) - 1, dtype=torch.bool, device=device)
                   if no_expert else None)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        return seconds(lambda: model.generate(input_ids, torch.ones_like(input_ids), images, new_tokens,
                                              expert_mask=expert_mask))


def answer_table():
    from mova import routing_question
    docs = [open(f).read() for f in ['README.md'] + sorted(glob.glob('docs/*.md'))]
    routing_text = routing_question('', ['siglip', 'convnext', 'dinov2'], 3)
    routing_tokens = len(bpe_tokenizer(docs)(routing_text)['input_ids'])  # English BPE trained on the docs: Phi-2-like
    print(f"prefill TFLOP of one answer at full size: <image> + a question of {answer_text_tokens} tokens; MoVA first "
          f"routes with its routing prompt ({routing_tokens} more tokens, counted with a byte-level BPE trained on "
          f"this repo's docs), then answers (the few generated tokens not counted)")
    print(f"{'model':<22s} {'visual':>7s} {'routing':>8s} {'answer':>8s} {'total':>8s} {'encoders':>9s}  (TFLOP; "
          f"encoders: their share of the answer pass, every expert on; the routing pass runs CLIP alone)")
    for llm_id in LLM_SPECS:
        for connector in ('moec', 'mova'):
            answer, encoders, visual = prefill_tflops(llm_id, connector, answer_text_tokens)
            routing = (prefill_tflops(llm_id, connector, answer_text_tokens + routing_tokens, no_expert=True)[0]
                       if connector == 'mova' else 0)
            name = ('MoVA-' if connector == 'mova' else 'MoCHA-') + llm_id.split('/')[-1]
            print(f"{name:<22s} {visual:7d} {routing:8.2f} {answer:8.2f} {routing + answer:8.2f} {encoders:9.2f}")
    if device != 'cuda':
        return
    # a POPE answer is 'Yes' or 'No' and the end token: the prefill, then one decoding step (2 new tokens);
    # MoVA's routing pass answers with up to 3 expert letters (eval.py gives it 8 new tokens)
    print(f"\nms per answer on {torch.cuda.get_device_name()}, bf16 autocast, greedy, 2 new tokens (MoVA's routing "
          f"pass: 8), one question alone and each of a batch of {answer_batch}")
    print(f"{'model':<22s} {'routing':>8s} {'answer':>8s} {'total':>8s}   {'batched':>8s} {'routing':>8s} {'answer':>8s}")
    for llm_id in LLM_SPECS:
        for connector in ('moec', 'mova'):
            with torch.device(device):  # full size, random weights, built on the GPU once for its four timings
                model = MoCHA(MoCHAConfig(encoder_source='random', llm_source='random', llm=llm_id, connector=connector,
                                          llm_layers=llm_layers, encoder_layers=encoder_layers)).eval()
            cells = []
            for batch in (1, answer_batch):
                routing = (answer_seconds(model, answer_text_tokens + routing_tokens, batch, 8, no_expert=True) / batch
                           if connector == 'mova' else 0)
                cells += [routing, answer_seconds(model, answer_text_tokens, batch, 2) / batch]
            del model
            torch.cuda.empty_cache()
            name = ('MoVA-' if connector == 'mova' else 'MoCHA-') + llm_id.split('/')[-1]
            print(f"{name:<22s} {cells[0] * 1e3:8.1f} {cells[1] * 1e3:8.1f} {(cells[0] + cells[1]) * 1e3:8.1f}   "
                  f"{(cells[2] + cells[3]) * 1e3:8.1f} {cells[2] * 1e3:8.1f} {cells[3] * 1e3:8.1f}")


def samples_per_second(dataset, cfg, pad_id, workers):
    """Samples/s out of a DataLoader as train.py builds it, with `workers` worker processes (0: the main process),
    collate included; timed from the first batch to the last, so worker start-up is left out."""
    from data import collate
    assert len(dataset) >= 2 * cfg['batch_size'], f"loader_samples={len(dataset)}: the timing needs two batches or more"
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg['batch_size'], num_workers=workers,
                                         collate_fn=lambda b: collate(b, pad_id, cfg['image_size']))
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    count = sum(len(batch['ids']) for batch in batches)
    return count / (time.perf_counter() - start)


def stand_in_dataset(folder, cfg, rng):
    """The LLaVADataset of cfg's data settings over stand-in JPEGs and conversations written to `folder`."""
    from data import LLaVADataset
    docs = [open(f).read() for f in ['README.md'] + sorted(os.path.join('docs', n) for n in os.listdir('docs')
                                                           if n.endswith('.md'))]
    names = [f'{i:06d}.jpg' for i in range(loader_images)]
    for i, name in enumerate(names):
        photo_like(*COCO_SIZES[i % len(COCO_SIZES)], rng).save(os.path.join(folder, name), quality=jpeg_quality)
    words = [w for w in ' '.join(docs).split() if IMAGE_TEXT not in w]  # the docs quote '<image>'
    return LLaVADataset(instruct_json(folder, names, words, rng), folder, bpe_tokenizer(docs), cfg['template'],
                        cfg['image_size'], cfg['max_length'], sum(group_sizes),  # 1693 visual tokens at 336 px
                        image_aspect=cfg['image_aspect'])


def full_length_json(folder, samples, copies=40):
    """instruct_full.json: each conversation's turns `copies` more times (the image once), so max_length cuts every
    sample, as the memory table's trace fills each one to max_length: a train.py step on it is the traced step."""
    full = [dict(sample, conversations=sample['conversations'] + copies * [
        dict(turn, value=turn['value'].replace(IMAGE_TEXT + '\n', '')) for turn in sample['conversations']])
        for sample in samples]
    with open(os.path.join(folder, 'instruct_full.json'), 'w') as f:
        json.dump(full, f)


def main_process_costs(dataset):
    """Milliseconds per sample of its image (decode, pad or crop, resize) and of its text (tokenise, label),
    and the text tokens of each sample."""
    from data import load_image, tokenize_conversation
    start = time.perf_counter()
    tokens = [len(tokenize_conversation(s['conversations'], dataset.tokenizer, dataset.template)[0])
              for s in dataset.samples]
    text_ms = (time.perf_counter() - start) / len(dataset) * 1e3
    start = time.perf_counter()
    for sample in dataset.samples:
        load_image(dataset.image_path(sample), dataset.image_size, dataset.image_aspect)
    image_ms = (time.perf_counter() - start) / len(dataset) * 1e3
    return image_ms, text_ms, tokens


def loader_table():
    paths = loader_configs.split(',')
    cfg = read_config(paths[0])  # the stage-2 configs' data settings are the same but for the template's eos
    with contextlib.nullcontext(stand_in_dir) if stand_in_dir else tempfile.TemporaryDirectory() as folder:
        os.makedirs(folder, exist_ok=True)
        dataset = stand_in_dataset(folder, cfg, np.random.default_rng(seed))
        if stand_in_dir:
            dataset.tokenizer.save_pretrained(os.path.join(folder, 'tokenizer'))
            full_length_json(folder, dataset.samples)
        kilobytes = statistics.mean(os.path.getsize(os.path.join(folder, s['image'])) for s in dataset.samples) / 1e3
        image_ms, text_ms, tokens = main_process_costs(dataset)
        pad_id = dataset.tokenizer.eos_token_id
        rates = {workers: [samples_per_second(dataset, cfg, pad_id, workers) for _ in range(repeats)]
                 for workers in (0, 1)}
    configs_read = {path: read_config(path) for path in paths}
    tflop_per_sample = {path: step_flops(c)['model'] / c['batch_size'] / 1e12 for path, c in configs_read.items()}
    print(f"{paths[0]}'s data: template {cfg['template']}, image_aspect {cfg['image_aspect']}, image_size "
          f"{cfg['image_size']}, max_length {cfg['max_length']}, batch_size {cfg['batch_size']}; {loader_images} "
          f"JPEGs at COCO sizes (quality {jpeg_quality}, mean {kilobytes:.0f} KB), {len(dataset)} samples of "
          f"{statistics.mean(tokens):.0f} text tokens on average (max {max(tokens)}); {repeats} passes")
    print(f"per sample in the main process: image {image_ms:.1f} ms (decode, pad, resize), "
          f"text {text_ms:.1f} ms (tokenise, label)")
    print(f"{'loader':<26s} {'samples/s min':>13s} {'median':>8s}")
    for workers, label in ((0, 'main process (workers=0)'), (1, 'one worker (workers=1)')):
        print(f"{label:<26s} {min(rates[workers]):13.1f} {statistics.median(rates[workers]):8.1f}")
    per_worker = min(rates[1])
    print(f"\nsamples/s a GPU needs at {mfu:.0%} MFU of {gpu_tflops:.0f} TFLOP/s, and the workers per GPU that make "
          f"them at {per_worker:.1f} samples/s each (the slowest pass)")
    print(f"{'config':<20s} {'TFLOP/sample':>12s} {'per GPU':>8s} {f'{world_size} GPUs':>8s} {'workers':>8s} "
          f"{'margin':>7s} {'num_workers':>11s}")
    for path, tflop in tflop_per_sample.items():
        needed = mfu * gpu_tflops / tflop
        workers = math.ceil(needed / per_worker)
        print(f"{path.removeprefix('config/').removesuffix('.py'):<20s} {tflop:12.1f} {needed:8.1f} "
              f"{world_size * needed:8.1f} {workers:8d} {workers * per_worker / needed:6.1f}x "
              f"{configs_read[path]['num_workers']:11d}")


# -----------------------------------------------------------------------------
if table in ('speed', 'all'):
    speed_table()
if table in ('params', 'all'):
    print()
    params_table()
if table in ('memory', 'all'):
    print()
    print(f"GiB per GPU at {world_size} GPUs, one step at each config's micro-batch and max_length, bf16 autocast, "
          f"gradient checkpointing (* = the config's parallel mode). activ: all else live at the peak; cache: how much "
          f"autocast's weight cache adds to the peak; peak+cpy: with DDP's bucket copy of the gradients (no "
          f"gradient_as_bucket_view); fits: peak <= 90 % of the card; no ckpt: peak without checkpointing; "
          f"TFLOP per GPU per step (model: no recompute; hardware: with it) and model TFLOP per sample")
    print(f"{'config':<18s} {'mode':<5s} {'weight':>6s} {'grads':>6s} {'optim':>6s} {'activ':>6s} {'cache':>6s} "
          f"{'bucket':>6s} {'peak+cpy':>8s} {'peak':>8s} {'fits GB':>9s} {'no ckpt':>8s} {'model':>8s} {'hardware':>8s} "
          f"{'/sample':>7s}")
    memory_table()
if table == 'loader':
    loader_table()
if table == 'answer':
    answer_table()
