# Stage 1 of MoCHA-Vicuna7B: as config/stage1.py with Vicuna-7B v1.5 as the LLM.
# Memory per GPU, traced by `python bench.py --table=memory` (one step at these settings, 8 GPUs;
# docs/benchmarks.md): DDP peaks at 46.6 GiB (32.9 of it the float32 frozen encoders and Vicuna): fits 8x80 GB.
# 8x48 GB and 8x24 GB: parallel = 'fsdp' (16.9 GiB), batch_size and gradient_accumulation_steps unchanged
# (8x48 GB under DDP: batch_size = 1, gradient_accumulation_steps = 4, 38.9 GiB).
exec(open('config/stage1.py').read())
out_dir = 'out/mocha-vicuna7b-stage1'
llm = 'lmsys/vicuna-7b-v1.5'
