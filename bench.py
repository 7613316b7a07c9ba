"""
Benchmarks, after nanoGPT's bench.py:
1) speed: MoEC and HGA forward / forward+backward at the paper's shapes, against the released
   per-image / per-expert loops (released.py) and, for MoEC, against the same FLOPs done as dense
   batched matmuls. Every ratio is measured in the same run.
2) params: the parameter breakdown of full-size MoCHA-Phi2 and MoCHA-Vicuna7B, built offline on
   the meta device (no memory, no weights).
3) memory: per-GPU memory and FLOPs of one training step of every shipped real config
   (config/stage{1,2}*.py) under DDP and FSDP at 8 GPUs, traced at full size on fake tensors
   with PyTorch's MemTracker / FSDPMemTracker and FlopCounterMode.

    python bench.py                     # all three, float32 on whatever device is there
    python bench.py --table=speed --device=cuda --dtype=bfloat16
    python bench.py --table=memory      # about 3 minutes on 2 CPU cores, no GPU needed
"""
import time

import torch
import torch.nn.functional as F

from mocha import ENCODER_ORDER, HGA, LLM_SPECS, Encoders, MoEC, build_llm
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


if table in ('speed', 'all'):
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


print()
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
