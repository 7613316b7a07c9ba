# Stage 2 of MoCHA-Vicuna7B. Memory per GPU, traced by `python bench.py --table=memory` (8 GPUs;
# docs/benchmarks.md): a DDP replica of the 7B model with AdamW needs 126.8 GiB; FSDP shards parameters,
# gradients and optimizer state across the 8 GPUs and peaks at 23.6 GiB at batch_size 4: fits 8x80 and 8x48 GB.
# 8x24 GB: batch_size = 1, gradient_accumulation_steps = 4 (global batch still 32) peaks at 20.8 GiB, under 90 %
# of a 24 GiB RTX 4090 but over 90 % of an A10's 22.5 GiB.
exec(open('config/stage2.py').read())
out_dir = 'out/mocha-vicuna7b-stage2'
init_from = 'out/mocha-vicuna7b-stage1/ckpt'
llm = 'lmsys/vicuna-7b-v1.5'
template = 'vicuna_v1'
parallel = 'fsdp'
