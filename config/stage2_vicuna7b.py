# Stage 2 of MoCHA-Vicuna7B. Memory per GPU, traced by `python bench.py --table=memory` (8 GPUs):
# a DDP replica of the 7B model with AdamW needs 169 GiB; FSDP shards parameters, gradients and
# optimizer state across the 8 GPUs and peaks at 71.2 GiB at batch_size 4: fits 8x80 GB, tightly.
# 8x48 GB and 8x24 GB: no traced setting fits (FSDP at batch_size = 1, gradient_accumulation_steps = 4
# still peaks at 48.5 GiB, activations 34.5 of it).
exec(open('config/stage2.py').read())
out_dir = 'out/mocha-vicuna7b-stage2'
init_from = 'out/mocha-vicuna7b-stage1/ckpt'
llm = 'lmsys/vicuna-7b-v1.5'
template = 'vicuna_v1'
parallel = 'fsdp'
