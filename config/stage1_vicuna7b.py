# Stage 1 of MoCHA-Vicuna7B: as config/stage1.py with Vicuna-7B v1.5 as the LLM.
# Memory per GPU, traced by `python bench.py --table=memory` (one step at these settings, 8 GPUs):
# DDP peaks at 69.7 GiB (32.9 of it the float32 frozen encoders and Vicuna): fits 8x80 GB, tightly.
# 8x48 GB: parallel = 'fsdp' (37.0 GiB). 8x24 GB: parallel = 'fsdp', batch_size = 1,
# gradient_accumulation_steps = 4 (15.9 GiB; global batch still 32).
exec(open('config/stage1.py').read())
out_dir = 'out/mocha-vicuna7b-stage1'
llm = 'lmsys/vicuna-7b-v1.5'
