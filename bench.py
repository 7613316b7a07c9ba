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

    python bench.py                     # all three, float32 on whatever device is there
    python bench.py --table=speed --device=cuda --dtype=bfloat16
    python bench.py --table=memory      # about 3 minutes on 2 CPU cores, no GPU needed
"""
import json
import time

import torch
import torch.nn.functional as F

from mocha import (ENCODER_ORDER, HGA, IGNORE_INDEX, IMAGE_TOKEN_ID, LLM_SPECS, Encoders, MoCHA, MoCHAConfig, MoEC,
                   build_llm, count_flops, fake_batch, fake_tensors, lean_memory_tracker)
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
table = 'all'              # 'speed' | 'params' | 'memory' | 'all'
# memory table: the shipped real configs, traced at world_size GPUs
configs = 'config/stage1.py,config/stage2.py,config/stage1_vicuna7b.py,config/stage2_vicuna7b.py'
world_size = 8
llm_layers = 0             # > 0 cuts the traced towers to that depth (the test's quick run); 0 = full size
encoder_layers = 0
memory_json = ''           # also write the memory table's rows here, as JSON
micro_batch = 0            # > 0 replaces each config's batch_size (what fits smaller cards)
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
    print(f"{'model':<16s} {'encoders':>9s} {'MoECs':>8s} {'LLM':>8s} {'total':>8s} {'stage 1':>9s} {'stage 2':>9s}  (billions; stage = trainable)")
    with torch.device('meta'):
        encoders = Encoders(ENCODER_ORDER, 'random')
    for llm_id in LLM_SPECS:
        with torch.device('meta'):
            llm = build_llm(llm_id, 'random')
            d = llm.config.hidden_size
            moecs = [MoEC(dim, d, 4, 2) for dim in encoders.dims]
        n_enc, n_moec, n_llm = count(encoders), sum(count(m) for m in moecs), count(llm)
        print(f"{llm_id.split('/')[-1]:<16s} {n_enc / 1e9:9.3f} {n_moec / 1e9:8.3f} {n_llm / 1e9:8.3f} "
              f"{(n_enc + n_moec + n_llm) / 1e9:8.3f} {n_moec / 1e9:9.3f} {(n_moec + n_llm) / 1e9:9.3f}")

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
                      num_experts=4, top_k=2, gradient_checkpointing=True, dtype='bfloat16')  # train.py's


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
                                  num_experts=cfg['num_experts'], top_k=cfg['top_k'],
                                  llm_layers=llm_layers, encoder_layers=encoder_layers))
    model.requires_grad_(False)
    model.moecs.requires_grad_(True)
    model.llm.requires_grad_(cfg['stage'] == 2)
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
